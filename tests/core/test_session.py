"""The per-connection state machine, driven without a socket or a clock."""

import pytest

from chatd.core.delivery import message_order, receipt_order
from chatd.core.errors import BadRequest, RateLimited, Unauthorized
from chatd.core.frames import Ack, Auth, Ping, Send, Typing
from chatd.core.session import TRANSITIONS, Outbound, Phase, Session, SlowConsumer


def msg(key, conv="c", seq=1):
    return Outbound(f"text-{key}".encode(), key, message_order(conv, seq))


def test_only_auth_before_authentication():
    s = Session()
    for frame in (Ping(), Ack(), Send("c", "x", to="b"), Typing("dm:a:b")):
        with pytest.raises(Unauthorized):
            s.check(frame, 0)
    s.check(Auth("t"), 0)
    s.authenticated("alice")
    assert s.phase is Phase.BACKLOG and s.user == "alice"
    with pytest.raises(BadRequest):
        s.check(Auth("t"), 0)


def test_transitions_table():
    assert TRANSITIONS[(Phase.AUTH, "authenticated")] is Phase.BACKLOG
    assert TRANSITIONS[(Phase.BACKLOG, "backlog_done")] is Phase.LIVE
    s = Session()
    with pytest.raises(RuntimeError):
        s.finish_backlog()


def test_backlog_order_and_held_live_items():
    s = Session()
    s.authenticated("bob")
    # Live items during the backlog are held.
    assert s.offer(msg("m9", "b", 2)) == []
    assert s.offer(Outbound(b"typing")) == []
    backlog = [
        Outbound(b"r1", "r1", receipt_order(5, "r1")),
        msg("m3", "b", 1),
        msg("m2", "a", 2),
        msg("m1", "a", 1),
        msg("m9", "b", 2),
    ]
    assert [i.key for i in s.backlog(backlog)] == ["m1", "m2", "m3", "m9", "r1"]
    # m9 came in the backlog too: released once.
    assert [i.data for i in s.finish_backlog()] == [b"typing"]
    assert s.phase is Phase.LIVE


def test_live_dedupe_until_settled():
    s = Session()
    s.authenticated("bob")
    s.finish_backlog()
    assert s.offer(msg("m1")) == [msg("m1")]
    assert s.offer(msg("m1")) == []
    s.settled(["m1"])
    assert s.offer(msg("m1")) == [msg("m1")]
    # Items that are never owed are never deduplicated.
    assert len(s.offer(Outbound(b"x"))) == len(s.offer(Outbound(b"x"))) == 1


def test_too_much_held_during_backlog_is_a_slow_consumer():
    s = Session(max_held=2)
    s.authenticated("bob")
    s.offer(msg("a"))
    s.offer(msg("b"))
    with pytest.raises(SlowConsumer):
        s.offer(msg("c"))


def test_rate_limit_meters_sends_and_typing_only():
    s = Session(rate=1.0, burst=2.0, now=0.0)
    s.authenticated("bob")
    s.check(Send("c1", "x", to="a"), 0.0)
    s.check(Typing("dm:a:bob"), 0.0)
    with pytest.raises(RateLimited) as info:
        s.check(Send("c3", "x", to="a"), 0.0)
    assert info.value.cid == "c3"
    for _ in range(10):
        s.check(Ack(ids=("x",)), 0.0)
        s.check(Ping(), 0.0)
    s.check(Send("c4", "x", to="a"), 1.0)  # one token back after a second


def test_closed_session_drops_everything():
    s = Session()
    s.authenticated("bob")
    s.offer(msg("a"))
    s.closed()
    assert s.offer(msg("b")) == []
    assert s.phase is Phase.CLOSED
