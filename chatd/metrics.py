"""Prometheus metrics of one chatd process, served at ``GET /metrics``.

Every collector lives in the :class:`Metrics` instance's own registry, not
prometheus-client's global one, so several services can run in one process
(the tests do). ``docs/admin.md`` lists every metric, its labels and what
it means; the names are ``chatd_*``.

The hot path only touches children resolved once (a dict lookup and an
``inc`` under the collector's lock); everything that costs more is read
when Prometheus scrapes: the number of authenticated connections, the
active key, and the owed queues (sampled from the broker at most every
``QUEUE_SAMPLE_SECONDS``, within ``QUEUE_SAMPLE_TIMEOUT``).

Without the ``prometheus-client`` package every collector is a no-op and
``/metrics`` answers 503 saying so; chatd itself runs as before.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Iterable
from typing import Any

import trio

from chatd import __version__
from chatd.core import frames
from chatd.core.errors import ALL_CODES, ChatError, Unavailable
from chatd.core.ids import ulid_time_ms
from chatd.core.model import EventKind
from chatd.ports import wall_ms

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
except ImportError:  # pragma: no cover - exercised only without the package
    CollectorRegistry = None  # type: ignore[assignment,misc]
    CONTENT_TYPE_LATEST = "text/plain; version=0.0.4; charset=utf-8"

#: Client frame types (``invalid``: could not be parsed, or too large).
FRAMES_IN = (*frames.CLIENT_TYPES, "invalid")
#: Events stored, by kind (chatd_events_total).
EVENT_KINDS = tuple(k.value for k in EventKind)
#: Server frame types (``other`` should stay 0).
FRAMES_OUT = (*frames.SERVER_TYPES, "other")
ERROR_CODES = (*ALL_CODES, "other")
#: Delivery and seen latencies include time a recipient spends offline, so
#: the buckets reach a day.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    1800.0,
    3600.0,
    21600.0,
    86400.0,
)
CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
QUEUE_SAMPLE_SECONDS = 10.0
QUEUE_SAMPLE_TIMEOUT = 2.0

_FRAME_PREFIX = b'{"type":"'
_ERROR_PREFIX = b'{"type":"error","code":"'


class _Null:
    """Stands in for a collector (or a child) when prometheus-client is missing."""

    def labels(self, *args: Any, **kwargs: Any) -> _Null:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass

    def set_function(self, fn: Callable[[], float]) -> None:
        pass


class Metrics:
    """The collectors of one chatd process (one :class:`ChatService`)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.enabled = CollectorRegistry is not None
        # None without prometheus_client (then every collector is a no-op).
        registry: Any = CollectorRegistry(auto_describe=True) if self.enabled else None
        self.registry = registry
        self._queues_at = -float("inf")
        self._queue_lock = trio.Lock()

        self.ws_connections = self._gauge(
            "chatd_ws_connections", "Open WebSocket connections (authenticated or not)."
        )
        self.ws_sessions = self._gauge(
            "chatd_ws_sessions", "Authenticated WebSocket connections (devices) on this node."
        )
        self.ws_accepted = self._counter(
            "chatd_ws_connections_accepted", "WebSocket connections accepted."
        )
        frames_in = self._fast_counter(
            "chatd_frames_in", "WebSocket frames received, by type.", ["type"]
        )
        frames_out = self._fast_counter(
            "chatd_frames_out", "WebSocket frames handed to the socket, by type.", ["type"]
        )
        errors = self._fast_counter(
            "chatd_errors",
            "Errors answered to clients, by code and transport (ws: error frames; http:"
            " error responses).",
            ["code", "transport"],
        )
        self.messages_stored = self._fast_counter(
            "chatd_messages_stored", "Messages stored (new ones; not idempotent repeats)."
        )
        events = self._fast_counter(
            "chatd_events",
            "Reactions, edits and deletions stored (new ones; not idempotent repeats), by kind.",
            ["kind"],
        )
        self.events = {k: events.labels(k) for k in EVENT_KINDS}
        self.messages_duplicate = self._fast_counter(
            "chatd_messages_duplicate",
            "Sends answered with the message already stored for the same (sender, cid).",
        )
        self.delivery_latency = self._histogram(
            "chatd_delivery_latency_seconds",
            "From a message's ts (accepted, just before its commit) to the first ack or seen"
            " of each recipient (the delivered receipt), observed on the node that took it.",
            LATENCY_BUCKETS,
        )
        self.seen_latency = self._histogram(
            "chatd_seen_latency_seconds",
            "From a message's ts to each recipient's seen.",
            LATENCY_BUCKETS,
        )
        store_calls = self._histogram(
            "chatd_store_call_seconds", "Store port calls, by method.", CALL_BUCKETS, ["method"]
        )
        broker_calls = self._histogram(
            "chatd_broker_call_seconds",
            "Broker port (Redis) calls, by method.",
            CALL_BUCKETS,
            ["method"],
        )
        self.broker_nowait = self._fast_counter(
            "chatd_broker_nowait_calls",
            "Broker calls that do not wait for Redis (route_nowait, settle_nowait), by method.",
            ["method"],
        )
        self.port_unavailable = self._counter(
            "chatd_port_unavailable",
            "Store or broker calls that failed as unavailable, by port and method.",
            ["port", "method"],
        )
        self.resyncs = self._counter(
            "chatd_resync_users",
            "Users whose owed items were re-offered because live delivery broke (resync).",
        )
        self.queue_users = self._gauge(
            "chatd_owed_queue_users", "Users with a non-empty owed queue (sampled)."
        )
        self.queue_entries = self._gauge(
            "chatd_owed_queue_entries", "Entries in all owed queues (sampled)."
        )
        self.queue_oldest = self._gauge(
            "chatd_owed_queue_oldest_seconds", "Age of the oldest owed queue entry (sampled)."
        )
        self.queue_sampled = self._gauge(
            "chatd_owed_queue_sampled_timestamp_seconds",
            "When the owed queues were last sampled (0: never).",
        )
        #: Counts trio task steps while installed (``chatd serve
        #: --count-task-steps 1``): the benchmark divides its growth by the
        #: messages delivered. See :meth:`count_task_steps`.
        self.task_steps = TaskSteps()
        #: name -> (help, read): counters read at scrape time from plain ints
        #: the hot path keeps (see :meth:`count`).
        self._read_counters: dict[str, tuple[str, Callable[[], float]]] = {}
        if self.enabled:
            self.registry.register(_ReadCounters(self._read_counters))
        info = self._gauge("chatd_node_info", "This node: its id and version.", ["node", "version"])
        info.labels(node, __version__).set(1)
        self._key_info = self._gauge(
            "chatd_active_key_info", "The key id that seals new messages here.", ["key"]
        )
        self._active_key: str | None = None

        self.frames_in = {t: frames_in.labels(t) for t in FRAMES_IN}
        self.frames_out = {t: frames_out.labels(t) for t in FRAMES_OUT}
        self.ws_errors = {c: errors.labels(c, "ws") for c in ERROR_CODES}
        self.http_errors = {c: errors.labels(c, "http") for c in ERROR_CODES}
        self.store_calls = store_calls
        self.broker_calls = broker_calls

    # -- collectors --------------------------------------------------------------

    def _counter(self, name: str, doc: str, labels: Iterable[str] = ()) -> Any:
        if not self.enabled:
            return _Null()
        return Counter(name, doc, list(labels), registry=self.registry)

    def _fast_counter(self, name: str, doc: str, labels: Iterable[str] = ()) -> Any:
        """A counter for the hot path: a plain int per label set, read when
        Prometheus scrapes (no lock: only the trio thread counts)."""
        if not self.enabled:
            return _Null()
        family = FastCounter(name, doc, tuple(labels))
        self.registry.register(family)
        return family

    def _gauge(self, name: str, doc: str, labels: Iterable[str] = ()) -> Any:
        if not self.enabled:
            return _Null()
        return Gauge(name, doc, list(labels), registry=self.registry)

    def _histogram(
        self, name: str, doc: str, buckets: tuple[float, ...], labels: Iterable[str] = ()
    ) -> Any:
        if not self.enabled:
            return _Null()
        return Histogram(name, doc, list(labels), buckets=buckets, registry=self.registry)

    # -- the hot path ------------------------------------------------------------

    def frame_out(self, data: bytes) -> None:
        """Count a server frame by the type it starts with (every server frame
        is encoded with ``type`` first, see :func:`chatd.core.frames.encode`)."""
        if data.startswith(_FRAME_PREFIX):
            kind = data[9 : data.find(b'"', 9)].decode("ascii", "replace")
            child = self.frames_out.get(kind)
            if child is not None:
                child.inc()
                if kind == "error" and data.startswith(_ERROR_PREFIX):
                    self.ws_error(data[24 : data.find(b'"', 24)].decode("ascii", "replace"))
                return
        self.frames_out["other"].inc()

    def ws_error(self, code: str) -> None:
        self.ws_errors.get(code, self.ws_errors["other"]).inc()

    def http_error(self, code: str) -> None:
        self.http_errors.get(code, self.http_errors["other"]).inc()

    def transitions(self, transitions: Iterable[Any]) -> None:
        """Observe delivery and seen latencies of receipts that just happened
        (each (message, member, status) once, by the Store's guarantee)."""
        for t in transitions:
            try:
                sent_ms = ulid_time_ms(t.message_id)
            except ValueError:
                continue
            seconds = max(0.0, (t.ts - sent_ms) / 1000)
            if t.status == "delivered":
                self.delivery_latency.observe(seconds)
            else:
                self.seen_latency.observe(seconds)

    # -- scrapes -----------------------------------------------------------------

    def count_task_steps(self) -> TaskSteps:
        """Expose ``chatd_task_steps_total``; the caller installs the instrument."""
        self.count(
            "chatd_task_steps",
            "trio task steps taken by this process while counting (--count-task-steps 1).",
            lambda: self.task_steps.steps,
        )
        return self.task_steps

    def count(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """Expose ``read()`` as the counter ``<name>_total`` (read at scrape
        time, so the hot path only adds to a plain int)."""
        self._read_counters[name] = (doc, read)

    def watch(self, sessions: Callable[[], int], active_key: Callable[[], str]) -> None:
        """Read these at scrape time: authenticated connections, the active key."""
        self.ws_sessions.set_function(lambda: float(sessions()))
        self._read_active_key = active_key

    async def sample_queues(self, queues: Callable[[], Any]) -> None:
        """Refresh the owed-queue gauges from ``queues()`` (Broker.queues) if the
        last sample is older than QUEUE_SAMPLE_SECONDS; a sample that fails or
        takes over QUEUE_SAMPLE_TIMEOUT leaves the last values."""
        async with self._queue_lock:
            now = trio.current_time()
            if now - self._queues_at < QUEUE_SAMPLE_SECONDS:
                return
            self._queues_at = now
            with trio.move_on_after(QUEUE_SAMPLE_TIMEOUT):
                try:
                    found = await queues()
                except ChatError:
                    return
                now_ms = wall_ms()
                oldest = [q.oldest_queued_at for q in found if q.oldest_queued_at is not None]
                self.queue_users.set(len(found))
                self.queue_entries.set(sum(q.entries for q in found))
                self.queue_oldest.set(max(0, now_ms - min(oldest)) / 1000 if oldest else 0)
                self.queue_sampled.set(now_ms / 1000)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        if not self.enabled:
            raise RuntimeError("metrics need the prometheus-client package")
        read = getattr(self, "_read_active_key", None)
        if read is not None:
            active = read()
            if active != self._active_key:
                if self._active_key is not None:
                    self._key_info.remove(self._active_key)
                self._key_info.labels(active).set(1)
                self._active_key = active
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class FastCounter:
    """A Prometheus counter family kept as plain ints (see Metrics._fast_counter).
    Without labels it counts itself; with labels, ``labels(...)`` gives the
    child that counts (made on first use, like prometheus-client's)."""

    __slots__ = ("_children", "doc", "labelnames", "name", "value")

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...] = ()) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = labelnames
        self.value = 0
        self._children: dict[tuple[str, ...], FastCounter] = {}

    def labels(self, *values: str) -> FastCounter:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = FastCounter(self.name, self.doc)
        return child

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(self.name, self.doc, labels=list(self.labelnames))
        if self.labelnames:
            for values, child in list(self._children.items()):
                family.add_metric(list(values), child.value)
        else:
            family.add_metric([], self.value)
        yield family


class TaskSteps(trio.abc.Instrument):
    """A trio instrument counting task steps: each time the scheduler runs a
    task until its next ``await`` that blocks or yields. Their number per
    delivered message is the benchmark's measure of scheduling work (one
    step costs a few microseconds); the count itself costs well under one.
    """

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


class _ReadCounters:
    """Counters whose values are read from callables at scrape time."""

    def __init__(self, counters: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self._counters = counters

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        for name, (doc, read) in list(self._counters.items()):
            yield CounterMetricFamily(name, doc, value=read())


class Timed:
    """A port whose coroutine methods are timed into ``histogram`` (label:
    method) and whose Unavailable failures are counted; everything else is
    the wrapped object's. Made by :func:`chatd.wiring.instrument`."""

    def __init__(
        self,
        inner: Any,
        port: type,
        name: str,
        histogram: Any,
        unavailable: Any,
        nowait: Any = None,
    ) -> None:
        self._inner = inner
        skip = {"run", "aclose"}
        for method, fn in vars(port).items():
            if nowait is not None and method.endswith("_nowait") and hasattr(inner, method):
                setattr(self, method, _counted(getattr(inner, method), nowait.labels(method)))
                continue
            if method in skip or method.startswith("__") or not inspect.iscoroutinefunction(fn):
                continue
            if not hasattr(inner, method):
                continue
            setattr(
                self,
                method,
                _timed(
                    getattr(inner, method),
                    functools.partial(histogram.labels, method),
                    functools.partial(unavailable.labels, name, method),
                ),
            )

    @property
    def wrapped(self) -> Any:
        return self._inner

    # Looked up on the type, so not reached through __getattr__.
    async def __aenter__(self) -> Timed:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        return await self._inner.__aexit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _counted(fn: Callable[..., Any], counter: Any) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        counter.inc()
        return fn(*args, **kwargs)

    counted.__name__ = getattr(fn, "__name__", "counted")
    return counted


def _timed(
    fn: Callable[..., Any], hist: Callable[[], Any], failed: Callable[[], Any]
) -> Callable[..., Any]:
    """``fn``, timed. The label children are made on first use, so /metrics
    lists only the methods this node has called."""
    perf = time.perf_counter
    children: list[Any] = []

    async def timed(*args: Any, **kwargs: Any) -> Any:
        start = perf()
        try:
            return await fn(*args, **kwargs)
        except Unavailable:
            failed().inc()
            raise
        finally:
            if not children:
                children.append(hist())
            children[0].observe(perf() - start)

    timed.__name__ = getattr(fn, "__name__", "timed")
    return timed
