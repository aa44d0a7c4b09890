"""Process setup shared by every entry point: quiet library logs, and the host-memory setting
that the CPU training step's speed depends on."""

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


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    XLA:CPU allocates a step's temporaries afresh each step. By default glibc serves blocks
    above 32 MiB (and threads' blocks) with mmap and unmaps them on free, so every step faults
    its whole working set back in, one 4 KiB page at a time: on the benchmark VM a memory-bound
    op ran at 4.4 GB/s instead of 27, and the train step took 10 % (d=512) to 35 % (d=128)
    longer (see docs/benchmarks.md). One arena, no mmap and no trimming keep the pages mapped, at the price
    of the process keeping its peak heap until it exits, as PyTorch's caching allocators do.

    Linux/glibc only (a no-op elsewhere); `LM_RETAIN_FREED_MEMORY=0` opts out. Returns whether
    the settings were applied.
    """
    if os.environ.get("LM_RETAIN_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))  # -1: never trim
