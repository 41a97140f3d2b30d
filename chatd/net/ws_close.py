"""How chatd's WebSockets end: the close codes, the closing handshake's
bounds, and the pure choices among them (tests/net/test_ws_close.py).

Close codes: 4001 unauthorized, 4008 too slow, 4029 too many connections,
1001 server going away or no pong, 1002/1007 protocol errors, 1011 internal
error; 1000 answers a peer's own close. 1006 is never sent: it marks a
connection that was lost, which ends without a closing handshake.

Guarantees:

* A peer's close is echoed with its own code (1000 when it gave none).
* A deadline that passes closes with 4001 and says why: no ``auth`` in time
  (before one) or the token expired (after).
* A closing handshake is bounded: our close frame (and what is queued before
  it) gets :data:`DROP_GRACE` seconds when the connection is dropped, else
  ``5 * CLOSE_TIMEOUT``; the peer's answer gets :data:`CLOSE_TIMEOUT`.
"""

from __future__ import annotations

from chatd import hub

#: 4001 (the token or the account is no longer good): one fact, in the hub,
#: which also closes sockets with it when told to (logout, disable).
CLOSE_UNAUTHORIZED = hub.CLOSE_UNAUTHORIZED
CLOSE_TOO_SLOW = 4008
#: Over a cap on live sockets (per account, per client address).
CLOSE_TOO_MANY = 4029
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL = 1011
CLOSE_NORMAL = 1000
#: Never sent (RFC 6455): the peer went away without a close frame.
CLOSE_LOST = 1006
#: What a connection that was lost ends with (no closing handshake).
LOST = (CLOSE_LOST, "connection lost")

#: Seconds a dropped connection gets to finish the frame in hand.
DROP_GRACE = 5.0
#: Seconds for the peer's closing frame.
CLOSE_TIMEOUT = 2.0


def answer_to_peer_close(code: int) -> tuple[int, str]:
    """The close we answer a peer's close frame (``code``) with."""
    return (CLOSE_NORMAL if code in (1005, CLOSE_LOST) else code, "")


def on_deadline(authenticated: bool, auth_timeout: float) -> tuple[str, tuple[int, str]]:
    """The error frame's message and the close when the deadline in force
    passed: the auth deadline before ``auth``, the token's expiry after."""
    if not authenticated:
        return f"no auth within {auth_timeout:g} s", (CLOSE_UNAUTHORIZED, "no auth")
    return "token expired", (CLOSE_UNAUTHORIZED, "token expired")


def handshakes(code: int) -> bool:
    """Whether closing with ``code`` sends a close frame (not for a lost connection)."""
    return code != CLOSE_LOST


def drain_timeout(dropping: bool) -> float:
    """Seconds our close frame, and what is queued before it, may take to go out."""
    return DROP_GRACE if dropping else CLOSE_TIMEOUT * 5
