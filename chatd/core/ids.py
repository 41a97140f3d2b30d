"""Message ids: ULIDs, which sort by creation time.

The factory is monotonic within one process: two ids made in the same
millisecond still sort in the order they were made.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RAND_MAX = (1 << 80) - 1


def _encode(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


class UlidFactory:
    def __init__(
        self,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._clock_ms = clock_ms
        self._randbytes = randbytes
        self._last_ms = -1
        self._last_rand = 0

    def new(self) -> str:
        ms = self._clock_ms()
        if ms <= self._last_ms:
            # Same (or an earlier, if the wall clock stepped back) millisecond:
            # keep the last time and count up so ids still sort in order.
            ms = self._last_ms
            rand = self._last_rand + 1
            if rand > _RAND_MAX:
                ms += 1
                rand = int.from_bytes(self._randbytes(10), "big") >> 1
        else:
            rand = int.from_bytes(self._randbytes(10), "big")
        self._last_ms, self._last_rand = ms, rand
        return _encode(ms, 10) + _encode(rand, 16)


def ulid_time_ms(ulid: str) -> int:
    value = 0
    for ch in ulid[:10]:
        value = value * 32 + _ALPHABET.index(ch)
    return value
