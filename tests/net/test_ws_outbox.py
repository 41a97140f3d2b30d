"""Outbox accounting and the too-slow rule (chatd.net.ws_outbox), without sockets."""

import pytest

from chatd.net.ws_outbox import (
    BACKLOG_HIGH_BYTES,
    BACKLOG_HIGH_FRAMES,
    OUTBOX_BYTES,
    OUTBOX_FRAMES,
    SLOW_SHARE,
    Outbox,
    OutboxBudget,
    backlog_full,
    too_slow,
)


@pytest.mark.parametrize(
    ("frames", "queued", "per_connection", "total", "process_queued", "slow"),
    [
        # Within its own bounds, the process under (or without) a total.
        (0, 0, OUTBOX_BYTES, 0, 0, False),
        (OUTBOX_FRAMES, OUTBOX_BYTES, OUTBOX_BYTES, 0, 10 * OUTBOX_BYTES, False),
        # Past its own bounds: frames, or bytes (the budget's per_connection).
        (OUTBOX_FRAMES + 1, 10, OUTBOX_BYTES, 0, 0, True),
        (1, OUTBOX_BYTES + 1, OUTBOX_BYTES, 0, 0, True),
        (1, 1001, 1000, 0, 0, True),
        (1, 1000, 1000, 0, 0, False),
        # The process over its total: only a connection holding SLOW_SHARE.
        (1, SLOW_SHARE, OUTBOX_BYTES, 100, 101, True),
        (1, SLOW_SHARE - 1, OUTBOX_BYTES, 100, 101, False),
        # At the total is not over it.
        (1, SLOW_SHARE, OUTBOX_BYTES, 100, 100, False),
        # No total (0): never over, however much the process holds.
        (1, SLOW_SHARE, OUTBOX_BYTES, 0, 10**9, False),
    ],
)
def test_too_slow(frames, queued, per_connection, total, process_queued, slow):
    budget = OutboxBudget(per_connection=per_connection, total=total)
    budget.queued = process_queued
    assert too_slow(frames, queued, budget) is slow


@pytest.mark.parametrize(
    ("frames", "queued", "full"),
    [
        (0, 0, False),
        (BACKLOG_HIGH_FRAMES, BACKLOG_HIGH_BYTES, False),
        (BACKLOG_HIGH_FRAMES + 1, 0, True),
        (1, BACKLOG_HIGH_BYTES + 1, True),
    ],
)
def test_backlog_full(frames, queued, full):
    assert backlog_full(frames, queued) is full


def test_backlog_waits_well_before_a_device_is_too_slow():
    assert BACKLOG_HIGH_FRAMES < OUTBOX_FRAMES
    assert BACKLOG_HIGH_BYTES < OUTBOX_BYTES


def counts(outbox: Outbox) -> tuple[int, int, int]:
    return outbox.frames, outbox.bytes, outbox.budget.queued


#: Steps on one outbox (sharing a budget that already holds 100 bytes of
#: another connection's), and its (frames, bytes, budget.queued) after each.
STEPS = [
    ([("append", b"aaaa"), ("append", b"bb")], (2, 6, 106)),
    # Part of the head went out: its rest stays at the head.
    ([("append", b"aaaa"), ("sent", 1)], (1, 3, 103)),
    # All of the head went out: it is gone.
    ([("append", b"aaaa"), ("append", b"bb"), ("sent", 4)], (1, 2, 102)),
    ([("append", b"aaaa"), ("sent", 1), ("sent", 3)], (0, 0, 100)),
    # Discard keeps the rest of a frame already begun, drops the others.
    ([("append", b"aaaa"), ("append", b"bb"), ("sent", 1), ("discard",)], (1, 3, 103)),
    # ... and drops everything when none was begun.
    ([("append", b"aaaa"), ("append", b"bb"), ("discard",)], (0, 0, 100)),
    # A frame queued as a memoryview (the rest of one the socket took part of).
    ([("append", memoryview(b"aaaa")[1:]), ("append", b"bb"), ("discard",)], (1, 3, 103)),
    ([("discard",)], (0, 0, 100)),
    ([("append", b"aaaa"), ("sent", 1), ("clear",)], (0, 0, 100)),
]


@pytest.mark.parametrize(("steps", "expected"), STEPS)
def test_outbox_counts_in_itself_and_in_the_budget(steps, expected):
    budget = OutboxBudget()
    budget.queued = 100
    outbox = Outbox(budget)
    for name, *args in steps:
        getattr(outbox, name)(*args)
    assert counts(outbox) == expected
    assert bool(outbox) is (expected[0] > 0)


def test_outbox_sends_in_order_and_says_when_a_chunk_is_done():
    outbox = Outbox(OutboxBudget())
    outbox.append(b"abcd")
    outbox.append(b"ef")
    out = []
    for count in (1, 3, 2):
        out.append(bytes(outbox.head()[:count]))
        done = outbox.sent(count)
        assert done is (count != 1)
    assert b"".join(out) == b"abcdef"
    assert counts(outbox) == (0, 0, 0)


def test_discard_keeps_the_exact_rest_of_a_begun_frame():
    outbox = Outbox(OutboxBudget())
    outbox.append(b"abcd")
    outbox.append(b"ef")
    outbox.sent(1)
    outbox.discard()
    assert bytes(outbox.head()) == b"bcd"
