"""Zero-loss accounting: did every message that got ``sent`` reach every
recipient? Plain bookkeeping, no I/O; the fault-injection tests and the
load tests feed it and assert on its report.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class LossReport:
    sent: int
    expected_deliveries: int
    delivered: int
    missing: list[tuple[str, str]]  # (recipient, message id)
    duplicates: int  # the same id delivered again to the same user
    out_of_order: int  # within one connection and conversation, a lower seq after a higher one
    unexpected: int  # ids nobody reported as sent to that user

    @property
    def ok(self) -> bool:
        return not self.missing

    def summary(self) -> str:
        return (
            f"sent={self.sent} expected={self.expected_deliveries} delivered={self.delivered}"
            f" missing={len(self.missing)} duplicates={self.duplicates}"
            f" out_of_order={self.out_of_order} unexpected={self.unexpected}"
        )


@dataclass
class LossChecker:
    _expected: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    _got: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    _last_seq: dict[tuple[str, str], int] = field(default_factory=dict)
    _sent_ids: set[str] = field(default_factory=set)
    out_of_order: int = 0
    #: time.monotonic() of each confirmation, and of each first delivery (user, id).
    _sent_at: dict[str, float] = field(default_factory=dict)
    _delivered_at: dict[tuple[str, str], float] = field(default_factory=dict)

    def sent(self, message_id: str, recipients: Sequence[str]) -> None:
        """The server answered ``sent`` for this message: it is owed to these users."""
        self._sent_at.setdefault(message_id, time.monotonic())
        self._sent_ids.add(message_id)
        for user in recipients:
            self._expected[user].add(message_id)

    def received(self, user: str, connection: str, frame: dict) -> None:
        """A ``message`` frame reached one of ``user``'s devices on ``connection``."""
        mid = frame["id"]
        self._delivered_at.setdefault((user, mid), time.monotonic())
        got = self._got[user]
        got[mid] = got.get(mid, 0) + 1
        key = (connection, frame["conversation"])
        last = self._last_seq.get(key)
        if last is not None and frame["seq"] < last:
            self.out_of_order += 1
        self._last_seq[key] = max(last or 0, frame["seq"])

    def undelivered_at(self, t: float) -> int:
        """Deliveries confirmed as sent by ``t`` that had not arrived by then."""
        return sum(
            1
            for user, ids in self._expected.items()
            for mid in ids
            if self._sent_at.get(mid, t + 1) <= t
            and self._delivered_at.get((user, mid), float("inf")) > t
        )

    def longest_stall_after(self, t: float) -> float:
        """The longest time after ``t`` during which no message reached anyone
        (from ``t`` to the first delivery, then between deliveries)."""
        times = sorted(d for d in self._delivered_at.values() if d >= t)
        gaps = [b - a for a, b in zip([t, *times], times, strict=False)]
        return max(gaps, default=0.0)

    def missing_for(self, user: str) -> set[str]:
        return self._expected[user] - set(self._got[user])

    def report(self) -> LossReport:
        missing = sorted(
            (user, mid)
            for user, ids in self._expected.items()
            for mid in ids - set(self._got.get(user, {}))
        )
        duplicates = sum(n - 1 for got in self._got.values() for n in got.values() if n > 1)
        delivered = sum(
            1
            for user, ids in self._expected.items()
            for mid in ids
            if mid in self._got.get(user, {})
        )
        unexpected = sum(
            1 for user, got in self._got.items() for mid in got if mid not in self._expected[user]
        )
        return LossReport(
            sent=len(self._sent_ids),
            expected_deliveries=sum(len(ids) for ids in self._expected.values()),
            delivered=delivered,
            missing=missing,
            duplicates=duplicates,
            out_of_order=self.out_of_order,
            unexpected=unexpected,
        )
