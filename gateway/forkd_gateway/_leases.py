"""Sandbox leases: one timer task and a heap of deadlines, however many sandboxes there are.

``set(id, seconds)`` (re)arms a lease; ``discard(id)`` drops it. Changing a deadline pushes a new heap
entry and leaves the old one in place: entries that no longer match the current deadline are skipped
when they reach the top, and the heap is rebuilt when stale entries outnumber live ones.
Deadlines run on the event loop's monotonic clock, so changing the wall clock never expires anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable

__all__ = ["Leases"]

log = logging.getLogger("forkd.gateway.leases")


class Leases:
    def __init__(self, on_expire: Callable[[str], Awaitable[None]]) -> None:
        self._on_expire = on_expire
        self._deadlines: dict[str, float] = {}  # id -> loop time
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._expiring: set[asyncio.Task] = set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="forkd-leases")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for t in list(self._expiring):
            t.cancel()
        self._deadlines.clear()
        self._heap.clear()

    def set(self, key: str, seconds: float) -> float:
        """Arm ``key``'s lease to end ``seconds`` from now; returns the end as wall-clock time."""
        deadline = asyncio.get_running_loop().time() + seconds
        self._deadlines[key] = deadline
        earliest = not self._heap or deadline < self._heap[0][0]
        heapq.heappush(self._heap, (deadline, next(self._seq), key))
        if earliest:
            self._wake.set()  # the timer sleeps until the old earliest deadline: re-arm it
        if len(self._heap) > 2 * len(self._deadlines) + 64:
            self._heap = [(d, next(self._seq), k) for k, d in self._deadlines.items()]
            heapq.heapify(self._heap)
        return time.time() + seconds

    def remaining(self, key: str) -> float | None:
        deadline = self._deadlines.get(key)
        return None if deadline is None else deadline - asyncio.get_running_loop().time()

    def discard(self, key: str) -> None:
        self._deadlines.pop(key, None)

    def __len__(self) -> int:
        return len(self._deadlines)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            heap = self._heap
            while heap and heap[0][0] <= now:
                deadline, _, key = heapq.heappop(heap)
                if self._deadlines.get(key) != deadline:
                    continue  # re-armed or discarded since this entry was pushed
                del self._deadlines[key]
                t = loop.create_task(self._expire(key))
                self._expiring.add(t)
                t.add_done_callback(self._expiring.discard)
            self._wake.clear()
            timeout = heap[0][0] - now if heap else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _expire(self, key: str) -> None:
        try:
            await self._on_expire(key)
        except Exception:
            log.exception("expiring %s failed", key)
