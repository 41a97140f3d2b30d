"""Zero-loss accounting: did every message that got ``sent`` reach every
recipient? Plain bookkeeping, no I/O; the fault-injection tests and the
load tests feed it and assert on its report.
"""

from __future__ import annotations

from collections import defaultdict
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

    def sent(self, message_id: str, recipients: list[str] | tuple[str, ...]) -> None:
        """The server answered ``sent`` for this message: it is owed to these users."""
        self._sent_ids.add(message_id)
        for user in recipients:
            self._expected[user].add(message_id)

    def received(self, user: str, connection: str, frame: dict) -> None:
        """A ``message`` frame reached one of ``user``'s devices on ``connection``."""
        mid = frame["id"]
        got = self._got[user]
        got[mid] = got.get(mid, 0) + 1
        key = (connection, frame["conversation"])
        last = self._last_seq.get(key)
        if last is not None and frame["seq"] < last:
            self.out_of_order += 1
        self._last_seq[key] = max(last or 0, frame["seq"])

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
