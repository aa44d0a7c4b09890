"""Process setup shared by every entry point (quiet library logs, glibc keeping freed memory
for the CPU step) and the bound on that retained memory that the training loop applies."""

from __future__ import annotations

import ctypes
import os
import platform


def setup_process() -> None:
    """What every command-line entry point does first (train, sweep, sweep worker, bench,
    evaluate, generate)."""
    quiet_library_logs()
    retain_freed_memory()


def quiet_library_logs() -> None:
    """Keep the console to our own progress lines: library INFO chatter (Orbax saves, backend
    probing) goes, warnings and errors stay."""
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("jax", "orbax", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Orbax warns on every read-only open, which is how evaluate/generate/fine-tune read runs.
    logging.getLogger("absl").addFilter(lambda record: not any(
        s in record.getMessage() for s in ("Given directory is read only", "read_only=True")))


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_retaining = False  # set once retain_freed_memory() has changed this process's malloc


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    XLA:CPU allocates a step's temporaries afresh each step. By default glibc serves blocks
    above 32 MiB (and threads' blocks) with mmap and unmaps them on free, so every step faults
    its whole working set back in, one 4 KiB page at a time: on the benchmark VM a memory-bound
    op ran at 4.4 GB/s instead of 27, and the train step took 10 % (d=512) to 35 % (d=128)
    longer (see docs/benchmarks.md). One arena, no mmap and no trimming keep the pages mapped,
    as PyTorch's caching allocators do. A heap that is never trimmed can fragment, though: the
    step's temporaries (one 1.6 GB block at d=512) stop fitting the hole they left and the heap
    grows by a whole step's worth (RSS 2.4 -> 7.1 GB over 10 steps once), so the training loop
    bounds it with `RetainedMemoryBound`.

    Linux/glibc only (a no-op elsewhere); `LM_RETAIN_FREED_MEMORY=0` opts out. Returns whether
    the settings were applied.
    """
    global _retaining
    if os.environ.get("LM_RETAIN_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    _retaining = all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))  # -1: never trim
    return _retaining


def resident_bytes() -> int:
    """This process's resident set size (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class RetainedMemoryBound:
    """Keep a retaining process's RSS within `factor` times its RSS at the first `check()`.

    Call `check()` where the steps so far have finished (the training loop: each log, eval or
    save point; it reads /proc/self/statm). Past the bound, `malloc_trim`
    hands every free page back to the OS; the next step faults its temporaries in once and the
    heap holds them again. A no-op unless `retain_freed_memory()` applied its settings.
    """

    def __init__(self, factor: float = 2.0):
        self.factor, self.baseline, self.trims = factor, None, 0

    def check(self) -> bool:
        """Trim if RSS has grown past the bound; returns whether it did."""
        if not _retaining:
            return False
        rss = resident_bytes()
        if self.baseline is None:
            self.baseline = rss
            return False
        if rss <= self.factor * self.baseline:
            return False
        ctypes.CDLL(None).malloc_trim(0)
        self.trims += 1
        return True
