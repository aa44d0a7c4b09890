"""Run outputs: metrics.jsonl, TensorBoard events, atomic JSON files, peaks and MFU."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from lm.files import cache_root, write_bytes_atomic, write_json_atomic

# Dense bf16 peak FLOP/s per device (the sparse figures are twice these).
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "gh200": 989e12, "a100": 312e12,
    "tpu v4": 275e12, "tpu v5p": 459e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12,
}


def measure_cpu_peak(n: int = 1024, repeats: int = 10) -> float:
    """Best fp32 FLOP/s of a jitted n×n matmul on this host's CPU (all threads)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def device_peak_flops(device: jax.Device | None = None) -> float:
    """Peak FLOP/s of one device: the table for accelerators, a cached measurement for CPU."""
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak
    if device.platform != "cpu":
        return float("nan")  # unknown accelerator: MFU is reported as NaN, not guessed
    key = f"{platform.node()}-{platform.processor() or platform.machine()}-{os.cpu_count()}"
    path = cache_root() / "cpu_peak.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    if key not in cached:
        cached[key] = measure_cpu_peak()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, cached)
    # Virtual CPU devices share the host's cores: each gets its share of the peak.
    return cached[key] / jax.local_device_count()


class MetricsWriter:
    """Appends JSON lines and TensorBoard scalars; a no-op on processes other than 0."""

    def __init__(self, workdir: Path, resume_step: int | None):
        self.active = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if not self.active:
            return
        if self.path.exists():  # drop lines past the checkpoint we resume from
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and resume_step is not None
                    and json.loads(line).get("step", 0) <= resume_step]
            write_bytes_atomic(self.path, "".join(f"{line}\n" for line in keep).encode())
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(workdir / "tensorboard"), flush_secs=30)

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
