"""The error tree shared by the core, the adapters and the wire.

Every error a client can see is a :class:`ChatError`; its ``code`` is the
wire code (``error.code`` in frames and HTTP bodies) and ``http_status`` the
status the HTTP API answers with::

    ChatError                   (internal, 500)
    ├── BadRequest              (bad_request, 400)   malformed or invalid input
    ├── Unauthorized            (unauthorized, 401)  no, bad or expired token
    ├── Forbidden               (forbidden, 403)     not a member / not allowed
    ├── NotFound                (not_found, 404)     unknown user, conversation, message
    ├── Conflict                (conflict, 409)      username taken
    ├── TooLarge                (too_large, 413)     frame or body over the limit
    ├── RateLimited             (rate_limited, 429)  slow down
    ├── Unavailable             (unavailable, 503)   store or broker did not answer
    ├── Internal                (internal, 500)      a bug
    └── MethodNotAllowed        (method_not_allowed, 405; HTTP only)

:data:`CATALOGUE` lists them once; every other list of codes derives from it.

``cid`` is carried so that an error about a ``send`` names the message the
client tried to send.
"""

from __future__ import annotations

from typing import Any


class ChatError(Exception):
    code = "internal"
    http_status = 500

    def __init__(self, message: str, *, cid: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.cid = cid
        #: More fields for the wire (the error frame, the HTTP error object):
        #: ``reason``, ``missing`` and ``extra`` of an end-to-end refusal.
        self.extra: dict[str, Any] = extra

    def with_cid(self, cid: str | None) -> ChatError:
        if cid is not None and self.cid is None:
            self.cid = cid
        return self


class BadRequest(ChatError):
    code = "bad_request"
    http_status = 400


class Unauthorized(ChatError):
    code = "unauthorized"
    http_status = 401


class Forbidden(ChatError):
    code = "forbidden"
    http_status = 403


class NotFound(ChatError):
    code = "not_found"
    http_status = 404


class Conflict(ChatError):
    code = "conflict"
    http_status = 409


class TooLarge(ChatError):
    code = "too_large"
    http_status = 413


class RateLimited(ChatError):
    code = "rate_limited"
    http_status = 429

    def __init__(
        self, message: str, *, cid: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, cid=cid)
        #: Seconds until trying again can succeed (HTTP: the Retry-After header).
        self.retry_after = retry_after


class Unavailable(ChatError):
    code = "unavailable"
    http_status = 503


class Internal(ChatError):
    code = "internal"
    http_status = 500


class MethodNotAllowed(ChatError):
    """HTTP only: the route exists, not with this method (Starlette raises
    its own; this class carries the code and status for the catalogue)."""

    code = "method_not_allowed"
    http_status = 405


#: The one catalogue of error codes, in the order docs/protocol.md lists
#: them: every other list (the wire codes, HTTP's status -> code map, the
#: metrics' labels) is derived from it.
CATALOGUE: tuple[type[ChatError], ...] = (
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    TooLarge,
    RateLimited,
    Unavailable,
    Internal,
    # HTTP only (never in a WebSocket error frame):
    Conflict,
    MethodNotAllowed,
)
_HTTP_ONLY = (Conflict, MethodNotAllowed)

#: Every code a WebSocket ``error`` frame may carry.
WIRE_CODES = tuple(c.code for c in CATALOGUE if c not in _HTTP_ONLY)
#: The codes only HTTP answers with.
HTTP_ONLY_CODES = tuple(c.code for c in _HTTP_ONLY)
#: Every code, WebSocket and HTTP.
ALL_CODES = tuple(c.code for c in CATALOGUE)
#: HTTP status -> code (one code per status: 500 is ``internal``).
HTTP_CODES = {c.http_status: c.code for c in CATALOGUE}
