"""Files that several processes may build at once: an exclusive lock, and writes that appear whole.

Every file is written to a temporary name in its own folder and renamed into place, so a reader
sees the old state or the complete new file, never a partial one; `file_lock` makes concurrent
builders wait for the first one instead of duplicating its work.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from lm.files import temporary_path

COPY_STEP = 1 << 24  # elements copied at a time from the raw stream into the .npy


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `<path>.lock` (created with its folder) for the block."""
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_array_atomic(path: Path, chunks: Iterable[np.ndarray], dtype: np.dtype) -> int:
    """Stream 1-D chunks into the flat .npy `path` without holding them all; returns its length."""
    raw, npy = temporary_path(path, ".raw"), temporary_path(path, ".npy")
    try:
        n = 0
        with open(raw, "wb") as f:
            for chunk in chunks:
                chunk = np.asarray(chunk, dtype=dtype)
                chunk.tofile(f)
                n += chunk.size
        out = np.lib.format.open_memmap(npy, mode="w+", dtype=dtype, shape=(n,))
        if n:
            src = np.memmap(raw, dtype=dtype, mode="r", shape=(n,))
            for i in range(0, n, COPY_STEP):
                out[i:i + COPY_STEP] = src[i:i + COPY_STEP]
            del src
        out.flush()
        del out
        os.replace(npy, path)
        return n
    finally:
        raw.unlink(missing_ok=True)
        npy.unlink(missing_ok=True)


def load_array(path: Path) -> np.ndarray:
    """A memory-mapped, read-only view of a .npy file (pages are read on demand)."""
    return np.asarray(np.load(path, mmap_mode="r"))
