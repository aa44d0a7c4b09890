"""glibc malloc tuning for CPU training: keep freed memory mapped, and bound what is kept.

XLA:CPU allocates a step's temporaries afresh each step. By default glibc serves large blocks
(and threads' blocks) with mmap and unmaps them on free, so every step faults its working set
back in page by page (docs/benchmarks.md has the cost). One arena, no mmap and no trimming
keep the pages mapped, as PyTorch's caching allocators do. A heap that is never trimmed can
fragment, though, and grow by a step's worth at a time; a background thread hands free pages
back when the heap grows although it holds plenty of free memory.
Linux/glibc only; `LM_RETAIN_FREED_MEMORY=0` opts out.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import time

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _libc() -> ctypes.CDLL | None:
    if os.environ.get("LM_RETAIN_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(None)


def retain_freed_memory() -> bool:
    """One arena, no mmap, never trim; returns whether glibc took the settings."""
    libc = _libc()
    return libc is not None and all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


class MemoryBound:
    """Trims the heap when it grew past its largest size while it held over `minimum` free
    bytes: the new block fitted none of the free ones (fragmentation), and an untrimmed heap
    would go on growing by a step's worth. A heap holding its working set steady never passes
    its largest size (refilling what a trim returned does not count), so it is never trimmed;
    sampling the heap's size, not its in-use peak, makes that independent of when samples fall."""

    def __init__(self, minimum: int = 256 << 20):
        self.libc = ctypes.CDLL(None)
        self.libc.mallinfo2.restype = _MallInfo2
        self.minimum, self.trims = minimum, 0
        self.largest, self.free = self._sample()

    def _sample(self) -> tuple[int, int]:
        info = self.libc.mallinfo2()
        return info.arena, info.fordblks  # bytes the heap holds, and how many of them are free

    def check(self) -> bool:
        """Sample the heap; trim if it grew despite its free memory. Returns whether it trimmed."""
        size, free = self._sample()
        grew, had_free = size > self.largest, self.free > self.minimum
        self.largest, self.free = max(self.largest, size), free
        if not (grew and had_free):
            return False
        self.libc.malloc_trim(0)
        self.trims += 1
        self.free = self._sample()[1]
        return True


def _watch(bound: MemoryBound, interval: float) -> None:
    while True:
        time.sleep(interval)
        bound.check()


def retain_within_bound(interval: float = 1.0) -> MemoryBound | None:
    """Retain freed memory and start the bounding thread, once per process; None where glibc
    is missing, opted out, or too old to report its heap (mallinfo2, glibc 2.33)."""
    global _bound
    libc = _libc()
    if _bound is None and libc is not None and hasattr(libc, "mallinfo2") and retain_freed_memory():
        _bound = MemoryBound()
        threading.Thread(target=_watch, args=(_bound, interval), daemon=True,
                         name="lm-memory-bound").start()
    return _bound


_bound: MemoryBound | None = None
