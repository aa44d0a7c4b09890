"""SLURM sweeps through submitit's real SLURM path, against the stand-in scheduler of tests/slurm:
a run on 2 nodes × 2 tasks, a requeue at the time limit, a job that dies, and the rerun."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

# submitit at collection: imported inside a test, its logging.config.dictConfig would close
# the handlers pytest captures that test's logs with.
import submitit  # noqa: F401, I001

from experiments import launch
from lm.files import run_dir, write_json_atomic

from .conftest import ROOT

SLURM = ROOT / "tests" / "slurm"


def _env(tmp_path, devices: int) -> dict:
    """The stand-in scheduler first on PATH, its state in tmp_path, `devices` CPU devices."""
    return dict(os.environ, PATH=f"{SLURM}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT),
                SLURM_STANDIN_DIR=str(tmp_path / "scheduler"), SLURM_STANDIN_PYTHON=sys.executable,
                JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _flags(data_dir, budget: float, shapes: str, *extra: str) -> list[str]:
    """A micro sweep: one budget, the given sizes, an eval only at the end."""
    return ["--config=configs/isoflop/tiny.py:untuned", f"--config.train.data.data_dir={data_dir}",
            "--config.train.data.seq_len=32", "--config.train.data.batch_size=8",
            "--config.train.data.eval_batches=2", "--config.train.train.log_every=10",
            "--config.train.train.eval_every=100000", "--config.train.train.checkpoint_every=100000",
            f"--config.budgets=({budget},)", f"--config.shapes=('{shapes}',)",
            "--config.slurm.gpus_per_node=0", "--config.slurm.cpus_per_task=1", "--analyse=false",
            *extra]


def _isoflop(sweep_dir, flags, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments.isoflop", f"--sweep_dir={sweep_dir}",
                             *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc, code: int = 0) -> str:
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == code, out
    return out


def _results(sweep_dir) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("runs/*/result.json")}


def _scheduler(tmp_path, command: str, *args: str) -> None:
    subprocess.run([str(SLURM / command), *args], env=_env(tmp_path, 1), check=True)


def _signal_when_training(tmp_path, sweep, proc, signals: dict[str, str], timeout=240) -> dict:
    """Signal each run's job as soon as that run trains, watching all at once (a run waiting
    behind another's signal could finish first); returns the runs' job ids."""
    jobs, start = {}, time.time()
    while len(jobs) < len(signals):
        for name in signals.keys() - jobs.keys():
            if (run_dir(sweep, name) / "metrics.jsonl").exists():
                jobs[name] = launch.read_status(sweep)[name]["job"]
                _scheduler(tmp_path, "scancel", f"--signal={signals[name]}", jobs[name])
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - start < timeout
        time.sleep(0.05)
    return jobs


@pytest.mark.slow
def test_run_on_two_nodes_with_two_tasks_each(tmp_path, data_dir):
    """Four processes × 2 devices train each run together: 8 devices, the losses of one process
    on 8 devices; the job carries the cluster settings and runs the setup lines first."""
    flags = _flags(data_dir, 1e9, "16x1", "--config.slurm.nodes=2", "--config.slurm.tasks_per_node=2",
                   "--config.slurm.account=lab", "--config.slurm.qos=high", "--config.slurm.mem=4G",
                   "--config.slurm.constraint=cpu", "--config.slurm.setup=('echo setup line ran',)",
                   "--config.slurm.additional_parameters=('comment=isoflop',)",
                   # the earlier, calmer recipe: the tiny one's LR and QK-norm grow gloo's summation
                   # order into 6e-4-5e-3 (relative) over these ~60 steps (docs/experiments.md, stability)
                   "--config.train.model.qk_norm=False", "--config.train.model.init_std=0.02",
                   "--config.train.optim.max_lr=0.02",
                   "--config.train.optim.warmup_frac=0.05", "--config.train.optim.z_loss=0.0")
    one = _isoflop(tmp_path / "one", [*flags, "--runner=local"], _env(tmp_path, 8))
    sweep = tmp_path / "multi"
    out = _finish(_isoflop(sweep, [*flags, "--runner=slurm"], _env(tmp_path, 2)))
    _finish(one)
    assert "submitted 1 job(s)" in out
    (name, result), = _results(sweep).items()
    assert result["status"] == "completed" and result["devices"] == 8
    # Float32 sums in another order (gloo's all-reduce across 4 processes against one process's
    # 8-device reduction): 3e-5 apart on some hosts.
    assert result["eval_loss"] == pytest.approx(_results(tmp_path / "one")[name]["eval_loss"], rel=2e-4)
    script = next((tmp_path / "scheduler" / "scripts").glob("*.sh")).read_text()
    for line in ("--nodes=2", "--ntasks-per-node=2", "--job-name=tiny", "--account=lab", "--qos=high",
                 "--mem=4G", "--constraint=cpu", "--comment=isoflop"):
        assert f"#SBATCH {line}\n" in script, script
    log = sweep / "runs" / f"{name}.log"  # process 0's console, named after the run
    assert log.is_symlink() and "setup line ran" in log.read_text() and "completed" in log.read_text()
    assert launch.read_status(sweep)[name]["state"] == "completed"


@pytest.mark.slow
def test_time_limit_requeue_dead_job_and_rerun(tmp_path, data_dir):
    """USR2 (the time limit) mid-run: saved, requeued, resumed, the uninterrupted result. A job
    killed without a result: the submitter goes on, records why, exits 1; the rerun trains it only."""
    flags = _flags(data_dir, 3e10, "16x1,24x1")
    env = _env(tmp_path, 1)
    reference = _isoflop(tmp_path / "reference", [*flags, "--runner=local"], env)
    sweep = tmp_path / "sweep"
    proc = _isoflop(sweep, [*flags, "--runner=slurm"], env)
    names = ["C3e10-N1.1e4", "C3e10-N1.9e4"]

    jobs = _signal_when_training(tmp_path, sweep, proc, dict(zip(names, ("USR2", "KILL"), strict=True)))
    out = _finish(proc, 1)
    ref = _results(tmp_path / "reference") if reference.wait(300) == 0 else pytest.fail(
        reference.stdout.read())
    requeued, dead = names
    record = json.loads((tmp_path / "scheduler" / "jobs" / f"{jobs[requeued]}.json").read_text())
    assert record["starts"] == 2 and record["state"] == "COMPLETED"
    assert f"{requeued}: preempted, requeued" in out and "resumed from step" in (
        sweep / "runs" / f"{requeued}.log").read_text()
    result = _results(sweep)[requeued]
    assert (result["status"], result["steps"], result["train_loss"], result["eval_loss"]) == (
        "completed", ref[requeued]["steps"], ref[requeued]["train_loss"], ref[requeued]["eval_loss"])
    status = launch.read_status(sweep)
    assert status[requeued]["state"] == "completed"
    assert status[dead]["state"] == "failed" and "FAILED without a result" in status[dead]["reason"]
    assert f"{dead}: failed (job {jobs[dead]}; reason job {jobs[dead]} ended FAILED" in out
    kept = (run_dir(sweep, requeued) / "result.json").stat().st_mtime
    out = _finish(_isoflop(sweep, [*flags, "--runner=slurm"], env))
    assert "1 already done" in out and "submitted 1 job(s)" in out
    assert (run_dir(sweep, requeued) / "result.json").stat().st_mtime == kept
    assert _results(sweep)[dead]["eval_loss"] == ref[dead]["eval_loss"]


def test_rerun_waits_for_queued_jobs_and_leaves_locked_runs(tmp_path, monkeypatch):
    """A run whose job is still queued is waited for, a locked one left alone; the rest submitted."""
    env = _env(tmp_path, 1)
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("SLURM_STANDIN_DIR", env["SLURM_STANDIN_DIR"])
    script = tmp_path / "sleep.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --output={tmp_path}/%j.out\nsrun sleep 60\n")
    queued = subprocess.run([str(SLURM / "sbatch"), str(script)], env=env, check=True,
                            capture_output=True, text=True).stdout.split()[-1]
    try:
        write_json_atomic(tmp_path / launch.STATUS, {"runs": {
            "queued": {"state": "submitted", "job": queued}, "ended": {"state": "failed", "job": "1"}}})
        busy = run_dir(tmp_path, "busy")  # locked by a live process of this host
        busy.mkdir(parents=True)
        (busy / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(),
                                                "since": time.time()}))
        jobs, fresh = launch.triage(tmp_path, ["queued", "ended", "busy", "new"])
        assert list(jobs) == ["queued"] and jobs["queued"].job_id == queued
        assert fresh == ["ended", "new"]
    finally:
        _scheduler(tmp_path, "scancel", queued)
