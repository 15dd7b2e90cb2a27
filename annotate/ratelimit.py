"""Requests-per-minute and tokens-per-minute limits as async token buckets.

Token use is known only after the answer; callers acquire an estimate first and settle the
difference afterwards (`settle`), so a run of long answers slows the next requests down
instead of overrunning the provider's quota and collecting 429s.
"""

from __future__ import annotations

import asyncio
import time


class RateLimiter:
    """A token bucket refilled at `per_minute / 60` units per second (burst: 5 seconds' worth)."""

    def __init__(self, per_minute: float) -> None:
        if per_minute <= 0:
            raise ValueError("a rate limit must be positive")
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * 5.0)
        self._level = self.capacity
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self, amount: float = 1.0) -> None:
        """Wait until `amount` units are available and take them (FIFO among waiters)."""
        async with self._lock:
            need = min(amount, self.capacity)  # a request larger than the bucket waits for a full bucket
            while True:
                self._refill()
                if self._level >= need:
                    self._level -= amount
                    return
                await asyncio.sleep((need - self._level) / self.rate)

    def settle(self, delta: float) -> None:
        """Charge (positive) or refund (negative) the difference between estimate and actual use."""
        self._refill()
        self._level = min(self.capacity, self._level - delta)
