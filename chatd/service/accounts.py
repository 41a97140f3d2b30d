"""Accounts and tokens: register, login, refresh, logout, kick, and the limits.

Attempts per address and per username (:meth:`~AccountsMixin.limit`),
argon2 off the event loop, access tokens with rotating refresh-token
families kept in the broker, revocation, and the sockets-per-account cap.
"""

from __future__ import annotations

import hashlib
import math
import secrets

from chatd.auth import MAX_PASSWORD, Claims, check_password
from chatd.core.envelope import KickEnvelope, encode
from chatd.core.errors import BadRequest, Conflict, RateLimited, Unauthorized, Unavailable
from chatd.core.model import User
from chatd.core.names import normalize_username
from chatd.ports import Routed
from chatd.service.base import ServiceBase, log


def _digest(secret: str) -> str:
    """What the broker keeps of a refresh token: its SHA-256, never the token."""
    return hashlib.sha256(secret.encode()).hexdigest()


class AccountsMixin(ServiceBase):
    """Accounts, tokens and the attempt limits."""

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
