"""A token bucket driven by an explicit clock, so tests need no sleeping."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up. rate <= 0: no limit."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._tokens = self.burst
        self._stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        if self.rate <= 0:
            return True
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False


def fill_and_take(
    tokens: float, elapsed: float, want: int, rate: float, burst: int
) -> tuple[float, int, float]:
    """One step of a shared token bucket (the memory broker runs it; the
    Redis broker's TAKE script is the same arithmetic): refill ``tokens`` for
    ``elapsed`` seconds at ``rate`` up to ``burst``, take up to ``want``
    whole tokens. Returns (tokens left, taken, seconds until one is there
    when none was taken)."""
    tokens = min(float(burst), tokens + max(0.0, elapsed) * rate)
    taken = max(0, min(want, int(tokens)))
    tokens -= taken
    wait = 0.0 if taken else (1.0 - tokens) / rate if rate > 0 else float("inf")
    return tokens, taken, wait
