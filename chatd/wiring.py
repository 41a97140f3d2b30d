"""The one place that picks implementations from the configuration.

An unknown store or broker name is an error, never a silent default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from chatd.config import Config, ConfigError
from chatd.ports import Broker, Store

if TYPE_CHECKING:
    from chatd.metrics import Metrics


def _sqlite(config: Config, create: bool) -> Store:
    from chatd.store.sqlite import SqliteStore

    try:
        return SqliteStore.open(config.data_dir, create=create)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"no chatd store in {config.data_dir} ({exc}): pass the data dir of a chatd"
            " with --data-dir or CHATD_DATA_DIR, or --store mongo --mongo-uri"
        ) from None


def _memory(config: Config) -> Broker:
    from chatd.broker.memory import MemoryBroker

    return MemoryBroker()


def _mongo(config: Config, create: bool) -> Store:
    from chatd.store.mongo import MongoStore

    if not config.mongo_uri:
        raise ConfigError("the mongo store needs --mongo-uri (or MONGO_URI)")
    try:
        return MongoStore.open(config.mongo_uri)
    except ValueError as exc:  # a malformed URI
        raise ConfigError(f"mongo_uri: {exc}") from None


def _redis(config: Config) -> Broker:
    from chatd.broker.redis import RedisBroker

    if not config.redis_url:
        raise ConfigError("the redis broker needs --redis-url (or REDIS_URL)")
    try:
        return RedisBroker.from_url(config.redis_url, mode=config.redis_mode)
    except ValueError as exc:  # a malformed URL
        raise ConfigError(f"redis_url: {exc}") from None


#: Store factories take the config and whether they may create an empty store.
STORES: dict[str, Callable[[Config, bool], Store]] = {"sqlite": _sqlite, "mongo": _mongo}
BROKERS: dict[str, Callable[[Config], Broker]] = {"memory": _memory, "redis": _redis}


def open_store(config: Config, *, create: bool = True) -> Store:
    """The configured store. ``create=False`` refuses to start an empty SQLite
    database (chatctl: a mistyped data dir is an error, not an empty store)."""
    factory = STORES.get(config.store_kind)
    if factory is None:
        raise ConfigError(
            f"unknown store '{config.store_kind}' (available: {', '.join(sorted(STORES))})"
        )
    return factory(config, create)


def open_broker(config: Config) -> Broker:
    factory = BROKERS.get(config.broker_kind)
    if factory is None:
        raise ConfigError(
            f"unknown broker '{config.broker_kind}' (available: {', '.join(sorted(BROKERS))})"
        )
    return factory(config)


def instrument(store: Store, broker: Broker, metrics: Metrics) -> tuple[Store, Broker]:
    """The same ports, each call timed into ``metrics`` (chatd_store_call_seconds,
    chatd_broker_call_seconds) and each Unavailable counted. A thin wrapper:
    the implementations know nothing of metrics."""
    from chatd.metrics import Timed

    return (
        cast(Store, Timed(store, Store, "store", metrics.store_calls, metrics.port_unavailable)),
        cast(
            Broker,
            Timed(
                broker,
                Broker,
                "broker",
                metrics.broker_calls,
                metrics.port_unavailable,
                metrics.broker_nowait,
            ),
        ),
    )
