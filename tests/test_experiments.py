"""IsoFLOP sweeps: planning, running, resuming, locking, SLURM settings, errors (SLURM runs:
test_slurm.py)."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from configs.isoflop import tiny
from experiments.plan import plan
from lm.config import ConfigError
from lm.files import RunLock, run_dir

from .conftest import ROOT


def micro_sweep(data_dir):
    """2 budgets × 3 sizes of very small models: a whole sweep in well under a minute."""
    c = tiny.get_config("untuned")
    c.train.data.data_dir = str(data_dir)
    c.train.data.seq_len, c.train.data.batch_size, c.train.data.eval_batches = 32, 8, 2
    c.train.train.log_every, c.train.train.checkpoint_every = 10, 20
    c.budgets = (1.6e9, 4.8e9)
    c.shapes = ("8x1,16x1,24x1", "16x1,24x1,32x1")
    c.runner = "local"
    c.analysis.bootstrap = 20
    return c


@pytest.mark.parametrize("generated", [False, True])
def test_planner_meets_budgets_with_unique_names(generated):
    c = tiny.get_config("untuned")
    if generated:
        c.shapes, c.budgets = (), (1e15, 1e16, 1e17)
        c.train.data.seq_len, c.train.data.batch_size = 1024, 64
    runs = plan(c)
    assert len(runs) == len(c.budgets) * (c.sizes_per_budget if generated else 5)
    for r in runs:
        assert abs(r.flops / r.budget - 1) < 0.01, r.name
        assert r.config.train.steps == r.steps and r.tokens == r.steps * (
            r.config.data.batch_size * r.config.data.seq_len)
    assert len({r.name for r in runs}) == len(runs)
    assert runs[0].name == "C3e11-N1.1e4" or generated


def test_planned_models_follow_the_sizing_rules():
    from lm.sizing import model_for_shape

    for generated in (False, True):
        c = tiny.get_config("untuned")
        if generated:
            c.shapes, c.budgets = (), (1e15, 1e16)
        for r in plan(c):
            m = r.config.model
            assert m.to_dict() == model_for_shape(c.train.model, m.d_model, m.n_layers, head_dim=c.head_dim,
                                                  ffn_ratio=c.ffn_ratio).to_dict(), r.name


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c, "budgets", ()), r"budgets = \(\) .*at least one"),
    (lambda c: setattr(c, "budgets", (1e3, 1e12, 3e12)), r"budget 1e3 is too small for model 16x1"),
    (lambda c: setattr(c, "shapes", ("16x1,16x1,24x2", c.shapes[1], c.shapes[2])),
     r"duplicate model sizes \[\(16, 1\)\]"),
    (lambda c: setattr(c, "shapes", ("16by1", c.shapes[1], c.shapes[2])), r"shapes\[0\] = '16by1'"),
    (lambda c: setattr(c, "flops", "approx"), r"flops = 'approx'"),
])
def test_bad_sweep_configs(change, message):
    c = tiny.get_config("untuned")
    change(c)
    with pytest.raises(ConfigError, match=message):
        plan(c)


def _isoflop(sweep_dir, *args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.isoflop", f"--sweep_dir={sweep_dir}", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **(env or {})))


def _config_flags(c) -> list[str]:
    return ["--config=configs/isoflop/tiny.py:untuned",
            f"--config.train.data.data_dir={c.train.data.data_dir}",
            "--config.train.data.seq_len=32", "--config.train.data.batch_size=8",
            "--config.train.data.eval_batches=2", "--config.train.train.log_every=10",
            "--config.train.train.checkpoint_every=20", f"--config.budgets={c.budgets}",
            f"--config.shapes={c.shapes}", "--config.runner=local",
            "--config.analysis.bootstrap=20"]


def _eval_losses(sweep_dir):
    return {p.parent.name: json.loads(p.read_text())["eval_loss"]
            for p in sweep_dir.glob("runs/*/result.json")}


@pytest.mark.slow
def test_micro_sweep_end_to_end_killed_and_finished_by_two_runners(data_dir, tmp_path):
    """An uninterrupted micro sweep through the CLI, fitted and reported. The same sweep killed
    after two runs, then two runners at once: each missing run is trained by one of them (the
    interrupted one resumed from its checkpoint), no finished one again, both exit 0, and the
    results are those of the uninterrupted sweep."""
    c = micro_sweep(data_dir)
    ref_dir = tmp_path / "reference"
    proc = _isoflop(ref_dir, *_config_flags(c))
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    results = [json.loads(p.read_text()) for p in ref_dir.glob("runs/*/result.json")]
    assert len(results) == 6 and all(r["status"] == "completed" for r in results)
    fits = json.loads((ref_dir / "fits.json").read_text())
    assert fits["approach2"]["budgets_used"] == list(c.budgets) and "alpha" in fits["approach3"]
    # 3 sizes per budget cannot support a bootstrap interval: said, not printed as [nan, nan]
    assert "ci_skipped" in fits["approach2"] and "no bootstrap interval" in out and "nan" not in out
    for warning in fits["approach3"]["warnings"]:  # 6 points rarely pin down 5 parameters
        assert f"unreliable: {warning}" in out
    assert (ref_dir / "report.md").exists()
    assert "sweep: 6/6 done" in out and "report:" in out and "next budget" in out
    plan_file = json.loads((ref_dir / "plan.json").read_text())
    assert [r["name"] for r in plan_file["runs"]] == [r.name for r in plan(c)]

    sweep_dir = tmp_path / "sweep"
    proc = _isoflop(sweep_dir, *_config_flags(c), "--analyse=false")
    deadline = time.time() + 300
    while len(list(sweep_dir.glob("runs/*/result.json"))) < 2:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    finished = {p.parent.name for p in sweep_dir.glob("runs/*/result.json")}
    procs = [_isoflop(sweep_dir, *_config_flags(c), "--analyse=false") for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    for out in outs:  # the other runner may have finished one more before this one planned
        assert int(re.search(r"(\d+) already done", out)[1]) >= len(finished), out
    for r in plan(c):
        trained = sum(out.count(f"{r.name}: completed") for out in outs)
        assert trained == (r.name not in finished), (r.name, outs)
    assert _eval_losses(sweep_dir) == _eval_losses(ref_dir)


def test_progress_counts_locked_and_just_started_runs(tmp_path, capsys):
    from experiments.isoflop import Progress

    runs = plan(micro_sweep(tmp_path))
    locked = run_dir(tmp_path, runs[0].name)
    locked.mkdir(parents=True)
    (locked / ".lock").write_text("{}")
    Progress(tmp_path, runs)(started=[runs[1].name])  # launched, not yet holding its lock
    assert f"0/{len(runs)} done, 2 running, {len(runs) - 2} left" in capsys.readouterr().out


def test_stale_lock_is_taken_over(tmp_path):
    lock_dir = tmp_path / "run"
    lock_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (lock_dir / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid}))
    lock = RunLock(lock_dir)
    assert lock.acquire()
    other = subprocess.run([sys.executable, "-c", "import sys; from lm.files import RunLock; "
                            f"sys.exit(RunLock({str(lock_dir)!r}).acquire())"])
    assert other.returncode == 0  # a live holder in another process: refused
    assert f"pid {os.getpid()}" in lock.holder()
    again = RunLock(lock_dir)
    assert again.acquire()  # re-entrant in the holding process (a worker, then train)
    again.release()
    assert (lock_dir / ".lock").exists()
    lock.release()
    assert not (lock_dir / ".lock").exists()


@pytest.mark.parametrize("field, value, message", [
    ("nodes", 0, r"config.slurm.nodes = 0 is not allowed: must be a positive integer"),
    ("tasks_per_node", -1, r"config.slurm.tasks_per_node = -1 .*integer >= 0"),
    ("mem", "4 GB", r"config.slurm.mem = '4 GB' .*e.g. '64G'"),
    ("array_parallelism", 0, r"config.slurm.array_parallelism = 0 .*positive"),
    ("setup", ("module load cuda", 3), r"config.slurm.setup = .*shell lines"),
    ("additional_parameters", ("--mail-type=END",), r"'--mail-type=END' is not an sbatch option"),
])
def test_bad_slurm_settings(field, value, message):
    from experiments.launch import validate_slurm

    c = tiny.get_config("untuned")
    validate_slurm(c.slurm)
    c.slurm[field] = value
    with pytest.raises(ConfigError, match=message):
        validate_slurm(c.slurm)


def test_slurm_dry_run_prints_the_sbatch_script(tmp_path):
    proc = _isoflop(tmp_path / "sweep", "--config=configs/isoflop/tiny.py:untuned", "--dry_run",
                    "--runner=slurm", "--flops_per_second=1e9", "--config.slurm.nodes=2",
                    "--config.slurm.gpus_per_node=8",
                    "--config.slurm.account=lab", "--config.slurm.setup=('module load cuda',)",
                    "--config.slurm.additional_parameters=('exclusive', 'reservation=big')")
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    for line in ("#SBATCH --array=0-14%15", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --account=lab", "#SBATCH --job-name=tiny",
                 "#SBATCH --exclusive", "#SBATCH --reservation=big", "#SBATCH --signal=USR2@90",
                 "module load cuda", "-m submitit.core._submit"):
        assert line in out, out
    assert not (tmp_path / "sweep").exists()  # a dry run writes nothing
    proc = _isoflop(tmp_path / "sweep", "--dry_run", "--runner=slurm", "--config.slurm.mem=lots")
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1 and out.strip().splitlines()[-1].startswith(
        "error: config.slurm.mem = 'lots' is not allowed"), out


def test_subprocess_runner_with_zero_workers_still_runs(tmp_path):
    import threading

    from experiments import launch

    workdir = run_dir(tmp_path, "r")
    workdir.mkdir(parents=True)
    (workdir / "result.json").write_text('{"status": "completed"}')
    pool = threading.Thread(target=launch.run_subprocesses, daemon=True,
                            args=(tmp_path, ["r"], 0, lambda **_: None))
    pool.start()
    pool.join(120)
    assert not pool.is_alive()  # one slot at least, never a pool waiting for a free one forever
    assert launch.read_status(tmp_path)["r"]["state"] == "completed"


def test_damaged_result_is_a_run_not_done(tmp_path):
    from experiments import launch

    workdir = run_dir(tmp_path, "r")
    workdir.mkdir(parents=True)
    for text in ("{", "[]", '{"name": "r"}'):
        (workdir / "result.json").write_text(text)
        assert launch.read_result(tmp_path, "r") is None and not launch.is_done(tmp_path, "r")
    (tmp_path / "plan.json").write_text('{"runs": 3}')
    with pytest.raises(ConfigError, match=r"plan.json"):
        launch.load_planned(tmp_path, "r")


def test_wsd_branch_equals_an_independent_run(tmp_path, data_dir):
    """A cooldown branched from a WSD trunk is the run it replaces, bit for bit."""
    import numpy as np

    from lm.checkpoint import load_run
    from lm.train import train
    from tests.test_train import losses

    c = micro_sweep(data_dir)
    c.mode, c.budgets, c.shapes = "wsd", (1e9, 2e9), ("16x1", "16x1")
    trunk, branch = sorted(plan(c, tmp_path), key=lambda r: r.after is not None)
    assert branch.after == trunk.name and branch.branch_step in trunk.config.train.save_steps
    train(trunk.config, trunk.workdir)
    train(branch.config, branch.workdir)
    alone = branch.config.copy_and_resolve_references()
    alone.train.init_from, alone.train.init_step, alone.train.init_mode = "", -1, "params"
    result = train(alone, tmp_path / "alone")
    assert json.loads((tmp_path / "runs" / branch.name / "result.json").read_text())[
        "eval_loss"] == result["eval_loss"]
    a, b = load_run(branch.workdir)[2], load_run(tmp_path / "alone")[2]
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    tail = [x for x in losses(tmp_path / "alone") if x[0] > branch.branch_step]
    assert losses(tmp_path / "runs" / branch.name)[-len(tail):] == tail


def test_wsd_plan_reports_savings():
    from experiments.plan import format_plan

    c = tiny.get_config("untuned")
    c.mode = "wsd"
    runs = plan(c, "/sweep")
    trunks = [r for r in runs if r.after is None]
    assert len(trunks) == len({r.shape for r in runs})
    assert "saved by WSD branches" in format_plan(runs)
    for r in runs:
        if r.after:
            assert r.config.train.init_from == f"/sweep/runs/{r.after}"
            assert r.config.train.init_step == r.branch_step


def test_subprocess_pool_reuses_workers_and_replaces_a_killed_one(data_dir, tmp_path):
    """The subprocess runner's one worker trains run after run in one process; killed during its
    first run, that run alone is recorded failed (its log named) and a new worker trains the rest."""
    import signal
    import threading

    from experiments import launch
    from experiments.isoflop import write_plan

    c = micro_sweep(data_dir)
    c.budgets, c.shapes = c.budgets[:1], c.shapes[:1]
    runs = plan(c, tmp_path)
    write_plan(tmp_path, c, runs)
    names = [r.name for r in runs]
    pool = threading.Thread(target=launch.run_subprocesses, daemon=True,
                            args=(tmp_path, names, 1, lambda **_: None))
    pool.start()
    pids, killed = set(), None
    while pool.is_alive():
        for name in names:
            try:
                pid = json.loads((run_dir(tmp_path, name) / ".lock").read_text())["pid"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                continue
            pids.add(pid)
            if killed is None:
                killed = name
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    pool.join()
    status = launch.read_status(tmp_path)
    assert killed == names[0] and len(pids) == 2, (killed, pids)  # 3 runs, 2 processes
    assert status[killed]["state"] == "failed" and f"{killed}.log" in status[killed]["reason"]
    assert "status -9" in status[killed]["reason"]
    assert all(status[n]["state"] == "completed" for n in names[1:]), status
    assert f"{names[1]}: completed" in launch.run_log(tmp_path, names[1]).read_text()
