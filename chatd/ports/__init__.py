"""The ports: what the service needs from a store, a broker and a clock,
one narrow module each (:mod:`.store`, :mod:`.broker`, :mod:`.clock`).

Each port states its guarantees in its module; every implementation keeps them,
and the contract suites in :mod:`chatd.testing` check them. The service only
ever talks to these protocols; one wiring switch (:mod:`chatd.wiring`) picks
the implementations.

Errors: an implementation raises :class:`chatd.core.errors.Unavailable` when
its backend does not answer, and :class:`chatd.core.errors.Conflict` /
``NotFound`` where a method says so. Nothing else escapes.
"""

from chatd.ports.broker import (
    Broker,
    Deliver,
    Gone,
    NodeInfo,
    QueueEntry,
    QueueInfo,
    Resync,
    Rotation,
    Routed,
    Taken,
)
from chatd.ports.clock import Clock, SystemClock, wall_ms
from chatd.ports.store import (
    Reseal,
    Store,
    StoreStats,
    UserDeleted,
    Writes,
    Written,
)

__all__ = [
    "Broker",
    "Clock",
    "Deliver",
    "Gone",
    "NodeInfo",
    "QueueEntry",
    "QueueInfo",
    "Reseal",
    "Resync",
    "Rotation",
    "Routed",
    "Store",
    "StoreStats",
    "SystemClock",
    "Taken",
    "UserDeleted",
    "Writes",
    "Written",
    "wall_ms",
]
