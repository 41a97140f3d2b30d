"""The zero-loss checker's bookkeeping, driven directly (the fault tests
trust its report and its figures)."""

from __future__ import annotations

import pytest

from harness import loss
from harness.loss import LossChecker


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(loss.time, "monotonic", lambda: now[0])
    return now


def frame(mid: str, seq: int) -> dict:
    return {"id": mid, "conversation": "c1", "seq": seq}


def test_report_counts_missing_duplicates_and_strangers():
    c = LossChecker()
    c.sent("m1", ["bob"])
    c.sent("m2", ["bob", "carol"])
    c.received("bob", "b1", frame("m1", 1))
    c.received("bob", "b1", frame("m1", 1))
    c.received("bob", "b1", frame("m2", 2))
    c.received("carol", "c1", frame("m9", 1))
    r = c.report()
    assert (r.sent, r.expected_deliveries, r.delivered) == (2, 3, 2)
    assert r.missing == [("carol", "m2")] and not r.ok
    assert (r.duplicates, r.unexpected, r.out_of_order) == (1, 1, 0)


def test_fault_figures_in_flight_and_longest_stall(clock):
    c = LossChecker()
    clock[0] = 1.0
    c.sent("m1", ["bob"])
    c.sent("m2", ["bob"])
    clock[0] = 1.5
    c.received("bob", "b1", frame("m1", 1))
    # The fault at t=2: m2 confirmed but not delivered; m3 not yet confirmed.
    clock[0] = 3.0
    c.sent("m3", ["bob"])
    clock[0] = 6.0
    c.received("bob", "b1", frame("m2", 2))
    clock[0] = 6.5
    c.received("bob", "b1", frame("m3", 3))
    assert c.undelivered_at(2.0) == 1
    assert c.undelivered_at(1.2) == 2
    assert c.longest_stall_after(2.0) == pytest.approx(4.0)
    assert c.longest_stall_after(6.2) == pytest.approx(0.3)
    assert c.longest_stall_after(7.0) == 0.0
