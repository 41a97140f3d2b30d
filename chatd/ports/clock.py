"""The clock port: wall-clock milliseconds, the wire's ``ts``."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock milliseconds since the Unix epoch (the wire's ``ts``)."""
        ...


def wall_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch: the one place that
    reads it (everything else takes a :class:`Clock`, or calls this)."""
    return time.time_ns() // 1_000_000


class SystemClock:
    """The real :class:`Clock`."""

    def now_ms(self) -> int:
        return wall_ms()
