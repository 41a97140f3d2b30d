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
    └── Unavailable             (unavailable, 503)   store or broker did not answer

``cid`` is carried so that an error about a ``send`` names the message the
client tried to send.
"""

from __future__ import annotations


class ChatError(Exception):
    code = "internal"
    http_status = 500

    def __init__(self, message: str, *, cid: str | None = None, **extra: object) -> None:
        super().__init__(message)
        self.message = message
        self.cid = cid
        #: More fields for the wire (the error frame, the HTTP error object):
        #: ``reason``, ``missing`` and ``extra`` of an end-to-end refusal.
        self.extra: dict[str, object] = extra

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


#: Every wire code, in the order docs/protocol.md lists them.
WIRE_CODES = (
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "too_large",
    "rate_limited",
    "unavailable",
    "internal",
)
