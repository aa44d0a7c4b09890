"""Run outputs: the CPU peak under this process's conditions, MFU at most 1, TensorBoard events
that a kill and a resume leave with every step once."""

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from lm import metrics


def tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of each scalar tag as TensorBoard shows the log dir: event files in name
    order, a SessionLog START at step s (a writer's `purge_step`) hiding earlier events at steps
    >= s; a record cut short by a kill ends its file. Duplicates are kept, to be seen."""
    from tensorboardX.proto import event_pb2

    seen: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):  # TFRecord: u64 length, u32 crc, data, u32 crc
            (n,) = struct.unpack("<Q", data[i:i + 8])
            if i + 12 + n + 4 > len(data):
                break
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                seen = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in seen.items()}
            for value in event.summary.value:
                seen.setdefault(value.tag, []).append((event.step, value.simple_value))
    return seen


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache root, no peak known to this process, and a 'measurement' of 1e9 FLOP/s per
    thread this process may use."""
    monkeypatch.setenv("LM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(metrics, "_cpu_peaks", {})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(metrics, "measure_cpu_peak", lambda: 1e9 * metrics.cpu_threads())
    return tmp_path / "cpu_peak.json"


def test_cpu_peak_is_measured_per_thread_count(cache, monkeypatch):
    """A single-threaded sweep worker measures (and caches) its own peak; a process that may use
    every core does not divide by that one-core figure."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1 "
                                    "--xla_cpu_multi_thread_eigen=false")
    assert metrics.device_peak_flops() == pytest.approx(1e9)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    assert metrics.device_peak_flops() == pytest.approx(4e9)
    assert sorted(json.loads(cache.read_text()).values()) == [1e9, 4e9]


def test_mfu_never_exceeds_one_and_a_beaten_peak_rises(cache, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert metrics.utilization(2e9, 1) == pytest.approx(0.5)
    assert metrics.utilization(6e9, 1) == 1.0  # faster than the measured peak
    assert metrics.device_peak_flops() == pytest.approx(6e9)
    monkeypatch.setattr(metrics, "_cpu_peaks", {})  # another process reads the raised peak
    assert metrics.utilization(3e9, 1) == pytest.approx(0.5)
    assert list(json.loads(cache.read_text()).values()) == [6e9]


def test_a_damaged_peak_cache_is_measured_again(cache, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    cache.write_text("{not json")
    assert metrics.device_peak_flops() == pytest.approx(4e9)


def test_resume_keeps_every_step_once(tmp_path):
    """A writer killed after flushing (at a checkpoint) and a resume from step 20: metrics.jsonl
    and TensorBoard show steps 10..40 once each, the resumed run's values past 20, and a scalar
    that a log and an eval record share at one step once."""
    (tmp_path / "first").mkdir()
    first = metrics.MetricsWriter(tmp_path / "first", 0)
    for step in (10, 20, 30):
        first.write({"step": step, "loss": float(step), "tokens": step})
        first.write({"step": step, "eval_loss": -float(step), "tokens": step})
    first.flush()
    shutil.copytree(tmp_path / "first", tmp_path, dirs_exist_ok=True)  # killed here: what's on disk
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3')  # a line torn by the kill
    second = metrics.MetricsWriter(tmp_path, 20)
    for step in (30, 40):
        second.write({"step": step, "loss": step + 0.5, "tokens": step})
    second.close()
    scalars = tb_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(10, 10.0), (20, 20.0), (30, 30.5), (40, 40.5)]
    assert scalars["tokens"] == [(10, 10), (20, 20), (30, 30), (40, 40)]
    assert scalars["eval_loss"] == [(10, -10.0), (20, -20.0)]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [10, 10, 20, 20, 30, 40]
