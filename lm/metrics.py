"""Run outputs: metrics.jsonl, TensorBoard events, peaks and MFU."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from lm.files import (
    FileError,
    cache_root,
    file_lock,
    naming,
    read_json,
    write_bytes_atomic,
    write_json_atomic,
)

# Dense bf16 peak FLOP/s per device (the sparse figures are twice these).
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "gh200": 989e12, "a100": 312e12,
    "tpu v4": 275e12, "tpu v5p": 459e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12,
}
SINGLE_THREADED = re.compile(r"--xla_cpu_multi_thread_eigen=(false|0)\b", re.IGNORECASE)
_cpu_peaks: dict[str, float] = {}  # this process's view of the cache file, by `cpu_key()`


def measure_cpu_peak(n: int = 1024, repeats: int = 10) -> float:
    """Best fp32 FLOP/s of a jitted n×n matmul on this host's CPU, with this process's threads."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def cpu_threads() -> int:
    """Threads XLA's CPU math may use in this process: one with Eigen's thread pool off (a sweep
    worker, `experiments.launch.cpu_worker_env`), else the cores the process may run on."""
    if SINGLE_THREADED.search(os.environ.get("XLA_FLAGS", "")):
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_key() -> str:
    """What a CPU peak holds for: the host, its processor and the threads of this process."""
    return (f"{platform.node()}-{platform.processor() or platform.machine()}-{os.cpu_count()}"
            f"-threads{cpu_threads()}")


def cpu_peak(at_least: float = 0.0) -> float:
    """FLOP/s of this host's CPU with this process's threads: measured by the first process that
    asks under these conditions and cached in $LM_CACHE_DIR/cpu_peak.json; raised (for good) to
    `at_least`, a rate a run achieved, so no later MFU divides by a figure already beaten."""
    key = cpu_key()
    if _cpu_peaks.get(key, -1.0) >= at_least:
        return _cpu_peaks[key]
    path = cache_root() / "cpu_peak.json"
    with file_lock(path):
        try:
            cached = read_json(path)
        except FileError:  # absent or damaged: measure again
            cached = {}
        peak = cached.get(key)
        if not isinstance(peak, int | float) or not math.isfinite(peak) or peak <= 0:
            peak = measure_cpu_peak()
        if cached.get(key) != max(peak, at_least):
            cached[key] = peak = max(peak, at_least)
            write_json_atomic(path, cached)
    _cpu_peaks[key] = peak
    return peak


def device_peak_flops(device: jax.Device | None = None) -> float:
    """Peak FLOP/s of one device: the table for accelerators, `cpu_peak` for CPU."""
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak
    if device.platform != "cpu":
        return float("nan")  # unknown accelerator: MFU is reported as NaN, not guessed
    # Virtual CPU devices share the host's cores: each gets its share of the peak.
    return cpu_peak() / jax.local_device_count()


def utilization(flops_per_second: float, devices: int) -> float:
    """MFU of a rate achieved on `devices` devices, never above 1: on CPU a rate above the peak
    (measured while other work shared the cores) raises the cached peak to it."""
    peak = device_peak_flops() * devices
    if flops_per_second > peak and jax.devices()[0].platform == "cpu":
        cpu_peak(at_least=flops_per_second / devices * jax.local_device_count())
        peak = device_peak_flops() * devices
    return min(flops_per_second / peak, 1.0)


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line torn by a kill mid-write."""
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None


class MetricsWriter:
    """Appends JSON lines and TensorBoard scalars; a no-op on processes other than 0.

    A resumed run continues from its checkpoint at `resume_step`: lines past it are dropped and
    TensorBoard is told to purge the events past it (`purge_step`), so every step appears once.
    """

    def __init__(self, workdir: Path, resume_step: int):
        self.active = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.logdir = workdir / "tensorboard"
        self.tb = None
        # A fresh run has nothing to purge (and a purge marker at step 1 would hide its events).
        self.purge = resume_step + 1 if resume_step else None
        self.written: dict[str, int] = {}  # TensorBoard tag -> last step written
        if self.active and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if (step := _step_of(line)) is not None and step <= resume_step]
            write_bytes_atomic(self.path, "".join(f"{line}\n" for line in keep).encode())

    def _events(self):
        """The open event file; a new one after each flush, the first of a resume purging."""
        if self.tb is None:
            from tensorboardX import SummaryWriter

            # Files sort by the second they open in, then by this suffix: a file opened later,
            # by this process or a restart within the same second, sorts after the earlier ones.
            with naming(self.logdir):
                self.tb = SummaryWriter(str(self.logdir), purge_step=self.purge, flush_secs=30,
                                        filename_suffix=f".{time.time_ns()}.{os.getpid()}")
            self.purge = None
        return self.tb

    def write(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl; each scalar once per step in TensorBoard."""
        if not self.active:
            return
        with naming(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and self.written.get(key, -1) < step:
                with naming(self.logdir):
                    self._events().add_scalar(key, value, step)
                self.written[key] = step

    def flush(self) -> None:
        """Put every TensorBoard event written so far on disk (at each checkpoint: a kill loses
        none the checkpoint covers). tensorboardX's own flush skips events still queued for its
        writer thread; only closing the file drains them, so the next write opens a new file."""
        self.close()

    def close(self) -> None:
        """Close the event file; a failure (a full disk) is an OSError naming the TensorBoard
        directory, and the writer is closed all the same (the next write opens a new file)."""
        if self.tb is not None:
            tb, self.tb = self.tb, None
            with naming(self.logdir):
                tb.close()


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
