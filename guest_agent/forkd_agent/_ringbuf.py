"""A bounded byte buffer addressed by absolute offsets.

A process's output is one endless byte sequence per fd; the buffer keeps its
newest ``capacity`` bytes. Offset N always names the same byte, whoever reads
it and however much has been evicted since, so clients can resume at the exact
byte they last saw.

Each appended run of bytes may carry a *stamp* (any comparable value). The
process table stamps reads with a counter that moves when output switches fds,
so a reader of several buffers can replay stdout and stderr interleaved in the
order they were produced.
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import Any

__all__ = ["RingBuffer"]

_CHUNK = 64 * 1024
# Alternating single-byte writes to two fds would otherwise cost one mark per
# byte; past this many, the oldest runs merge (their relative order is lost).
_MAX_MARKS = 4096


class RingBuffer:
    def __init__(self, capacity: int = 4 * 1024 * 1024) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.start = 0  # offset of the oldest retained byte
        self.end = 0  # offset one past the newest byte
        # Small writes coalesce into chunks of up to _CHUNK bytes, so a 4 MiB
        # buffer is a few dozen objects however the producer wrote.
        self._chunks: deque[bytearray] = deque()
        self._head_skip = 0  # bytes at the front of _chunks[0] already evicted
        self._mark_offsets: list[int] = []
        self._mark_stamps: list[Any] = []

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def free(self) -> int:
        return self.capacity - len(self)

    def append(self, data: bytes, stamp: Any = None) -> None:
        """Add bytes at the end, evicting the oldest ones beyond capacity."""
        if not data:
            return
        if not self._mark_stamps or self._mark_stamps[-1] != stamp:
            self._mark_offsets.append(self.end)
            self._mark_stamps.append(stamp)
            if len(self._mark_offsets) > _MAX_MARKS:
                del self._mark_offsets[1]
                del self._mark_stamps[1]
        view = memoryview(data)
        if self._chunks and len(self._chunks[-1]) < _CHUNK:
            room = _CHUNK - len(self._chunks[-1])
            self._chunks[-1] += view[:room]
            view = view[room:]
        while view:
            self._chunks.append(bytearray(view[:_CHUNK]))
            view = view[_CHUNK:]
        self.end += len(data)
        if len(self) > self.capacity:
            self.discard_before(self.end - self.capacity)

    def discard_before(self, offset: int) -> None:
        """Evict every byte before ``offset``."""
        offset = min(offset, self.end)
        n = offset - self.start
        if n <= 0:
            return
        while n:
            head = self._chunks[0]
            avail = len(head) - self._head_skip
            if n >= avail:
                self._chunks.popleft()
                self._head_skip = 0
                n -= avail
            else:
                self._head_skip += n
                n = 0
        self.start = offset
        # Keep the mark of the run that contains ``start``.
        k = bisect.bisect_right(self._mark_offsets, offset) - 1
        if k > 0:
            del self._mark_offsets[:k]
            del self._mark_stamps[:k]
        if self.start == self.end:
            self._mark_offsets.clear()
            self._mark_stamps.clear()

    def clear(self) -> None:
        """Evict everything; offsets keep counting from where they were."""
        self.discard_before(self.end)

    def read(self, offset: int, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` bytes from ``offset`` (which must be retained or ``end``)."""
        if not self.start <= offset <= self.end:
            raise ValueError(f"offset {offset} is outside [{self.start}, {self.end}]")
        want = min(max_bytes, self.end - offset)
        if want <= 0:
            return b""
        pos = self.start
        out = bytearray()
        skip = self._head_skip
        for chunk in self._chunks:
            size = len(chunk) - skip
            if pos + size > offset:
                lo = skip + max(offset - pos, 0)
                take = min(len(chunk) - lo, want - len(out))
                out += chunk[lo : lo + take]
                if len(out) == want:
                    break
            pos += size
            skip = 0
        return bytes(out)

    def stamp_at(self, offset: int) -> tuple[Any, int]:
        """(stamp of the run holding ``offset``, offset where that run ends)."""
        i = bisect.bisect_right(self._mark_offsets, offset) - 1
        if i < 0:
            return None, self.end
        run_end = self._mark_offsets[i + 1] if i + 1 < len(self._mark_offsets) else self.end
        return self._mark_stamps[i], run_end
