"""Grid sweeps (mode="grid"): sizes × budgets with one WSD trunk per size and cooldown branches;
planning, FLOPs, approach 1 on WSD runs, and a micro grid end to end with a resume."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from configs.isoflop import tiny, tiny_grid
from experiments.plan import flops_line, grid_budgets, plan, trained_flops
from lm.config import ConfigError

from .conftest import ROOT
from .test_plan import _set, refuses

SQRT2 = 2**0.5


def test_grid_budgets_keep_the_given_ones_and_fill_between():
    b = grid_budgets((1e12, 3e11, 3e12), SQRT2)
    assert len(b) == 9 and {3e11, 1e12, 3e12} <= set(b) and b == sorted(b)
    ratios = np.array(b[1:]) / np.array(b[:-1])
    assert ratios.max() <= SQRT2 and ratios.min() > 1.25  # as few fill budgets as the spacing allows
    assert grid_budgets((1e9, 2e9), 2.0) == [1e9, 2e9]
    assert len(grid_budgets((1e9, 2e9), SQRT2)) == 3  # sqrt(2)**2 rounds past 2: still one fill


def _by_size(runs):
    sizes = {}
    for r in runs:
        sizes.setdefault(r.shape, []).append(r)
    return sizes


def test_tiny_grid_plans_one_trunk_per_size_and_a_branch_on_every_line():
    c = tiny_grid.get_config()
    runs = plan(c, "/sweep")
    sizes = _by_size(runs)
    assert set(sizes) == set(c.grid.shapes.split(","))
    for group in sizes.values():
        trunk, = [r for r in group if r.after is None]
        steps = [r.steps for r in group]
        assert trunk.steps == max(steps)
        assert trunk.config.train.save_steps == tuple(sorted(r.branch_step for r in group if r.after))
        tokens = sorted(r.tokens for r in group)
        assert max((b / a for a, b in zip(tokens, tokens[1:], strict=False)), default=1) <= SQRT2 * 1.01
        warmup = round(c.train.optim.warmup_frac * min(steps))  # the shortest run's warmup
        for r in group:
            o, t = r.config.optim, r.config.train
            assert (o.schedule, o.cooldown_frac, o.cooldown_shape, o.warmup_steps) == (
                "wsd", 0.1, "1-sqrt", warmup), r.name
            if r.after:
                assert r.after == trunk.name and r.branch_step == r.steps - round(0.1 * r.steps)
                assert (t.init_from, t.init_step, t.init_mode) == (
                    f"/sweep/runs/{trunk.name}", r.branch_step, "state")
    budgets = grid_budgets(tiny.get_config("untuned").budgets, SQRT2)
    assert sorted({r.budget for r in runs}) == budgets
    for budget in budgets:
        assert len([r for r in runs if r.budget == budget]) >= 3
    assert all(abs(r.flops / r.budget - 1) < 0.01 for r in runs)
    # the tiny sweep's 15 runs are grid points with the same N and D: each has a cosine twin
    grid = {r.name: r for r in runs}
    for r in plan(tiny.get_config("untuned")):
        twin = grid[r.name]
        assert (twin.n_params, twin.tokens, twin.steps) == (r.n_params, r.tokens, r.steps), r.name


def test_tiny_grid_trains_less_than_the_cosine_sweep_for_twice_its_training_in_results():
    grid, cosine = plan(tiny_grid.get_config()), plan(tiny.get_config("untuned"))
    cost, results = sum(trained_flops(r) for r in grid), sum(r.flops for r in grid)
    assert cost <= sum(trained_flops(r) for r in cosine)
    assert results >= 2 * cost
    line = flops_line(grid)
    assert f"{results:.3e} FLOPs of results (their cost as independent cosine runs) for {cost:.3e} " \
           f"FLOPs of training: results / training = {results / cost:.2f}" in line


def test_a_generated_sqrt2_grid_shares_its_sizes_and_costs_at_most_half_of_cosine_runs():
    c = tiny_grid.get_config()
    c.grid.shapes, c.budgets = "", (1e15, 1e17)
    c.train.data.seq_len, c.train.data.batch_size = 1024, 64
    c.tokens_per_param, c.size_span, c.sizes_per_budget, c.aspect_ratio = 20.0, 16.0, 5, 64.0
    c.cooldown_frac = 0.2  # the default cooldown
    runs = plan(c)
    sizes = _by_size(runs)
    lines = {r.budget for r in runs}
    assert len(lines) == 15 and len(sizes) < len(runs) / 4  # each size on many lines
    assert all(4 <= sum(r.budget == b for r in runs) <= 6 for b in lines)  # about sizes_per_budget
    assert sum(trained_flops(r) for r in runs) <= 0.5 * sum(r.flops for r in runs)


def test_wsd_runs_share_the_warmup_of_their_shortest():
    c = tiny.get_config("untuned")
    c.mode = "wsd"
    for group in _by_size(plan(c)).values():
        warmup = round(c.train.optim.warmup_frac * min(r.steps for r in group))
        assert {r.config.optim.warmup_steps for r in group} == {warmup}


BAD = [
    ({"grid.spacing": 1.0}, r"config\.grid\.spacing = 1\.0 is not allowed: must be > 1"),
    ({"grid.shapes": "16by1"}, r"config\.grid\.shapes = '16by1'"),
    ({"grid.shapes": "16x1,24x2,16x1"}, r"config\.grid\.shapes = '16x1,24x2,16x1' .*lists a size twice"),
    ({"shapes": ("16x1", "16x2", "24x2")}, r"config\.shapes = .* must be \(\) in grid mode"),
    ({"grid.shapes": "16x1,16x2,24x2,32x2,48x2,64x2,80x3,256x4"},
     r"grid: 256x4 \(.* params\) on no budget's line"),
    ({"size_span": 2.0}, r"grid: budget 3e11 has \d size\(s\) in its window .* at least 3"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[str(o) for o, _ in BAD])
def test_bad_grid_configs_are_one_error_naming_the_field(overrides, message):
    refuses(tiny_grid.get_config(), overrides, message)


def test_a_config_without_the_grid_section_says_where_to_start():
    c = tiny_grid.get_config()
    del c["grid"]
    with pytest.raises(ConfigError, match=r"config\.grid\.shapes is missing: start the sweep config from "
                                          r"configs/isoflop/tiny\.py"):
        plan(c)


def test_approach1_uses_wsd_runs_final_points_not_their_stable_phase():
    """A WSD run's evals before its end are not finished runs: per size its runs' final points are
    the curve. The stable-phase points here are lower than anything else, so using them would show."""
    from lm.analysis import checks
    from lm.analysis.approach1 import curves, fit_approach1
    from lm.analysis.load import from_table

    rows = []
    for n in (1e4, 3e4, 1e5):
        for i, d in enumerate((1e6, 2e6, 4e6, 8e6)):
            run = f"N{n:g}-D{d:g}"
            loss = 1 + 300 / n**0.5 + 2000 / d**0.5
            rows.append({"run": run, "point": "final", "schedule": "wsd", "N": n, "D": d, "C": 6 * n * d,
                         "loss": loss, "budget": 6 * n * d})
            if i == 3:  # the trunk's stable phase
                rows += [{"run": run, "point": "eval", "schedule": "wsd", "N": n, "D": e, "C": 6 * n * e,
                          "loss": 0.1, "budget": 6 * n * d} for e in (1e6, 3e6, 5e6)]
    cosine = [{"run": "cos", "point": "eval", "schedule": "cosine", "N": 2e4, "D": d, "C": 1.2e5 * d,
               "loss": 50.0, "budget": 1.2e11} for d in (1e6, 2e6)]
    df = from_table(pd.DataFrame(rows + cosine))
    assert set(df["schedule"]) == {"wsd", "cosine"}
    got = curves(df)
    assert len(got) == 4 and len(got["cos"]) == 2  # three sizes' finals, and the cosine run's curve
    assert all((g["loss"] > 0.1).all() for g in got.values())
    assert sorted(len(g) for g in got.values()) == [2, 4, 4, 4]
    fit = fit_approach1(df)
    assert fit["runs"] == 4 and min(e["loss"] for e in fit["envelope"]) > 1
    assert {e["N"] for e in fit["envelope"]} <= {1e4, 3e4, 1e5}  # the cosine curve lies above
    assert fit["warnings"] == checks.envelope([e["N"] for e in fit["envelope"]]) != []  # 3 sizes at most


# A micro grid: 3 sizes on 2 lines, 6 runs of 50 to 300 steps (fill budgets: planning tests above).
MICRO = {"budgets": (1.6e9, 3.2e9), "grid.shapes": "8x1,16x1,24x1", "grid.spacing": 2.0,
         "tokens_per_param": 4.0, "size_span": 8.0}


def micro_grid(data_dir):
    c = tiny_grid.get_config()
    c.train.data.data_dir = str(data_dir)
    c.train.data.seq_len, c.train.data.batch_size, c.train.data.eval_batches = 32, 8, 2
    c.train.train.log_every, c.train.train.checkpoint_every = 10, 20
    for k, v in MICRO.items():
        _set(c, k, v)
    c.runner, c.analysis.bootstrap = "local", 20
    return c


def _flags(c) -> list[str]:
    return ["--config=configs/isoflop/tiny_grid.py", f"--config.train.data.data_dir={c.train.data.data_dir}",
            "--config.train.data.seq_len=32", "--config.train.data.batch_size=8",
            "--config.train.data.eval_batches=2", "--config.train.train.log_every=10",
            "--config.train.train.checkpoint_every=20", "--config.runner=local",
            "--config.analysis.bootstrap=20", *(f"--config.{k}={v}" for k, v in MICRO.items())]


def _isoflop(sweep_dir, *args):
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.isoflop", f"--sweep_dir={sweep_dir}", *args], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"))


def test_micro_grid_plans_two_lines():
    runs = plan(micro_grid("/data"))
    assert len(runs) == 6 and len({r.budget for r in runs}) == 2
    assert sum(r.after is None for r in runs) == 3


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, data_dir):
    """An uninterrupted micro grid sweep through the CLI."""
    c = micro_grid(data_dir)
    sweep_dir = tmp_path_factory.mktemp("grid")
    proc = _isoflop(sweep_dir, *_flags(c))
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    return c, sweep_dir, out


def _eval_losses(sweep_dir):
    return {p.parent.name: json.loads(p.read_text())["eval_loss"]
            for p in sweep_dir.glob("runs/*/result.json")}


def test_micro_grid_end_to_end(grid_sweep):
    from lm.analysis import load

    c, sweep_dir, out = grid_sweep
    runs = plan(c, sweep_dir)
    results = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("runs/*/result.json")}
    assert sorted(results) == sorted(r.name for r in runs)
    assert all(r["status"] == "completed" for r in results.values())
    planned = json.loads((sweep_dir / "plan.json").read_text())["runs"]
    assert [(p["name"], p["after"], p["branch_step"]) for p in planned] == [
        (r.name, r.after, r.branch_step) for r in runs]
    for r in runs:
        assert results[r.name]["steps"] == r.steps
        if r.after:  # a branch trained its cooldown only, from its trunk's checkpoint
            metrics = (sweep_dir / "runs" / r.name / "metrics.jsonl").read_text().splitlines()
            assert min(json.loads(x)["step"] for x in metrics) > r.branch_step
    df = load(sweep_dir)
    assert set(df["schedule"]) == {"wsd"}
    fits = json.loads((sweep_dir / "fits.json").read_text())
    assert fits["approach2"]["budgets_used"] == sorted({r.budget for r in runs})
    assert "alpha" in fits["approach3"]
    assert fits["approach1"].get("runs") == 3 or "single model" in fits["approach1"].get("skipped", "")
    assert f"sweep: {len(runs)}/{len(runs)} done" in out and "report:" in out


def test_killed_grid_sweep_finishes_only_what_was_missing(grid_sweep, tmp_path):
    c, ref_dir, _ = grid_sweep
    sweep_dir = tmp_path / "grid"
    proc = _isoflop(sweep_dir, *_flags(c), "--analyse=false")
    deadline = time.time() + 300
    while not list(sweep_dir.glob("runs/*/result.json")):  # the first trunk done, the others not
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    finished = {p.parent.name for p in sweep_dir.glob("runs/*/result.json")}
    proc = _isoflop(sweep_dir, *_flags(c), "--analyse=false")
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    assert f"{len(finished)} already done" in out
    for name in finished:
        assert f"{name}: completed" not in out
    assert _eval_losses(sweep_dir) == _eval_losses(ref_dir)


def test_grid_dry_run_shows_results_against_training(tmp_path):
    proc = _isoflop(tmp_path / "grid", "--config=configs/isoflop/tiny_grid.py", "--dry_run",
                    "--flops_per_second=1e9")
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert flops_line(plan(tiny_grid.get_config())) in out
    assert not (tmp_path / "grid").exists()
