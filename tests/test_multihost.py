"""Multi-process training (2 CPU processes × 4 devices, gloo): a time-limit signal to one process
stops both at one step, the resume is exact; restoring onto another mesh."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from lm.checkpoint import load_run

from .conftest import ROOT
from .test_train import overrides

STEPS = 60


@pytest.fixture
def config(data_dir):
    from configs.train import get_config

    c = get_config()
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff = 32, 2, 2, 64
    c.data.data_dir = str(data_dir)
    c.data.seq_len, c.data.batch_size, c.data.eval_batches = 32, 8, 2
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = (
        STEPS, 10, STEPS, 30)
    c.optim.peak_lr = 1e-2
    return c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train_cmd(config, workdir, mesh, extra=()):
    return [sys.executable, "-m", "lm.train", "--config=configs/train.py",
            f"--workdir={workdir}", *overrides(config), f"--config.mesh.shape={mesh}", *extra]


def _env(devices: int) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _single_process(config, workdir, mesh, devices):
    proc = subprocess.run(_train_cmd(config, workdir, mesh), cwd=ROOT, env=_env(devices),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((workdir / "result.json").read_text())


def _two_processes(config, workdir, signal_process_1: bool):
    """Train on 2 processes × 4 devices; `signal_process_1`: USR2 to process 1 alone, once the
    run has logged (the time-limit notice, which both must obey at one and the same step)."""
    port = _free_port()
    procs = [subprocess.Popen(
        _train_cmd(config, workdir, "(1,8,1)", [f"--coordinator_address=localhost:{port}",
                                                "--num_processes=2", f"--process_id={i}"]),
        cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    if signal_process_1:
        deadline = time.time() + 240
        while not ((workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").read_text()):
            assert all(p.poll() is None for p in procs) and time.time() < deadline, [
                p.stdout.read() for p in procs if p.poll() is not None]
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGUSR2)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [75, 75] if signal_process_1 else [0, 0], outs
    return outs


@pytest.mark.slow
def test_two_processes_preempt_resume_and_restore_on_another_mesh(config, tmp_path):
    """Two processes (FSDP over 8 devices) train what one process on 8 devices, mesh (2, 2, 2),
    trains; USR2 to one of them stops both at one step and the resume is exact. That one-process
    run's checkpoint restores onto 4 devices, mesh (4, 1, 1), and trains on to the same result."""
    saved = tmp_path / "one"
    one = _single_process(config, saved, "(2,2,2)", 8)
    _two_processes(config, tmp_path / "uninterrupted", signal_process_1=False)
    uninterrupted = json.loads((tmp_path / "uninterrupted" / "result.json").read_text())
    workdir = tmp_path / "multi"
    _two_processes(config, workdir, signal_process_1=True)
    stopped = json.loads((workdir / "result.json").read_text())
    assert stopped["status"] == "preempted" and 10 <= stopped["steps"] < STEPS
    outs = _two_processes(config, workdir, signal_process_1=False)
    assert f"resumed from step {stopped['steps']}" in outs[0]
    result = json.loads((workdir / "result.json").read_text())
    assert result["status"] == "completed" and result["devices"] == 8
    # Resuming reproduces the uninterrupted two-process run exactly; one process differs only
    # by the order in which collectives sum floats, which 60 steps at lr 1e-2 amplify to ~1e-4.
    assert (result["train_loss"], result["eval_loss"]) == (
        uninterrupted["train_loss"], uninterrupted["eval_loss"])
    assert result["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-3)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))  # only process 0 writes

    moved = tmp_path / "moved"
    shutil.copytree(saved, moved)
    shutil.rmtree(moved / "checkpoints" / str(STEPS))
    restored = _single_process(config, moved, "(4,1,1)", 4)
    assert restored["status"] == "completed"
    assert restored["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
    a, b = load_run(saved)[2], load_run(moved)[2]
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_held_lock_stops_every_process_in_one_line(config, tmp_path):
    """While another live process (here, pytest itself) holds the workdir's lock, both processes
    of a two-process run stop promptly with the same one-line error: process 1 follows process 0's
    verdict instead of waiting for it in a collective until Gloo's deadline."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / ".lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
    port = _free_port()
    start = time.time()
    procs = [subprocess.Popen(
        _train_cmd(config, workdir, "(1,8,1)", [f"--coordinator_address=localhost:{port}",
                                                "--num_processes=2", f"--process_id={i}"]),
        cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [1, 1], outs
    assert time.time() - start < 60, outs
    expected = f"error: {workdir} is being trained by pid {os.getpid()} on {socket.gethostname()}"
    for out in outs:
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(expected), out
        assert "Traceback" not in out, out
    assert [p.name for p in workdir.iterdir()] == [".lock"]
