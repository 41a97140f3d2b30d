"""Passwords (argon2id) and tokens (JWT, HS256 pinned).

Both are CPU-bound and blocking; callers run them in worker threads.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from chatd.core.errors import BadRequest, Unauthorized
from chatd.files import create_secret_file

MIN_PASSWORD = 8
MAX_PASSWORD = 1024
_ALGORITHM = "HS256"
_ISSUER = "chatd"


def check_password(password: object) -> str:
    """The rule for a new password (registering, ``chatctl users create``):
    a string of :data:`MIN_PASSWORD` to :data:`MAX_PASSWORD` characters.
    Returns it; raises :class:`BadRequest` otherwise."""
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise BadRequest(f"password must be {MIN_PASSWORD}-{MAX_PASSWORD} characters")
    return password


class Passwords:
    def __init__(self, hasher: PasswordHasher | None = None) -> None:
        # argon2-cffi's defaults are RFC 9106's "low memory" argon2id profile.
        self._hasher = hasher or PasswordHasher()
        self._dummy = self._hasher.hash(secrets.token_hex(16))

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, password_hash: str | None, password: str) -> bool:
        """Check a password. With no hash (unknown user) it still does the work,
        so response times do not tell which usernames exist."""
        try:
            return self._hasher.verify(password_hash or self._dummy, password) and bool(
                password_hash
            )
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False


@dataclass(frozen=True)
class Claims:
    user: str
    expires_at: float
    #: The token's id (``jti``): what logout revokes. None for tokens issued
    #: before chatd put one in.
    token_id: str | None = None
    #: The refresh-token family it was issued in (``fam``), if any.
    family: str | None = None


class Tokens:
    def __init__(self, secret: str, ttl_seconds: int) -> None:
        if len(secret) < 16:
            raise ValueError("the JWT secret must be at least 16 characters")
        self._secret = secret
        self.ttl = ttl_seconds

    def __repr__(self) -> str:
        return f"Tokens(ttl={self.ttl})"

    def issue(
        self, user: str, now: float, *, token_id: str | None = None, family: str | None = None
    ) -> str:
        claims: dict[str, object] = {
            "sub": user,
            "iat": int(now),
            "exp": int(now) + self.ttl,
            "iss": _ISSUER,
            "jti": token_id or secrets.token_urlsafe(12),
        }
        if family is not None:
            claims["fam"] = family
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify(self, token: str) -> Claims:
        """Raises Unauthorized for a bad, forged or expired token."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                issuer=_ISSUER,
                options={"require": ["sub", "exp", "iat"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.InvalidTokenError:
            raise Unauthorized("invalid token") from None
        sub = claims.get("sub")
        if not isinstance(sub, str):
            raise Unauthorized("invalid token")
        jti, fam = claims.get("jti"), claims.get("fam")
        return Claims(
            user=sub,
            expires_at=float(claims["exp"]),
            token_id=jti if isinstance(jti, str) else None,
            family=fam if isinstance(fam, str) else None,
        )


def load_or_create_secret(path: Path) -> str:
    """The embedded-mode JWT secret: read it, or create it with mode 0600."""
    if not path.exists():
        create_secret_file(path, secrets.token_urlsafe(48) + "\n")
    return path.read_text().strip()
