"""The chat service: one place where a request meets the rules and the ports.

Both adapters (HTTP in :mod:`chatd.net.http`, WebSocket in :mod:`chatd.net.ws`)
call into :class:`ChatService`; it applies the core rules, talks to the
store and the broker, and never touches a socket. Follow one message:
:meth:`ChatService.send` → store (group-committed) → ``sent`` to the
sender → :meth:`Broker.route` → :meth:`Hub.dispatch` on every node holding
a recipient → the recipient's connection.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

import trio

from chatd import crypto, owed
from chatd.auth import MAX_PASSWORD, Claims, Passwords, Tokens, check_password
from chatd.batching import Batcher
from chatd.core import e2e as e2e_rules
from chatd.core import frames
from chatd.core.delivery import recipients, settled_rids, target_of
from chatd.core.devices import MAX_DEVICES, check_device_id, check_registration
from chatd.core.e2e import Content, parse_stored, stored_text
from chatd.core.envelope import (
    DevicesEnvelope,
    EventEnvelope,
    KickEnvelope,
    MessageEnvelope,
    PresenceEnvelope,
    ReceiptEnvelope,
    TypingEnvelope,
    encode,
)
from chatd.core.errors import (
    BadRequest,
    ChatError,
    Conflict,
    Forbidden,
    Internal,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from chatd.core.ids import UlidFactory
from chatd.core.model import (
    Appended,
    Conversation,
    Device,
    EventKind,
    EventResult,
    GroupAction,
    Mark,
    MarkResult,
    NewEvent,
    NewMembership,
    NewMessage,
    Receipt,
    ReceiptKey,
    Status,
    StoredMessage,
    User,
)
from chatd.core.names import (
    GROUP_PREFIX,
    MAX_GROUP_MEMBERS,
    MAX_TITLE,
    is_conversation_id,
    normalize_username,
    parse_rid,
)
from chatd.core.session import Outbound
from chatd.hashing import Hasher
from chatd.hub import Connection, Hub, render, render_payload
from chatd.metrics import Metrics
from chatd.ports import Broker, Clock, Routed, Store, SystemClock, Writes
from chatd.rates import UserRates

log = logging.getLogger("chatd.service")


def _digest(secret: str) -> str:
    """What the broker keeps of a refresh token: its SHA-256, never the token."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class EventAck:
    """``user``'s device got the event ``event_id``."""

    user: str
    event_id: str


#: What goes through the one group commit: a send, an event, a mark, a
#: (sender, receipt) ack, an event ack.
WriteRequest = NewMessage | NewEvent | Mark | tuple[str, ReceiptKey] | EventAck
WriteResult = Appended | EventResult | MarkResult | None
#: A write's callback: its results, or the error that failed its batch.
Done = Callable[[list[WriteResult] | ChatError], None]


#: A store's refusal code → the error a client gets.
_REFUSALS: dict[str, type[ChatError]] = {
    "not_found": NotFound,
    "forbidden": Forbidden,
    "bad_request": BadRequest,
}


R = TypeVar("R", Appended, EventResult)


def _one_result(
    result: list[WriteResult] | ChatError, conn: Connection, cid: str, kind: type[R]
) -> R | None:
    """In a one-request write's callback: the connection's write is done;
    its result, or None once a failed batch was answered with the cid."""
    conn.release()
    if isinstance(result, ChatError):
        conn.reply(_error(result.with_cid(cid)))
        return None
    done = result[0]
    if not isinstance(done, kind):
        raise Internal(f"a write result is not an {kind.__name__}")
    return done


def _e2e_required(cid: str | None) -> BadRequest:
    return BadRequest(
        "this conversation is end-to-end: send 'e2e', not 'body'", cid=cid, reason="e2e_required"
    )


def _error(exc: ChatError) -> Outbound:
    return Outbound(frames.encode(frames.error(exc.code, exc.message, exc.cid, **exc.extra)))


#: The backlog is read from the store in pages of this many items, so a
#: device that was away for long gets everything without one huge read.
BACKLOG_PAGE = 500
HISTORY_DEFAULT = 50
HISTORY_MAX = 200


@dataclass(frozen=True)
class Readiness:
    ok: bool
    checks: dict[str, str]


class ChatService:
    def __init__(
        self,
        *,
        store: Store,
        broker: Broker,
        keyring: crypto.Keys,
        tokens: Tokens,
        passwords: Passwords,
        node: str,
        clock: Clock | None = None,
        cpu_threads: int = 2,
        metrics: Metrics | None = None,
        commit_window: float = 0.0,
        resync_concurrency: int = 8,
        resync_jitter: float = 0.0,
        rate: float = 0.0,
        burst: float = 1.0,
        login_limits: tuple[float, float, float] = (0.0, 0.0, 0.0),
        max_sockets_per_user: int = 0,
        refresh_ttl: int = 30 * 86_400,
        edit_window: int = 48 * 3600,
    ) -> None:
        self.store = store
        self.broker = broker
        self.keyring = keyring
        self.tokens = tokens
        self.passwords = passwords
        self.node = node
        self.clock = clock or SystemClock()
        self.hub = Hub(keyring)
        self.ids = UlidFactory(clock_ms=self.clock.now_ms)
        self.metrics = metrics or Metrics(node)
        self.metrics.watch(self.hub.count, lambda: self.keyring.active)
        # argon2 is CPU-bound: a small limiter keeps logins from starving the
        # worker threads the store needs.
        self.hasher = Hasher(threads=cpu_threads)
        # The members of a one-to-one conversation never change, so it is
        # safe to cache; this saves a store round trip on every send and
        # typing there. Groups are read each time (see _conversation).
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()
        self._conversation_cache = 10_000
        # Every write goes through one group commit: the sends, acks and seen
        # reports of a scheduler pass share one store transaction.
        self._writes: Batcher[WriteRequest, WriteResult] = Batcher(
            "write", self._write_batch, window=commit_window
        )
        self.metrics.count(
            "chatd_store_writes",
            "Store writes (one commit each) made by the group commit.",
            lambda: self._writes.batches,
        )
        self.metrics.count(
            "chatd_store_write_requests",
            "Sends, marks and receipt acks written; divided by chatd_store_writes_total:"
            " requests per commit.",
            lambda: self._writes.items,
        )
        #: Sends per account, across its devices and every replica.
        self.rates = UserRates(broker, rate, burst)
        #: Per minute: logins per address, logins per username, registrations per address.
        self.login_limits = login_limits
        self.max_sockets_per_user = max_sockets_per_user
        self.refresh_ttl = refresh_ttl
        self.edit_window_ms = edit_window * 1000
        self._stop = trio.Event()
        self._resync_wanted = trio.Event()
        #: Users to resync (None: every local user).
        self._resync_users: set[str] | None = set()
        self.resync_concurrency = max(1, resync_concurrency)
        self.resync_jitter = max(0.0, resync_jitter)
        #: Users of dead nodes to announce offline (see gone).
        self._departures: list[tuple[str, int]] = []
        self._departed = trio.Event()
        self.stopped = trio.Event()

    # -- lifecycle -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the writers and the broker's delivery until :meth:`stop`.

        On stop, the writers finish what is queued before returning, so every
        ``send`` in flight is stored.
        """
        try:
            async with trio.open_nursery() as outer:
                await outer.start(
                    partial(self.broker.run, gone=self.gone),
                    self.node,
                    self.hub.dispatch,
                    self.resync,
                )
                outer.start_soon(self._resync_loop)
                outer.start_soon(self._departures_loop)
                async with trio.open_nursery() as writers:
                    await writers.start(self._writes.run)
                    task_status.started()
                    await self._stop.wait()
                    self._writes.close()
                outer.cancel_scope.cancel()
        finally:
            self.stopped.set()

    def stop(self) -> None:
        self._stop.set()

    async def _write_batch(self, requests: list[WriteRequest]) -> list[WriteResult]:
        """One Store.write for a batch of mixed requests; results in request order."""
        appends = [r for r in requests if isinstance(r, NewMessage)]
        marks = [r for r in requests if isinstance(r, Mark)]
        acks = [r for r in requests if isinstance(r, tuple)]
        events = [r for r in requests if isinstance(r, NewEvent)]
        event_acks = [(r.user, r.event_id) for r in requests if isinstance(r, EventAck)]
        done = await self.store.write(Writes(appends, marks, acks, events, event_acks))
        appended, marked, evented = iter(done.appended), iter(done.marked), iter(done.events)
        out: list[WriteResult] = []
        for r in requests:
            if isinstance(r, NewMessage):
                out.append(next(appended))
            elif isinstance(r, Mark):
                out.append(next(marked))
            elif isinstance(r, NewEvent):
                out.append(next(evented))
            else:
                out.append(None)
        return out

    def resync(self, users: Iterable[str] | None = None) -> None:
        """The broker lost live delivery for a while (for ``users``, or for
        every local user): re-offer what is owed."""
        if users is None:
            self._resync_users = None
        elif self._resync_users is not None:
            self._resync_users.update(users)
        self._resync_wanted.set()

    async def _resync_loop(self) -> None:
        """Re-offer owed items, paced: after a random delay of up to
        ``resync_jitter`` seconds (nodes that lost Redis together do not all
        read the store at once), ``resync_concurrency`` users at a time."""
        while True:
            await self._resync_wanted.wait()
            if self.resync_jitter:
                await trio.sleep(random.uniform(0, self.resync_jitter))
            self._resync_wanted = trio.Event()
            wanted, self._resync_users = self._resync_users, set()
            users = self.hub.users() if wanted is None else sorted(wanted)
            log.info("resync: offering owed items again", extra={"users": len(users)})
            failed = await self.reoffer(users)
            self.metrics.resyncs.inc(len(users))
            if failed:
                await trio.sleep(1)
                self.resync(failed)

    async def reoffer(self, users: Sequence[str]) -> list[str]:
        """Offer what is owed to each of ``users`` to their connections here,
        ``resync_concurrency`` users at a time; the users whose store or queue
        could not be read."""
        failed: list[str] = []
        pending = iter(users)

        async def worker() -> None:
            for user in pending:
                if not self.hub.connections(user):
                    continue

                async def emit(items: list[Outbound], user: str = user) -> None:
                    for conn in self.hub.connections(user):
                        for item in items:
                            conn.offer(item)

                try:
                    await self.backlog(user, emit)
                except ChatError as exc:
                    if not failed:
                        log.warning("resync failed; retrying", extra={"reason": exc.message})
                    failed.append(user)

        async with trio.open_nursery() as nursery:
            for _ in range(min(self.resync_concurrency, len(users))):
                nursery.start_soon(worker)
        return failed

    def gone(self, user: str, last_seen: int) -> None:
        """A dead node's user is online nowhere now (the broker says so on
        one surviving node): announce them offline."""
        self._departures.append((user, last_seen))
        self._departed.set()

    async def _departures_loop(self) -> None:
        while True:
            await self._departed.wait()
            self._departed = trio.Event()
            batch, self._departures = self._departures, []
            for user, last_seen in batch:
                try:
                    await self.store.set_last_seen(user, last_seen)
                    await self._announce(user, online=False, last_seen=last_seen)
                except ChatError as exc:
                    log.warning(
                        "could not announce a dead node's user offline",
                        extra={"user": user, "reason": exc.message},
                    )

    async def metrics_text(self) -> tuple[bytes, str]:
        """The Prometheus exposition of this node (owed queues sampled first)."""
        await self.metrics.sample_queues(self.broker.queues)
        return self.metrics.render()

    async def readiness(self) -> Readiness:
        checks: dict[str, str] = {}
        for name, port in (("store", self.store), ("broker", self.broker)):
            try:
                with trio.fail_after(2):
                    await port.ping()
                checks[name] = "ok"
            except (ChatError, trio.TooSlowError) as exc:
                checks[name] = f"unavailable: {getattr(exc, 'message', 'timeout')}"
        return Readiness(all(v == "ok" for v in checks.values()), checks)

    # -- accounts --------------------------------------------------------------------

    async def limit(self, action: str, address: str, username: object) -> None:
        """Count a login or registration attempt from ``address`` (and for
        ``username``) in buckets every replica shares; raise RateLimited
        (with the seconds to wait) once a bucket is empty. Checked before
        any password is hashed. If the buckets cannot be read, the attempt
        goes on (logged): argon2 still slows guessing."""
        per_ip, per_user, register_per_ip = self.login_limits
        buckets = [(f"ip:{address}:{action}", register_per_ip if action == "register" else per_ip)]
        if action == "login" and isinstance(username, str):
            try:
                buckets.append((f"u:{normalize_username(username)}:login", per_user))
            except BadRequest:
                pass  # not a name anyone has: the address's bucket counts it
        for bucket, per_minute in buckets:
            if per_minute <= 0:
                continue
            try:
                taken = await self.broker.take(bucket, 1, per_minute / 60, max(1, int(per_minute)))
            except Unavailable as exc:
                log.warning("rate bucket unavailable", extra={"reason": exc.message})
                return
            if not taken.granted:
                log.warning("too many attempts", extra={"action": action, "bucket": bucket})
                raise RateLimited(
                    f"too many {action} attempts; retry in {math.ceil(taken.retry_after)} s",
                    retry_after=taken.retry_after,
                )

    async def register(self, username: object, password: object) -> str:
        name = normalize_username(username)
        password = check_password(password)
        if await self.store.get_user(name) is not None:
            raise Conflict(f"username '{name}' is taken")
        pw_hash = await self.hasher.run(self.passwords.hash, password)
        await self.store.create_user(User(name, pw_hash, self.clock.now_ms()))
        log.info("user registered", extra={"user": name})
        return name

    async def login(self, username: object, password: object) -> tuple[str, int, str | None]:
        if not isinstance(username, str) or not isinstance(password, str):
            raise Unauthorized("wrong username or password")
        try:
            name = normalize_username(username)
        except BadRequest:
            name = ""
        user = await self.store.get_user(name) if name else None
        ok = await self.hasher.run(
            self.passwords.verify, user.password_hash if user else None, password[:MAX_PASSWORD]
        )
        if not ok or user is None or user.disabled:
            raise Unauthorized("wrong username or password")
        token, refresh = await self._new_family(user.username)
        return token, self.tokens.ttl, refresh

    async def _new_family(self, user: str) -> tuple[str, str | None]:
        """An access token, and a refresh token starting a new family (None
        when the broker cannot keep it: the device logs in again later)."""
        family, secret = secrets.token_urlsafe(12), secrets.token_urlsafe(32)
        token_id = secrets.token_urlsafe(12)
        now_ms = self.clock.now_ms()
        token = self.tokens.issue(user, now_ms / 1000, token_id=token_id, family=family)
        try:
            await self.broker.refresh_begin(
                family, user, _digest(secret), token_id, now_ms + self.refresh_ttl * 1000
            )
        except Unavailable as exc:
            log.warning("no refresh token: broker unavailable", extra={"reason": exc.message})
            return token, None
        return token, f"{family}.{secret}"

    async def refresh(self, refresh_token: object) -> tuple[str, int, str]:
        """A new access token and the next refresh token for a valid refresh
        token (rotated: each works once). A refresh token used twice means a
        copy is in other hands: the family is ended, its last access token
        revoked and its sockets closed, and both holders must log in again."""
        if not isinstance(refresh_token, str) or refresh_token.count(".") != 1:
            raise Unauthorized("unknown or expired refresh token")
        family, secret = refresh_token.split(".")
        new_secret, token_id = secrets.token_urlsafe(32), secrets.token_urlsafe(12)
        now_ms = self.clock.now_ms()
        rotation = await self.broker.refresh_rotate(
            family, _digest(secret), _digest(new_secret), token_id, now_ms + self.refresh_ttl * 1000
        )
        if rotation.outcome == "reused" and rotation.user is not None:
            log.warning("refresh token reused: family ended", extra={"user": rotation.user})
            if rotation.token_id is not None:
                await self.broker.revoke(rotation.token_id, now_ms + self.tokens.ttl * 1000)
                await self.kick(
                    rotation.user, rotation.token_id, "signed out: refresh token reused"
                )
            raise Unauthorized("refresh token already used: this session is signed out")
        if rotation.outcome != "rotated" or rotation.user is None:
            raise Unauthorized("unknown or expired refresh token")
        user = await self.store.get_user(rotation.user)
        if user is None or user.disabled:
            await self.broker.refresh_end(family)
            raise Unauthorized("unknown or disabled user")
        token = self.tokens.issue(user.username, now_ms / 1000, token_id=token_id, family=family)
        return token, self.tokens.ttl, f"{family}.{new_secret}"

    async def authenticate(self, token: str) -> Claims:
        """What a valid token says: its user, its expiry, its id. Raises
        Unauthorized for a bad, expired or revoked token, or a disabled user.
        Revocation lives in the broker (Redis: shared by every replica); when
        it cannot be read the token is taken (chat goes on through a Redis
        outage) and the failure is logged."""
        claims = self.tokens.verify(token)
        user = await self.store.get_user(claims.user)
        if user is None or user.disabled:
            raise Unauthorized("unknown or disabled user")
        if claims.token_id is not None:
            try:
                revoked = await self.broker.is_revoked(claims.token_id)
            except Unavailable as exc:
                log.warning("could not check token revocation", extra={"reason": exc.message})
                revoked = False
            if revoked:
                raise Unauthorized("token revoked")
        return claims

    async def admit_device(self, user: str) -> None:
        """Raise RateLimited when ``user`` already has ``max_sockets_per_user``
        live sockets, on every replica together (two connecting at the same
        moment may both get in). If the broker cannot say, the socket is let in."""
        cap = self.max_sockets_per_user
        if cap <= 0:
            return
        try:
            live = await self.broker.devices(user)
        except Unavailable as exc:
            log.warning("could not count the account's sockets", extra={"reason": exc.message})
            return
        if live >= cap:
            raise RateLimited(f"at most {cap} connections per account")

    async def logout(self, token: str) -> None:
        """Revoke the token until it expires, on every replica, and close the
        sockets it authenticated (4001) wherever they are."""
        claims = await self.authenticate(token)
        if claims.token_id is None:
            raise BadRequest("this token has no id to revoke; it expires on its own")
        await self.broker.revoke(claims.token_id, int(claims.expires_at * 1000))
        if claims.family is not None:
            await self.broker.refresh_end(claims.family)
        await self.kick(claims.user, claims.token_id, "logged out")
        log.info("logged out", extra={"user": claims.user})

    async def kick(self, user: str, token_id: str | None, reason: str) -> None:
        """Close the user's sockets (those of ``token_id``, or all) on every node."""
        env = KickEnvelope(token_id, reason)
        await self._route([Routed(user, "kick", encode(env), False, None, env)])

    # -- conversations ---------------------------------------------------------------

    def _remember(self, conv: Conversation) -> Conversation:
        self._conversations[conv.id] = conv
        self._conversations.move_to_end(conv.id)
        while len(self._conversations) > self._conversation_cache:
            self._conversations.popitem(last=False)
        return conv

    async def _conversation(self, id: str) -> Conversation | None:
        """The conversation; one-to-one ones from the cache (their members
        never change), groups from the store every time (theirs do, on any
        replica)."""
        conv = self._conversations.get(id)
        if conv is None:
            conv = await self.store.get_conversation(id)
            if conv is not None and conv.kind == "dm":
                self._remember(conv)
        return conv

    async def member_conversation(self, user: str, id: str, cid: str | None = None) -> Conversation:
        """The conversation, if ``user`` is a member: NotFound / Forbidden otherwise."""
        if not is_conversation_id(id):
            raise NotFound("no such conversation", cid=cid)
        conv = await self._conversation(id)
        if conv is None:
            raise NotFound("no such conversation", cid=cid)
        if user not in conv.members:
            raise Forbidden("not a member of this conversation", cid=cid)
        return conv

    async def conversations(self, user: str) -> list[dict[str, Any]]:
        return [
            {
                "id": s.id,
                "kind": s.kind,
                "title": s.title,
                "members": list(s.members),
                "admins": list(s.admins),
                "joined": dict(s.joined),
                "e2e": s.e2e,
                "last_seq": s.last_seq,
                "last_ts": s.last_ts,
                "unread": s.unread,
                "last_message": (
                    self._message_json(s.last_message, viewer=user) if s.last_message else None
                ),
            }
            for s in await self.store.conversations_of(user)
        ]

    def _message_json(self, m: StoredMessage, viewer: str) -> dict[str, Any]:
        """A message as history shows it to ``viewer``: the contract's fields,
        then the sender's ``cid`` (to the sender only), ``reply_to``,
        ``edited_ts``, ``reactions`` (counts, whether the viewer is among
        them, and who) and ``deleted`` (a tombstone has ``body`` null). An
        end-to-end message has its ``e2e`` object instead of ``body``."""
        content = Content(None) if m.deleted else self._open(m)
        out: dict[str, Any] = {
            "id": m.id,
            "conversation": m.conversation,
            "seq": m.seq,
            "from": m.sender,
            **content.fields(),
            "ts": m.ts,
            "delivered_to": list(m.delivered_to),
            "seen_by": list(m.seen_by),
            "cid": m.cid if viewer == m.sender else None,
            "reply_to": m.reply_to,
            "edited_ts": m.edited_ts,
            "reactions": [
                {"emoji": emoji, "count": len(users), "mine": viewer in users, "users": list(users)}
                for emoji, users in m.reactions
            ],
        }
        if m.deleted:
            out["deleted"] = True
        return out

    async def open_dm(self, user: str, peer: object) -> Conversation:
        """The one-to-one conversation of ``user`` and ``peer``, made now if
        it does not exist yet (so that an end-to-end client can fetch the
        peer's devices before its first message)."""
        name = normalize_username(peer)
        if name == user:
            raise BadRequest("cannot start a conversation with yourself")
        if await self.store.get_user(name) is None:
            raise NotFound(f"no user '{name}'")
        return await self.store.ensure_dm(user, name, self.clock.now_ms())

    async def create_group(
        self, user: str, members: object, title: object, e2e: object = False
    ) -> Conversation:
        if not isinstance(e2e, bool):
            raise BadRequest("'e2e' must be true or false")
        if not isinstance(members, list) or not members:
            raise BadRequest("'members' must be a non-empty list of usernames")
        if title is not None and (not isinstance(title, str) or len(title) > MAX_TITLE):
            raise BadRequest(f"'title' must be a string of at most {MAX_TITLE} characters")
        names = {normalize_username(m) for m in members} | {user}
        if len(names) > MAX_GROUP_MEMBERS:
            raise BadRequest(f"a group has at most {MAX_GROUP_MEMBERS} members")
        if len(names) < 2:
            raise BadRequest("a group needs at least one other member")
        for name in sorted(names - {user}):
            if await self.store.get_user(name) is None:
                raise NotFound(f"no user '{name}'")
        conv = await self.store.create_group(
            GROUP_PREFIX + self.ids.new(),
            title.strip() if isinstance(title, str) else None,
            sorted(names),
            self.clock.now_ms(),
            creator=user,
            e2e=e2e,
        )
        return conv

    async def change_group(
        self, user: str, id: str, action: GroupAction, users: object = (), title: object = None
    ) -> dict[str, Any]:
        """Add or remove members, leave, rename, make or unmake admins: judged
        and applied by the store against the group as it is then; a
        ``members`` event goes (owed) to every member before and after, on
        every replica. Answers the group after the change."""
        if not is_conversation_id(id):
            raise NotFound("no such conversation")
        names: list[str] = []
        if action in (GroupAction.ADD, GroupAction.REMOVE, GroupAction.PROMOTE, GroupAction.DEMOTE):
            if not isinstance(users, list | tuple) or not users:
                raise BadRequest("'members' must be a non-empty list of usernames")
            if len(users) > MAX_GROUP_MEMBERS:
                raise BadRequest(f"a group has at most {MAX_GROUP_MEMBERS} members")
            names = list(dict.fromkeys(normalize_username(u) for u in users))
        if action is GroupAction.ADD:
            for name in names:
                found = await self.store.get_user(name)
                if found is None or found.deleted:
                    raise NotFound(f"no user '{name}'")
        if action is GroupAction.RENAME:
            if title is not None and (not isinstance(title, str) or len(title) > MAX_TITLE):
                raise BadRequest(f"'title' must be a string of at most {MAX_TITLE} characters")
            title = (title.strip() or None) if isinstance(title, str) else None
        change = NewMembership(
            self.ids.new(),
            id,
            user,
            self.clock.now_ms(),
            action,
            tuple(names),
            title if isinstance(title, str) else None,
        )
        done = await self.store.change_group(change)
        if done.refused is not None or done.event is None:
            raise _REFUSALS.get(done.refused or "", NotFound)(done.reason or "refused")
        e = done.event
        self.metrics.events[e.kind.value].inc()
        log.info(
            "group changed",
            extra={"conversation": id, "by": user, "action": action.value, "users": names},
        )
        key, payload, env = owed.event_item(e)
        await self._route([Routed(u, key, payload, True, None, env) for u in done.recipients or ()])
        return {
            "id": id,
            "kind": "group",
            "title": e.title,
            "members": list(e.members),
            "admins": list(e.admins),
            "eid": e.id,
            "eseq": e.eseq,
            "ts": e.ts,
            "by": e.by,
            "action": e.action,
            "users": list(e.users),
        }

    async def history(
        self, user: str, id: str, before: int | None, limit: int | None
    ) -> list[dict[str, Any]]:
        await self.member_conversation(user, id)
        if before is not None and before < 1:
            raise BadRequest("'before' must be a positive seq")
        limit = HISTORY_DEFAULT if limit is None else limit
        if not 1 <= limit <= HISTORY_MAX:
            raise BadRequest(f"'limit' must be 1-{HISTORY_MAX}")
        page = await self.store.history(id, before, limit, viewer=user)
        return [self._message_json(m, viewer=user) for m in page]

    def _open(self, m: StoredMessage) -> Content:
        try:
            return parse_stored(self.keyring.open(m.body, m.id, m.conversation))
        except crypto.KeyringError as exc:
            log.error("cannot open message body", extra={"id": m.id, "reason": str(exc)})
            return Content(None)

    async def _visible_user(self, caller: str, name: str) -> User:
        """The user ``name`` if ``caller`` may look them up (themselves, or
        someone they share a conversation with); NotFound otherwise, the
        same answer for a stranger as for nobody."""
        try:
            name = normalize_username(name)
        except BadRequest:
            raise NotFound("no such user") from None
        user = await self.store.get_user(name)
        if user is None or (
            name != caller and not await self.store.shares_conversation(caller, name)
        ):
            raise NotFound("no such user")
        return user

    async def user_info(self, caller: str, name: str) -> dict[str, Any]:
        user = await self._visible_user(caller, name)
        name = user.username
        presence = (await self.broker.presence([name]))[name]
        seen = [t for t in (presence.last_seen, user.last_seen) if t is not None]
        return {
            "username": name,
            "online": presence.online,
            "last_seen": max(seen) if seen else None,
        }

    # -- end-to-end devices ----------------------------------------------------------

    async def register_device(self, user: str, device: str, body: dict[str, Any]) -> bool:
        """Register one of ``user``'s devices (public keys, self-signed);
        True when it is new. Keys never change: other keys under a taken id
        are a Conflict. Contacts hear that the user's devices changed."""
        reg = check_registration(user, device, body)
        outcome = await self.store.put_device(
            Device(
                user,
                reg.device,
                reg.sig_key,
                reg.dh_key,
                reg.name,
                reg.self_sig,
                self.clock.now_ms(),
            ),
            MAX_DEVICES,
        )
        if outcome == "conflict":
            raise Conflict(f"device '{reg.device}' is registered with other keys or was removed")
        if outcome == "full":
            raise BadRequest(f"at most {MAX_DEVICES} devices per account")
        if outcome == "created":
            log.info("device registered", extra={"user": user, "device": reg.device})
            await self._devices_changed(user)
        return outcome == "created"

    async def remove_device(self, user: str, device: str) -> None:
        """Tombstone one of the caller's own devices (its id stays taken)."""
        check_device_id(device)
        if not await self.store.remove_device(user, device, self.clock.now_ms()):
            raise NotFound("no such device")
        log.info("device removed", extra={"user": user, "device": device})
        await self._devices_changed(user)

    async def user_devices(self, caller: str, name: str) -> dict[str, Any]:
        """A user's devices (removed ones too), for the user and their contacts."""
        name = (await self._visible_user(caller, name)).username
        return {
            "username": name,
            "devices": [
                {
                    "device": d.device,
                    "sig_key": d.sig_key,
                    "dh_key": d.dh_key,
                    "name": d.name,
                    "self_sig": d.self_sig,
                    "created_ts": d.created_ts,
                    "removed_ts": d.removed_ts,
                }
                for d in await self.store.devices(name)
            ],
        }

    async def active_device(self, user: str, device: str) -> bool:
        """Is ``device`` one of ``user``'s devices, not removed?"""
        return any(
            d.device == device and d.removed_ts is None for d in await self.store.devices(user)
        )

    async def _devices_changed(self, user: str) -> None:
        """Tell the user's contacts and the user's own devices (not owed)."""
        env = DevicesEnvelope(user)
        payload = encode(env)
        people = [user, *await self.store.contacts(user)]
        await self._route([Routed(p, "devices", payload, False, None, env) for p in people])

    # -- connections -----------------------------------------------------------------

    async def attach(self, conn: Connection) -> None:
        """Register a connection here and in presence; announce a first device."""
        if conn.user is None:
            raise Internal("attach of a connection that is not authenticated")
        self.hub.add(conn)
        try:
            first = await self.broker.attach(conn.user, self.node, conn.id)
        except Unavailable as exc:
            # The device still gets live traffic routed to this node by
            # whoever can reach it; the broker re-asserts presence once back.
            log.warning("broker unavailable; presence deferred", extra={"reason": exc.message})
            return
        if first:
            await self._announce(conn.user, online=True, last_seen=None)

    async def detach(self, conn: Connection) -> None:
        if conn.user is None:
            return
        self.hub.remove(conn)
        now = self.clock.now_ms()
        try:
            last = await self.broker.detach(conn.user, self.node, conn.id, now)
        except Unavailable as exc:
            log.warning("broker unavailable; presence deferred", extra={"reason": exc.message})
            return
        if last:
            await self.store.set_last_seen(conn.user, now)
            await self._announce(conn.user, online=False, last_seen=now)

    async def _announce(self, user: str, online: bool, last_seen: int | None) -> None:
        peers = await self.store.dm_peers(user)
        if peers:
            env = PresenceEnvelope(user, online, last_seen)
            payload = encode(env)
            await self._route([Routed(p, "presence", payload, False, None, env) for p in peers])

    async def backlog(self, user: str, emit: Callable[[list[Outbound]], Awaitable[None]]) -> None:
        """Offer everything owed to ``user``, page by page, through ``emit``.

        The store is the authority: its pages (messages by conversation and
        seq, then receipts) are what is owed. The broker's queue is the fast
        path: entries the store no longer lists as owed are stale and are
        settled here; if the store cannot be read, the queue's entries are
        offered and Unavailable is raised so the device hears the backlog may
        be incomplete.
        """
        try:
            queued = {o.key: o.payload for o in await self.broker.owed(user)}
        except Unavailable as exc:
            log.warning("broker unavailable; backlog from the store", extra={"reason": exc.message})
            queued = {}
        try:
            await self._stored_backlog(user, emit, queued)
        except Unavailable:
            items = [
                out
                for p in queued.values()
                if (out := render_payload(p, self.keyring, owed=True)) is not None
            ]
            if items:
                await emit(items)
            raise
        if queued:
            await self._settle(user, list(queued))

    async def _stored_backlog(
        self,
        user: str,
        emit: Callable[[list[Outbound]], Awaitable[None]],
        queued: dict[str, str],
    ) -> None:
        pages = self.store, user, BACKLOG_PAGE
        await self._offer_pages(owed.message_pages(*pages), MessageEnvelope, emit, queued)
        await self._offer_pages(owed.event_pages(*pages), EventEnvelope, emit, queued)
        await self._offer_pages(owed.receipt_pages(*pages), ReceiptEnvelope, emit, queued)

    async def _offer_pages(
        self,
        pages: AsyncIterator[Sequence[Any]],
        wrap: Callable[[Any], MessageEnvelope | EventEnvelope | ReceiptEnvelope],
        emit: Callable[[list[Outbound]], Awaitable[None]],
        queued: dict[str, str],
    ) -> None:
        """Render each page of owed items and emit it; what the store lists
        is not stale in the queue (even an item that cannot be opened now:
        it stays owed and queued)."""
        async for page in pages:
            items = []
            for item in page:
                env = wrap(item)
                queued.pop(owed.queue_key(env), None)
                out = render(env, self.keyring, owed=True)
                if out is not None:
                    items.append(out)
            if items:
                await emit(items)

    # -- frames ----------------------------------------------------------------------

    async def send(self, conn: Connection, frame: frames.Send) -> None:
        """Store a message, answer ``sent`` on ``conn``, then route it.

        Returns once the message is queued for the group commit (it waits
        only to look up a conversation it has not seen yet, and when the
        commit queue is full); ``sent`` and the routing follow from the
        commit's callback, ``sent`` first, so that it always precedes the
        receipts of the same message on the sender's connection. A failed
        write answers an ``error`` with the ``cid``.
        """
        if conn.user is None:
            raise Internal("send on a connection that is not authenticated")
        sender = conn.user
        target = target_of(frame, sender)
        if target.peer is not None:
            conv = self._conversations.get(target.conversation)
            if conv is None:
                if await self.store.get_user(target.peer) is None:
                    raise NotFound(f"no user '{target.peer}'", cid=frame.cid)
                conv = self._remember(
                    await self.store.ensure_dm(sender, target.peer, self.clock.now_ms())
                )
        else:
            conv = await self.member_conversation(sender, target.conversation, frame.cid)
        to = recipients(conv.members, sender)
        if frame.reply_to is not None:
            await self._message_in(frame.reply_to, conv, sender, frame.cid)
        switches = frame.e2e is not None and not conv.e2e
        try:
            if frame.e2e is not None:
                await self._check_e2e(conn, conv, frame.e2e, frame.cid)
                text = stored_text(e2e=frame.e2e)
            elif conv.e2e:
                raise _e2e_required(frame.cid)
            else:
                text = stored_text(body=frame.body)
        except (BadRequest, Forbidden):
            # A retry of a message stored before a device or the mode
            # changed is answered with its first ``sent``, as any retry.
            if await self.store.sent_id(sender, frame.cid) is None:
                raise
            text = stored_text(body=frame.body) if frame.body is not None else ""
        mid = self.ids.new()
        ts = self.clock.now_ms()
        sealed = self.keyring.seal(text, mid, conv.id)
        cid = frame.cid
        reply_to = frame.reply_to

        def stored(result: list[WriteResult] | ChatError) -> None:
            done = _one_result(result, conn, cid, Appended)
            if done is None:
                return
            if done.refused == "e2e_required":
                conn.reply(_error(_e2e_required(cid)))
                return
            if done.refused is not None:
                conn.reply(_error(Forbidden("not a member of this conversation", cid=cid)))
                return
            conn.reply(
                Outbound(
                    frames.encode(frames.sent(cid, done.id, done.conversation, done.seq, done.ts))
                )
            )
            if done.duplicate:
                # Stored (and routed) the first time; the store keeps it owed.
                self.metrics.messages_duplicate.inc()
                return
            self.metrics.messages_stored.inc()
            if switches and conv.id in self._conversations:
                self._conversations[conv.id] = replace(conv, e2e=True)
            key, payload, env = owed.message_item(
                StoredMessage(
                    done.id, conv.id, done.seq, sender, done.ts, sealed, reply_to=reply_to
                )
            )
            owed_to = to if done.recipients is None else done.recipients
            items = [Routed(r, key, payload, True, None, env) for r in owed_to]
            items.append(Routed(sender, done.id, payload, False, conn.id, env))
            self.broker.route_nowait(items)

        await self._write(
            [
                NewMessage(
                    mid, conv.id, sender, cid, ts, sealed, to, reply_to, frame.e2e is not None
                )
            ],
            conn,
            stored,
        )

    async def _check_e2e(
        self, conn: Connection, conv: Conversation, sealed: dict[str, Any], cid: str | None
    ) -> None:
        """An end-to-end ``e2e`` object may be sent on ``conn`` in ``conv``:
        it names the connection's own (active) device, and its epoch is that
        device's and has a share for every active device of every member but
        the sending one, and for no other (``e2e_stale`` with ``missing`` and
        ``extra`` otherwise: the client rotates and sends again)."""
        device = getattr(conn, "device", None)
        if device is None or sealed["device"] != device:
            raise Forbidden(
                "'e2e.device' must be this connection's device (name it in 'auth')", cid=cid
            )
        epoch = await self.store.get_epoch(conv.id, sealed["epoch"])
        active = await self.store.active_devices(conv.members)
        if device not in active:
            raise Forbidden("this device was removed", cid=cid)
        if epoch is not None and (epoch.user, epoch.device) != (conn.user, device):
            raise Forbidden("that epoch is another device's", cid=cid)
        missing, extra = e2e_rules.coverage(epoch.recipients if epoch else (), active, device)
        if epoch is None or missing or extra:
            raise BadRequest(
                "the epoch's key is not shared with exactly the conversation's devices:"
                " start a new epoch and send again",
                cid=cid,
                reason="e2e_stale",
                missing=missing,
                extra=extra,
            )

    # -- end-to-end epochs -----------------------------------------------------------

    async def put_epoch(self, user: str, id: str, epoch: object, body: dict[str, Any]) -> bool:
        """Add shares of ``user``'s epoch ``epoch`` in conversation ``id``
        (True when the epoch is new). The sending device is the caller's,
        active; every share goes to an active device of a member (not the
        sending one). Conflict: the epoch is another device's, or a device
        already has a different share of it."""
        conv = await self.member_conversation(user, id)
        epoch = e2e_rules.check_epoch_id(epoch)
        device = check_device_id(body.get("device"))
        shares = e2e_rules.check_shares(body.get("shares"), sender_device=device)
        active = set(await self.store.active_devices(conv.members))
        if device not in set(await self.store.active_devices([user])):
            raise Forbidden("'device' must be one of your active devices")
        strangers = sorted(set(shares) - active)
        if strangers:
            raise BadRequest(
                "shares only go to active devices of this conversation's members",
                unknown=strangers,
            )
        outcome = await self.store.put_epoch(
            conv.id, epoch, user, device, shares, self.clock.now_ms()
        )
        if outcome == "conflict":
            raise Conflict("that epoch is another device's, or a device has another share of it")
        return outcome == "created"

    async def epoch_shares(self, user: str, id: str, epochs: str | None) -> dict[str, Any]:
        """The shares of ``epochs`` addressed to the caller's devices (active
        or removed: a removed device's old shares are its own business)."""
        conv = await self.member_conversation(user, id)
        names = e2e_rules.check_epoch_list(epochs)
        mine = [d.device for d in await self.store.devices(user)]
        return {
            "shares": [
                {
                    "epoch": s.epoch,
                    "sender": s.sender,
                    "device": s.device,
                    "to": s.to,
                    "share": s.share,
                }
                for s in await self.store.epoch_shares(conv.id, names, mine)
            ]
        }

    async def _message_in(self, id: str, conv: Conversation, user: str, cid: str) -> StoredMessage:
        """The stored message ``id`` of ``conv`` that ``user`` may read (not
        deleted, not from before they joined), or NotFound."""
        found = await self.store.get_messages([id])
        if (
            not found
            or found[0].conversation != conv.id
            or found[0].deleted
            or found[0].seq < conv.visible_from(user)
        ):
            raise NotFound("no such message in this conversation", cid=cid)
        return found[0]

    async def act(self, conn: Connection, frame: frames.EventFrame) -> None:
        """A react, edit or delete: store the event, answer ``applied`` on
        ``conn``, then route it (owed) to the other members and (not owed)
        to the actor's other devices; a deletion settles the queue entries
        it made stale. Refusals are answered with the ``cid``, like a send."""
        if conn.user is None:
            raise Internal("an event on a connection that is not authenticated")
        user = conn.user
        found = await self.store.get_messages([frame.id])
        try:
            if not found:
                raise NotFound("no such message")
            conv = await self.member_conversation(user, found[0].conversation)
        except Forbidden:
            # Someone else's message: as if it did not exist.
            raise NotFound("no such message", cid=frame.cid) from None
        except NotFound as exc:
            raise exc.with_cid(frame.cid) from None
        ts = self.clock.now_ms()
        eid = self.ids.new()
        to = recipients(conv.members, user)
        match frame:
            case frames.React():
                ev = NewEvent(
                    eid,
                    conv.id,
                    EventKind.REACTION,
                    frame.id,
                    user,
                    frame.cid,
                    ts,
                    to,
                    emoji=frame.emoji,
                    on=frame.on,
                )
            case frames.Edit():
                sealed = self.keyring.seal(
                    await self._edit_text(conn, conv, frame), frame.id, conv.id
                )
                ev = NewEvent(
                    eid,
                    conv.id,
                    EventKind.EDITED,
                    frame.id,
                    user,
                    frame.cid,
                    ts,
                    to,
                    body=sealed,
                    window_ms=self.edit_window_ms,
                )
            case frames.Delete():
                # A group's admins may delete others' messages: the store
                # decides that against the group as it is then.
                ev = NewEvent(eid, conv.id, EventKind.DELETED, frame.id, user, frame.cid, ts, to)
        cid = frame.cid

        def stored(result: list[WriteResult] | ChatError) -> None:
            done = _one_result(result, conn, cid, EventResult)
            if done is None:
                return
            self.publish_event(done, to, cid=cid, conn=conn)

        await self._write([ev], conn, stored)

    async def _edit_text(self, conn: Connection, conv: Conversation, frame: frames.Edit) -> str:
        """What an edit stores: plain in a plain conversation, end-to-end
        (checked like a send) in an end-to-end one."""
        # A one-to-one conversation may have been cached before its switch
        # (on any replica): the store knows.
        if not conv.e2e:
            conv = await self.store.get_conversation(conv.id) or conv
        if frame.e2e is not None:
            if not conv.e2e:
                raise BadRequest(
                    "this conversation is not end-to-end: edit with 'body'",
                    cid=frame.cid,
                    reason="e2e_off",
                )
            await self._check_e2e(conn, conv, frame.e2e, frame.cid)
            return stored_text(e2e=frame.e2e)
        if conv.e2e:
            raise _e2e_required(frame.cid)
        return stored_text(body=frame.body)

    def publish_event(
        self,
        done: EventResult,
        to: Sequence[str],
        *,
        cid: str | None = None,
        conn: Connection | None = None,
    ) -> None:
        """After an event's write: answer the actor's connection (if any),
        route the event (to whom the store said, else ``to``), settle what a
        deletion made stale."""
        if done.refused is not None or done.event is None:
            error = _REFUSALS.get(done.refused or "", NotFound)(done.reason or "refused", cid=cid)
            if conn is not None:
                conn.reply(_error(error))
            return
        e = done.event
        if conn is not None and cid is not None:
            conn.reply(
                Outbound(
                    frames.encode(
                        frames.applied(
                            cid, e.kind.value, e.id, e.conversation, e.message_id, e.eseq, e.ts
                        )
                    )
                )
            )
        if done.duplicate:
            return
        self.metrics.events[e.kind.value].inc()
        if e.kind is EventKind.DELETED:
            log.info(
                "message deleted for everyone",
                extra={"id": e.message_id, "conversation": e.conversation, "by": e.by},
            )
        key, payload, env = owed.event_item(e)
        owed_to = to if done.recipients is None else done.recipients
        items = [Routed(r, key, payload, True, None, env) for r in owed_to]
        items.append(Routed(e.by, key, payload, False, conn.id if conn else None, env))
        self.broker.route_nowait(items)
        for user, keys in owed.by_user(done.dropped).items():
            self.broker.settle_nowait(user, keys)

    async def _write(self, requests: list[WriteRequest], conn: Connection, done: Done) -> None:
        """Queue ``requests`` for the group commit; ``done`` gets the results.
        Waits only while the commit queue is full (back pressure)."""
        if self._writes.full:
            await self._writes.wait_for_room()
        conn.hold()
        try:
            self._writes.submit_nowait(requests, done)
        except ChatError:
            conn.release()
            raise

    async def _route(self, items: list[Routed]) -> None:
        try:
            await self.broker.route(items)
        except Unavailable as exc:
            # Already stored: the store keeps it owed and the next ``ready``
            # offers it. Live delivery waits for the broker to come back.
            log.warning("broker unavailable; delivery deferred", extra={"reason": exc.message})

    async def ack(self, conn: Connection, frame: frames.Ack) -> None:
        """Apply an ``ack`` (marks and receipt acks: one write). Message ids
        the user may not ack are answered with ``not_found``, after the
        write."""
        if conn.user is None:
            raise Internal("ack on a connection that is not authenticated")
        user = conn.user
        keys = frame.keys or tuple(parse_rid(r) for r in frame.receipts)
        settle = [r for k in keys for r in settled_rids(k)] + list(frame.events)
        acks: list[WriteRequest] = [(user, k) for k in keys]
        acks += [EventAck(user, e) for e in frame.events]
        await self._mark_many(conn, frame.ids, Status.DELIVERED, acks, settle)

    async def seen(self, conn: Connection, frame: frames.Seen) -> None:
        if conn.user is None:
            raise Internal("seen on a connection that is not authenticated")
        await self._mark_many(conn, frame.ids, Status.SEEN, [], [])

    async def _mark_many(
        self,
        conn: Connection,
        ids: Sequence[str],
        status: Status,
        receipt_acks: list[WriteRequest],
        settle: list[str],
    ) -> None:
        """Apply marks (and receipt acks, in the same write); then route the
        receipts they made, settle the user's queue entries of what became
        delivered just now (only those can still sit there: an entry left by
        a failed settle is dropped by the next backlog) and of ``settle``,
        and refuse the ids the user may not mark."""
        user = conn.user
        if user is None:
            raise Internal("marks on a connection that is not authenticated")
        if not ids and not receipt_acks:
            return
        now = self.clock.now_ms()
        requests: list[WriteRequest] = [Mark(user, i, status, now) for i in ids]
        requests += receipt_acks

        def written(result: list[WriteResult] | ChatError) -> None:
            conn.release()
            if isinstance(result, ChatError):
                conn.reply(_error(result))
                return
            results = [r for r in result if isinstance(r, MarkResult)]
            unknown = [i for i, r in zip(ids, results, strict=True) if not r.known]
            delivered: list[str] = []
            routed: list[Routed] = []
            for r in results:
                if r.transitions:
                    self.metrics.transitions(r.transitions)
                for t in r.transitions:
                    if t.status is Status.DELIVERED:
                        delivered.append(t.message_id)
                    receipt = Receipt(
                        t.message_id, t.conversation, t.sender, t.member, t.status, t.ts
                    )
                    key, payload, env = owed.receipt_item(receipt)
                    routed.append(Routed(t.sender, key, payload, True, None, env))
            if routed:
                self.broker.route_nowait(routed)
            if delivered or settle:
                self.broker.settle_nowait(user, delivered + settle)  # one call for the frame
            if unknown:
                error = NotFound("no such message for you")
                conn.reply(
                    Outbound(frames.encode(frames.error(error.code, error.message, ids=unknown)))
                )

        await self._write(requests, conn, written)

    async def _settle(self, user: str, keys: list[str]) -> None:
        if not keys:
            return
        try:
            await self.broker.settle(user, keys)
        except Unavailable as exc:
            # The store already records the ack; a stale queue entry is only
            # offered again and acked again.
            log.warning("broker unavailable; queue settle skipped", extra={"reason": exc.message})

    async def flush(self) -> None:
        """Wait until every write queued so far is done (their callbacks ran)."""
        await self._writes.flush()

    def after_writes(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once every write queued so far is done (its
        callbacks ran): a connection's later answers keep their frames' order."""
        self._writes.call_after(callback)

    async def typing(self, conn: Connection, frame: frames.Typing) -> None:
        if conn.user is None:
            raise Internal("typing on a connection that is not authenticated")
        conv = await self.member_conversation(conn.user, frame.conversation)
        env = TypingEnvelope(conv.id, conn.user)
        payload = encode(env)
        others = recipients(conv.members, conn.user)
        if others:
            await self._route([Routed(m, "typing", payload, False, None, env) for m in others])
