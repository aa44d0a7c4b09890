"""Paths, caches and writes that several processes may race on.

Every file is written to a temporary sibling, fsynced, then renamed, so readers (and a job
killed mid-write) see the old version or the new one, never half a file; `file_lock` makes
concurrent builders of one cache wait for the first instead of duplicating its work.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from lm.config import ConfigError

COPY_STEP = 1 << 24  # elements copied at a time from a raw stream into its .npy
HEARTBEAT_SECONDS = 10.0  # a RunLock's holder touches it this often
STALE_SECONDS = 120.0  # a lock untouched this long (or whose holder died on this host) is broken


def cache_root() -> Path:
    """The one cache root: $LM_CACHE_DIR, else ~/.cache/lm (kernels, CPU peak, default data)."""
    return Path(os.environ.get("LM_CACHE_DIR", Path.home() / ".cache" / "lm")).expanduser()


def run_dir(sweep_dir: str | Path, name: str) -> Path:
    """The workdir of run `name` in a sweep."""
    return Path(sweep_dir) / "runs" / name


class FileError(ConfigError):
    """A run or sweep file that is missing, unreadable or malformed; the message names the file."""


def read_json(path: str | Path, kind: type = dict, keys: Iterable[str] = ()) -> Any:
    """The JSON in `path`, checked to be a `kind` holding `keys`; a `FileError` naming it if not."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(obj, kind):
        raise FileError(f"{path}: expected a JSON {kind.__name__}, found {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise FileError(f"{path}: missing {', '.join(map(repr, missing))}")
    return obj


def _merged(base: dict, saved: dict) -> dict:
    return {**base, **{k: _merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict)
                       else v for k, v in saved.items()}}


def config_from_json(obj: dict) -> ml_collections.ConfigDict:
    """A run config read back from JSON (config.json, plan.json) over today's defaults, so a
    run saved before a field existed reads with that field's default; tuples restored."""
    from lm.config import defaults

    config = ml_collections.ConfigDict(_merged(defaults().to_dict(), obj))
    config.mesh.shape = tuple(config.mesh.shape)
    config.train.save_steps = tuple(config.train.save_steps)
    return config


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """An OSError in the block names `path`, the file it writes (a write or fsync on a full disk
    names none; a temporary sibling's name means nothing to a user), so `lm.cli.run` can say
    which path failed and why."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def temporary_path(path: Path, suffix: str = ".tmp") -> Path:
    """A unique sibling of `path` (same filesystem, so os.replace is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with naming(path), open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _strict(obj: Any) -> Any:
    """NaN and inf become null, so the file is strict JSON for every reader."""
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Strict JSON (NaN -> null), sorted keys, written atomically."""
    text = json.dumps(_strict(obj), indent=2, sort_keys=True, allow_nan=False)
    write_bytes_atomic(path, text.encode())


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


class RunLock:
    """An exclusive, heartbeat-refreshed `.lock` file in a run directory: one process trains a run.

    Re-entrant within a process (a sweep worker holds its run's lock, and `train` takes it again);
    broken when its holder died on this host or stopped refreshing it (another host).
    """

    _held: dict[Path, int] = {}  # lock path -> acquisitions by this process

    def __init__(self, directory: str | Path):
        self.path = Path(directory).absolute() / ".lock"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> str:
        """Who holds the lock, for messages: 'pid P on HOST since T'."""
        try:
            owner = json.loads(self.path.read_text())
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["since"]))
            return f"pid {owner['pid']} on {owner['host']} since {since}"
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            return "an unknown process"

    def held(self) -> bool:
        """Whether a live process holds the lock (looking only: nothing is taken or broken)."""
        return self.path.exists() and not self._stale()

    def _stale(self) -> bool:
        try:
            owner = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except (FileNotFoundError, json.JSONDecodeError):
            return True  # vanished, or half-written by a dead process
        if isinstance(owner, dict) and owner.get("host") == socket.gethostname():
            try:
                os.kill(owner["pid"], 0)
            except ProcessLookupError:
                return True
            except (PermissionError, KeyError, TypeError):
                pass
        return age > STALE_SECONDS

    def acquire(self) -> bool:
        """Take the lock (True), or find it held by a live process elsewhere (False)."""
        if self.path in RunLock._held:
            RunLock._held[self.path] += 1
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._stale():
                    return False
                # Break the stale lock atomically: only one contender wins the rename.
                grave = self.path.with_name(f".lock.stale.{os.getpid()}")
                try:
                    os.rename(self.path, grave)
                    grave.unlink()
                except FileNotFoundError:
                    pass
                continue
            try:
                with naming(self.path), os.fdopen(fd, "w") as f:
                    json.dump({"host": socket.gethostname(), "pid": os.getpid(),
                               "since": time.time()}, f)
            except BaseException:
                self.path.unlink(missing_ok=True)  # a half-written lock would block the run
                raise
            RunLock._held[self.path] = 1
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
            return True
        return False

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        """Undo one `acquire`; the last one stops the heartbeat and removes the file."""
        count = RunLock._held.get(self.path, 0) - 1
        if count > 0:
            RunLock._held[self.path] = count
            return
        RunLock._held.pop(self.path, None)
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.path.unlink(missing_ok=True)


def write_array_atomic(path: Path, chunks: Iterable[np.ndarray], dtype: np.dtype) -> int:
    """Stream 1-D chunks into the flat .npy `path` without holding them all; returns its length.

    The chunks go to a raw temporary file (their count is unknown until the end), then into the
    .npy with its space reserved first, so a full disk is an OSError naming `path`, never a
    SIGBUS in a memory map; no temporary file outlives the call.
    """
    raw, npy = temporary_path(path, ".raw"), temporary_path(path, ".npy")
    dtype = np.dtype(dtype)
    try:
        n = 0
        with naming(path), open(raw, "wb") as f:
            for chunk in chunks:
                chunk = np.asarray(chunk, dtype=dtype)
                chunk.tofile(f)
                n += chunk.size
        with naming(path), open(npy, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {
                "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)})
            if n:
                f.flush()
                os.posix_fallocate(f.fileno(), f.tell(), n * dtype.itemsize)
                src = np.memmap(raw, dtype=dtype, mode="r", shape=(n,))
                for i in range(0, n, COPY_STEP):
                    src[i:i + COPY_STEP].tofile(f)
                del src
            f.flush()
            os.fsync(f.fileno())
        os.replace(npy, path)
        return n
    finally:
        raw.unlink(missing_ok=True)
        npy.unlink(missing_ok=True)


def load_array(path: Path) -> np.ndarray:
    """A memory-mapped, read-only view of a .npy file (pages are read on demand)."""
    return np.asarray(np.load(path, mmap_mode="r"))
