"""A small Redis client on trio: pipelined connections, replies parsed by hiredis.

Why chatd has its own: the broker's hot path is many small scripts from
many tasks at once. Here every command any task submits goes into one
buffer, and one writer task sends the whole buffer in its next step: all
the broker work of a scheduler pass costs one ``send`` and one round trip,
whoever asked. One reader task parses the replies (hiredis, in C) and hands
each batch to whoever submitted it, in order. There is no connection pool
to check out from and no per-call deadline to set up; a caller waits for
its replies without an Event of its own. docs/redis.md has the measurements
against coredis and redis-py.

A :class:`Connection` runs in a nursery the caller provides
(:meth:`Connection.run`), so its two tasks have a parent like every other
task in chatd. Failures: a connection that cannot be reached, that breaks,
or whose oldest outstanding reply is later than ``reply_timeout`` fails
every outstanding batch with :class:`ConnectionLost` and ends; the owner
opens a new one. Error replies (``-ERR …``) are returned in place as
:class:`ReplyError` instances, never raised by the connection.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import hiredis
import outcome
import trio

log = logging.getLogger("chatd.broker.resp")

ReplyError = hiredis.ReplyError

#: What a command argument may be.
Arg = str | bytes | int | float
Command = Sequence[Arg]
#: Called once with the replies of a batch (in order), or with the error that
#: ended the connection before they all came.
Done = Callable[[list[Any] | BaseException], None]


#: First element of a message pushed to a subscribed connection. An
#: unsubscribe is one too: the server may decide on it (a shard channel
#: whose slot moved away), so the broker sends its own unsubscribes with
#: :meth:`Connection.send` and reads every confirmation as a push.
_PUSH_KINDS = frozenset(
    ("message", "pmessage", "smessage", "unsubscribe", "sunsubscribe", "punsubscribe")
)


class ConnectionLost(Exception):
    """The connection failed before every reply came (or could not be made)."""


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def hash_slot(key: str | bytes) -> int:
    """The Redis Cluster slot of ``key``: CRC16 (XMODEM) of its hash tag (the
    part between the first ``{`` and the next ``}``, if not empty), mod 16384."""
    data = key.encode("utf-8") if isinstance(key, str) else key
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc % 16384


def encode(command: Command) -> bytes:
    """One command in RESP: ``*<n>\r\n`` then ``$<len>\r\n<arg>\r\n`` per argument."""
    if not any(type(arg) is bytes for arg in command):
        # The usual case (keys, ids, JSON payloads of base64 bodies): built as
        # one ASCII string, where a length in characters is one in bytes.
        text = f"*{len(command)}\r\n" + "".join(
            [f"${len(a)}\r\n{a}\r\n" for a in map(str, command)]
        )
        try:
            return text.encode("ascii")
        except UnicodeEncodeError:
            pass
    out = [b"*%d\r\n" % len(command)]
    for arg in command:
        if isinstance(arg, str):
            arg = arg.encode("utf-8")
        elif not isinstance(arg, bytes):
            arg = str(arg).encode("ascii")
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


@dataclass(frozen=True)
class Address:
    """Where a Redis server is and how to log in: parsed from a URL."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket
    tls: bool = False
    username: str | None = None
    password: str | None = None
    db: int = 0
    #: For rediss://: check the server's certificate (?ssl_cert_reqs=none: don't).
    verify: bool = True
    ca_file: str | None = None

    @classmethod
    def from_url(cls, url: str) -> Address:
        """``redis://[[user]:password@]host[:port][/db]``, ``rediss://…`` (TLS,
        ``?ssl_cert_reqs=none`` and ``?ssl_ca_certs=path`` understood) or
        ``unix://[[user]:password@]/path[?db=n]``. Raises ValueError."""
        parts = urlparse(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if parts.scheme == "unix":
            return cls(
                path=parts.path,
                username=username,
                password=password,
                db=int(query.get("db", 0)),
            )
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"not a Redis URL: {url!r} (redis://, rediss:// or unix://)")
        db = parts.path.strip("/")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            tls=parts.scheme == "rediss",
            username=username,
            password=password,
            db=int(db or query.get("db", "0")),
            verify=query.get("ssl_cert_reqs", "required").lower() != "none",
            ca_file=query.get("ssl_ca_certs"),
        )

    def __str__(self) -> str:
        if self.path:
            return f"unix://{self.path}"
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"


async def open_stream(address: Address, connect_timeout: float) -> trio.abc.Stream:
    """A connected (and, for TLS, handshaken) stream; raises ConnectionLost."""
    try:
        with trio.fail_after(connect_timeout):
            if address.path:
                return await trio.open_unix_socket(address.path)
            stream: trio.abc.Stream = await trio.open_tcp_stream(address.host, address.port)
            if address.tls:
                context = ssl.create_default_context(cafile=address.ca_file)
                if not address.verify:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                tls = trio.SSLStream(stream, context, server_hostname=address.host)
                await tls.do_handshake()
                stream = tls
            return stream
    except trio.TooSlowError:
        raise ConnectionLost(f"no connection to {address} within {connect_timeout:g} s") from None
    except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
        raise ConnectionLost(f"cannot connect to {address}: {exc}") from None


class _Batch:
    __slots__ = ("done", "replies", "wanted")

    def __init__(self, wanted: int, done: Done) -> None:
        self.wanted = wanted
        self.replies: list[Any] = []
        self.done = done


class Connection:
    """One pipelined connection to one Redis server. Make it with
    :meth:`open`, run :meth:`run` in a nursery, then :meth:`submit` or
    :meth:`call` from any task; :meth:`close` ends it."""

    def __init__(self, stream: trio.abc.Stream, *, reply_timeout: float, name: str = "") -> None:
        self.stream = stream
        self.name = name
        self.reply_timeout = reply_timeout
        self._out: list[bytes] = []
        self._batches: deque[_Batch] = deque()
        #: trio time by which the oldest outstanding reply must have started to come.
        self._due: deque[float] = deque()
        self._writer_parked = False
        self._wake_writer = trio.lowlevel.ParkingLot()
        self._read_scope: trio.CancelScope | None = None
        self._reader = hiredis.Reader(encoding="utf-8", errors="surrogateescape")
        self.error: BaseException | None = None
        self._closed = False
        self.done = trio.Event()
        #: For a subscribed connection: called with every push message.
        self.on_push: Callable[[list[Any]], None] | None = None

    @classmethod
    async def open(
        cls,
        address: Address,
        *,
        connect_timeout: float,
        reply_timeout: float,
        name: str = "",
    ) -> Connection:
        return cls(
            await open_stream(address, connect_timeout), reply_timeout=reply_timeout, name=name
        )

    @property
    def alive(self) -> bool:
        return self.error is None and not self._closed

    # -- submitting ---------------------------------------------------------------------------

    def submit(self, commands: Sequence[Command], done: Done) -> None:
        """Queue ``commands``; ``done`` gets their replies (in order) once they
        all came, or the error that ended the connection. Never blocks; the
        commands go out in the writer's next step, with whatever else was
        queued meanwhile. Raises ConnectionLost if the connection is gone."""
        if not self.alive:
            raise ConnectionLost(str(self.error or "connection closed"))
        self._out.extend(encode(c) for c in commands)
        self._batches.append(_Batch(len(commands), done))
        due = trio.current_time() + self.reply_timeout
        self._due.append(due)
        scope = self._read_scope
        if scope is not None and scope.deadline > due:
            scope.deadline = due
        if self._writer_parked:
            self._writer_parked = False
            self._wake_writer.unpark_all()

    def send(self, commands: Sequence[Command]) -> None:
        """Queue commands whose answers are pushes (unsubscribes on a
        subscribed connection): nothing waits for a reply. Raises
        ConnectionLost if the connection is gone."""
        if not self.alive:
            raise ConnectionLost(str(self.error or "connection closed"))
        self._out.extend(encode(c) for c in commands)
        if self._writer_parked:
            self._writer_parked = False
            self._wake_writer.unpark_all()

    async def call(self, *commands: Command) -> list[Any]:
        """Submit ``commands`` and wait for their replies. If the caller is
        cancelled, the commands still run; their replies are dropped."""
        task = trio.lowlevel.current_task()
        state = {"waiting": True}

        def done(result: list[Any] | BaseException) -> None:
            if state["waiting"]:
                state["waiting"] = False
                trio.lowlevel.reschedule(
                    task,
                    outcome.Error(result)
                    if isinstance(result, BaseException)
                    else outcome.Value(result),
                )

        self.submit(commands, done)

        def abort(_: Any) -> trio.lowlevel.Abort:
            state["waiting"] = False
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    def close(self) -> None:
        """End the connection: what is outstanding fails with ConnectionLost."""
        if not self._closed:
            self._closed = True
            self._fail(ConnectionLost("connection closed"))

    # -- the connection's tasks -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer and the reader, until the connection fails or is closed."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop, nursery.cancel_scope)
                nursery.start_soon(self._read_loop, nursery.cancel_scope)
                task_status.started()
        finally:
            self._fail(self.error or ConnectionLost("connection closed"))
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1):
                    await self.stream.aclose()
            self.done.set()

    async def _write_loop(self, scope: trio.CancelScope) -> None:
        try:
            while not self._closed:
                if not self._out:
                    self._writer_parked = True
                    await self._wake_writer.park()
                    continue
                data = b"".join(self._out)
                self._out.clear()
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(ConnectionLost(f"redis connection broke: {exc}"))
        finally:
            scope.cancel()

    async def _read_loop(self, scope: trio.CancelScope) -> None:
        try:
            while not self._closed:
                with trio.CancelScope(deadline=self._due[0] if self._due else math.inf) as cs:
                    self._read_scope = cs
                    data = await self.stream.receive_some(65536)
                self._read_scope = None
                if cs.cancelled_caught:
                    if self._due and trio.current_time() >= self._due[0]:
                        self._fail(
                            ConnectionLost(f"redis did not answer within {self.reply_timeout:g} s")
                        )
                        return
                    continue
                if not data:
                    self._fail(ConnectionLost("redis closed the connection"))
                    return
                self._reader.feed(data)  # type: ignore[arg-type]  # any buffer will do
                self._take_replies()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(ConnectionLost(f"redis connection broke: {exc}"))
        except hiredis.ProtocolError as exc:
            self._fail(ConnectionLost(f"redis sent something unreadable: {exc}"))
        finally:
            scope.cancel()

    def _take_replies(self) -> None:
        reader = self._reader
        while (reply := reader.gets()) is not False:
            # A subscribed connection: messages come whenever; everything else
            # answers a command (or is an unsubscribe the server decided on).
            if (
                self.on_push is not None
                and isinstance(reply, list)
                and reply
                and (reply[0] in _PUSH_KINDS or not self._batches)
            ):
                self.on_push(reply)
                continue
            if not self._batches:
                self._fail(ConnectionLost(f"redis sent a reply nobody asked for: {reply!r:.80}"))
                return
            batch = self._batches[0]
            batch.replies.append(reply)
            if len(batch.replies) == batch.wanted:
                self._batches.popleft()
                self._due.popleft()
                try:
                    batch.done(batch.replies)
                except Exception:
                    log.exception("a redis reply handler failed")

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._writer_parked = False
        self._wake_writer.unpark_all()
        batches, self._batches = self._batches, deque()
        self._due.clear()
        self._out.clear()
        for batch in batches:
            try:
                batch.done(ConnectionLost(str(error)))
            except Exception:
                log.exception("a redis reply handler failed")


async def call_many(
    batches: Sequence[tuple[Connection, Sequence[Command]]],
) -> list[list[Any] | BaseException]:
    """Each batch on its connection, all at once; each batch's replies (or
    the error that lost its connection), in order."""
    if not batches:
        return []
    if len(batches) == 1:
        conn, commands = batches[0]
        try:
            return [await conn.call(*commands)]
        except ConnectionLost as exc:
            return [exc]
    results: list[list[Any] | BaseException] = [[] for _ in batches]
    left = [len(batches)]
    all_done = trio.Event()

    def finisher(k: int) -> Done:
        def done(result: list[Any] | BaseException) -> None:
            results[k] = result
            left[0] -= 1
            if left[0] == 0:
                all_done.set()

        return done

    for k, (conn, commands) in enumerate(batches):
        try:
            conn.submit(commands, finisher(k))
        except ConnectionLost as exc:
            finisher(k)(exc)
    await all_done.wait()
    return results
