"""Close-code choices for WebSockets (chatd.net.ws_close), without sockets."""

import pytest

from chatd.net import ws_close as close


@pytest.mark.parametrize(
    ("peer_code", "answer"),
    [
        (1000, (1000, "")),
        (1001, (1001, "")),
        (4000, (4000, "")),
        # No code in the peer's close frame, or none that may be sent back.
        (1005, (1000, "")),
        (1006, (1000, "")),
    ],
)
def test_a_peer_close_is_echoed(peer_code, answer):
    assert close.answer_to_peer_close(peer_code) == answer


@pytest.mark.parametrize(
    ("authenticated", "auth_timeout", "message", "closing"),
    [
        (False, 10.0, "no auth within 10 s", (4001, "no auth")),
        (False, 0.5, "no auth within 0.5 s", (4001, "no auth")),
        (True, 10.0, "token expired", (4001, "token expired")),
    ],
)
def test_a_passed_deadline_closes_unauthorized_and_says_why(
    authenticated, auth_timeout, message, closing
):
    assert close.on_deadline(authenticated, auth_timeout) == (message, closing)


@pytest.mark.parametrize(
    ("code", "handshakes"),
    [
        (1000, True),
        (1001, True),
        (1011, True),
        (close.CLOSE_UNAUTHORIZED, True),
        (close.CLOSE_TOO_SLOW, True),
        (close.CLOSE_LOST, False),
    ],
)
def test_only_a_lost_connection_skips_the_closing_handshake(code, handshakes):
    assert close.handshakes(code) is handshakes


@pytest.mark.parametrize(
    ("dropping", "timeout"),
    [(True, close.DROP_GRACE), (False, close.CLOSE_TIMEOUT * 5)],
)
def test_drain_timeout(dropping, timeout):
    assert close.drain_timeout(dropping) == timeout


def test_codes():
    assert (close.CLOSE_UNAUTHORIZED, close.CLOSE_TOO_SLOW, close.CLOSE_TOO_MANY) == (
        4001,
        4008,
        4029,
    )
    assert close.LOST == (1006, "connection lost")
