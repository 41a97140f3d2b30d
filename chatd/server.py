"""The nursery tree of ``chatd serve``::

    root
    ├── service.run            writers (group commit) + the broker's delivery
    ├── signal watcher         SIGINT/SIGTERM → stop
    ├── key watcher            re-reads the key file when it changes (every second, SIGHUP: now)
    └── front
        ├── hypercorn          HTTP API (+ web client); graceful on stop
        └── handlers           one nursery per WebSocket connection
            ├── ws listener    accepts until stop
            └── keepalive      pings every connection (one task for all)

Shutdown, in order: stop accepting WebSockets; ask every connection to
close with 1001 (each finishes the frame in hand and flushes its outbox);
give handlers ``shutdown_grace`` seconds; then let the writers drain what is
queued so every ``send`` in flight is stored; then close store and broker.
What was owed stays owed.
"""

from __future__ import annotations

import gc
import logging
import signal
import socket
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from chatd import crypto, wiring
from chatd.auth import Passwords, Tokens, load_or_create_secret
from chatd.config import Config
from chatd.metrics import Metrics
from chatd.net.clientip import parse_networks
from chatd.net.http import create_app
from chatd.net.websocket import OriginPolicy
from chatd.net.ws import (
    CLOSE_GOING_AWAY,
    AddressCap,
    OutboxBudget,
    WsConnection,
    keepalive,
    serve_ws,
)
from chatd.service import ChatService

log = logging.getLogger("chatd.server")

#: Seconds between checks of the key file (one ``stat`` each).
KEY_CHECK_INTERVAL = 1.0


@dataclass(frozen=True)
class Listening:
    http_port: int
    ws_port: int


def default_web_dir() -> Path | None:
    candidate = Path(__file__).resolve().parent.parent / "web"
    return candidate if (candidate / "index.html").is_file() else None


def build_service(config: Config) -> ChatService:
    # The data dir holds the keyring and the JWT secret: owner-only.
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ring = crypto.load_keyring(
        config.keys or None, config.active_key or None, config.key_path, create=True
    )
    # Keys from the environment are fixed; a key file is followed (rotation).
    keyring = crypto.LiveKeyring(
        ring, None if config.keys else config.key_path, config.active_key or None
    )
    secret = config.jwt_secret or load_or_create_secret(config.secret_path)
    metrics = Metrics(config.node)
    store, broker = wiring.instrument(
        wiring.open_store(config), wiring.open_broker(config), metrics
    )
    return ChatService(
        store=store,
        broker=broker,
        keyring=keyring,
        tokens=Tokens(secret, config.token_ttl),
        passwords=Passwords(),
        node=config.node,
        metrics=metrics,
        commit_window=config.commit_window / 1000,
        resync_concurrency=config.resync_concurrency,
        resync_jitter=config.resync_jitter,
        rate=config.rate,
        burst=config.burst,
        login_limits=(config.login_per_ip, config.login_per_user, config.register_per_ip),
        max_sockets_per_user=config.max_sockets_per_user,
        refresh_ttl=config.refresh_ttl,
        edit_window=config.edit_window,
    )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family, backlog=1024)


async def _watch_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("shutting down", extra={"signal": signal.Signals(signum).name})
            stop.set()
            return


async def _watch_keys(keys: crypto.LiveKeyring, *, on_sighup: bool) -> None:
    """Follow the key file: check it every KEY_CHECK_INTERVAL, and at once on SIGHUP."""
    if not on_sighup:
        while True:
            await trio.sleep(KEY_CHECK_INTERVAL)
            keys.refresh()
    with trio.open_signal_receiver(signal.SIGHUP) as hups:
        while True:
            with trio.move_on_after(KEY_CHECK_INTERVAL):
                async for _ in hups:
                    log.info("SIGHUP: checking the key file")
                    break
            keys.refresh()


async def serve(
    config: Config,
    *,
    stop: trio.Event | None = None,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
) -> None:
    stop = stop or trio.Event()
    service = build_service(config)
    proxies = parse_networks(config.trusted_proxies.split(","))
    connections: set[WsConnection] = set()
    steps = service.metrics.count_task_steps() if config.count_task_steps else None
    if steps is not None:
        trio.lowlevel.add_instrument(steps)
    try:
        async with service.broker, trio.open_nursery() as root:
            await root.start(service.run)
            if handle_signals:
                root.start_soon(_watch_signals, stop)
            if isinstance(service.keyring, crypto.LiveKeyring) and service.keyring.path:
                root.start_soon(partial(_watch_keys, service.keyring, on_sighup=handle_signals))
            async with trio.open_nursery() as front, trio.open_nursery() as handlers:
                async with trio.open_nursery() as listener:
                    # Bind the HTTP socket here so its port is known (also for
                    # --http-port 0) before the app and the origin check are
                    # built; hypercorn takes the fd.
                    http_sock = _bind(config.host, config.http_port)
                    http_port = http_sock.getsockname()[1]
                    ws_port = await listener.start(
                        partial(
                            serve_ws,
                            service,
                            config.host,
                            config.ws_port,
                            handler_nursery=handlers,
                            connections=connections,
                            auth_timeout=config.auth_timeout,
                            rate=config.rate,
                            burst=config.burst,
                            origins=OriginPolicy(config.origins, http_port),
                            cap=AddressCap(config.max_sockets_per_ip, proxies),
                            budget=OutboxBudget(
                                config.outbox_kib * 1024,
                                config.outbox_total_mib * 1024 * 1024,
                                config.socket_sndbuf_kib * 1024,
                            ),
                        )
                    )
                    hconf = HypercornConfig()
                    hconf.bind = [f"fd://{http_sock.detach()}"]
                    hconf.accesslog = None
                    hconf.errorlog = logging.getLogger("hypercorn.error")
                    hconf.graceful_timeout = config.shutdown_grace
                    app = create_app(
                        service,
                        web_dir=config.web_dir or default_web_dir(),
                        http_port=http_port,
                        ws_port=ws_port,
                        public_ws_url=config.public_ws_url,
                        trusted_proxies=proxies,
                    )
                    await front.start(
                        partial(hypercorn_serve, app, hconf, shutdown_trigger=stop.wait)
                    )
                    log.info(
                        "listening",
                        extra={
                            "http": f"http://{config.host}:{http_port}",
                            "ws": f"ws://{config.host}:{ws_port}/ws",
                            "store": config.store_kind,
                            "broker": config.broker_kind,
                        },
                    )
                    listener.start_soon(keepalive, connections)
                    # Everything made so far (modules, the app, the service)
                    # lives as long as the process: out of the garbage
                    # collector's sight, a full collection no longer walks it
                    # (it did, for tens of ms, every few seconds under load:
                    # the p99 spikes of docs/performance.md, lever 7).
                    gc.freeze()
                    task_status.started(Listening(http_port, ws_port))
                    await stop.wait()
                    listener.cancel_scope.cancel()
                for conn in list(connections):
                    conn.close_soon(CLOSE_GOING_AWAY, "server shutting down")
                handlers.cancel_scope.deadline = trio.current_time() + config.shutdown_grace
            service.stop()
            await service.stopped.wait()
            root.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await service.store.aclose()
        if steps is not None:
            trio.lowlevel.remove_instrument(steps)
    log.info("stopped")
