"""IsoFLOP sweep, end to end: `python -m experiments.isoflop [--config=...] [--sweep_dir=...]`.

Plans the runs (pure), writes plan.json, trains what is missing (skipping completed runs,
resuming interrupted ones), then runs `lm.analysis` on the sweep directory and prints the
headline: the fitted exponents with intervals and the optimum at the next budget up.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Collection
from pathlib import Path

import ml_collections

from experiments import launch
from experiments.plan import Run, format_plan, plan, sci, trained_flops
from lm.config import ConfigError
from lm.files import write_json_atomic
from lm.host import setup_process
from lm.metrics import format_duration


def write_plan(sweep_dir: Path, sweep: ml_collections.ConfigDict, runs: list[Run]) -> None:
    """Record the plan; refuse a run whose workdir already holds a different config."""
    for r in runs:
        saved = launch.run_dir(sweep_dir, r.name) / "config.json"
        if saved.exists() and json.loads(saved.read_text()) != json.loads(r.config.to_json()):
            raise ConfigError(
                f"{saved.parent} was trained with a different config than this sweep plans; "
                "use a new --sweep_dir (or delete that run) to change the sweep")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(sweep_dir / "plan.json", {
        "sweep": json.loads(sweep.to_json()),
        "runs": [{"name": r.name, "budget": r.budget, "steps": r.steps, "n_params": r.n_params,
                  "n_params_non_embedding": r.n_params_non_embedding, "tokens": r.tokens,
                  "flops": r.flops, "flops_6nd": r.flops_6nd, "after": r.after,
                  "branch_step": r.branch_step,
                  "config": json.loads(r.config.to_json())} for r in runs]})


class Progress:
    """done / running / left, FLOPs done of total and an ETA from the FLOP rate so far."""

    def __init__(self, sweep_dir: Path, runs: list[Run]):
        self.sweep_dir, self.runs, self.start = sweep_dir, runs, time.time()
        self.initial = self._done_flops()
        self.last = ""

    def _done_flops(self) -> float:
        return sum(trained_flops(r) for r in self.runs if launch.is_done(self.sweep_dir, r.name))

    def __call__(self, started: Collection[str] = ()) -> None:
        """`started`: runs a runner has launched that may not hold their lock yet."""
        done = [r for r in self.runs if launch.is_done(self.sweep_dir, r.name)]
        done_names = {r.name for r in done}
        running = sum(r.name not in done_names and (
            r.name in started or (launch.run_dir(self.sweep_dir, r.name) / ".lock").exists())
            for r in self.runs)
        total, flops = sum(trained_flops(r) for r in self.runs), self._done_flops()
        rate = (flops - self.initial) / max(time.time() - self.start, 1e-9)
        eta = format_duration((total - flops) / rate) if rate > 0 else "?"
        line = (f"sweep: {len(done)}/{len(self.runs)} done, {running} running, "
                f"{len(self.runs) - len(done) - running} left | FLOPs {flops:.2e} of {total:.2e} "
                f"({flops / total:.0%}) | ETA {eta}")
        if line != self.last:  # the runner and the final summary may both report the same state
            print(line, flush=True)
            self.last = line


def measured_seconds_per_flop(runs: list[Run]) -> float:
    """Time per FLOP of the middle run's train step, measured with lm.bench (one compile)."""
    from lm.bench import benchmark

    r = runs[len(runs) // 2]
    return 1.0 / benchmark(r.config, steps=5, warmup=1)["achieved_flops"]


def headline(fits: dict, budgets: list[float]) -> str:
    """The lines a researcher reads first."""
    from lm import analysis
    from lm.analysis.report import interval

    lines = []
    a2 = fits.get("approach2") or {}
    if "a" in a2:
        lines.append(f"Approach 2: N_opt ∝ C^{a2['a']:.3f} {interval(a2.get('a_ci'), '.3f')}, "
                     f"D_opt ∝ C^{a2['b']:.3f} {interval(a2.get('b_ci'), '.3f')}")
        if "ci_skipped" in a2:
            lines.append("  no bootstrap interval: too few sizes per budget")
        edges = [sci(b["C"]) for b in a2.get("budgets", []) if b.get("edge")]
        lines.append(f"  edge minima at budgets: {', '.join(edges)}" if edges else
                     "  every budget has an interior minimum")
    a3 = fits.get("approach3") or {}
    if "a" in a3:
        lines.append(f"Approach 3: L = {a3['E']:.3f} + {a3['A']:.4g}/N^{a3['alpha']:.3f} + "
                     f"{a3['B']:.4g}/D^{a3['beta']:.3f}; a = {a3['a']:.3f}, b = {a3['b']:.3f}")
        if a3.get("warnings"):
            lines += [f"  unreliable: {w}" for w in a3["warnings"]]
    next_budget = max(budgets) * 10
    usable = [n for n in ("approach3", "approach2") if "a" in (fits.get(n) or {})]
    trusted = [n for n in usable if not fits[n].get("warnings")]
    for name in (trusted or usable)[:1]:
        n_opt, d_opt = analysis.optimal_allocation(fits[name], next_budget)
        lines.append(f"next budget {sci(next_budget)} FLOPs ({name}): N_opt ≈ {n_opt:.3g}, "
                     f"D_opt ≈ {d_opt:.3g} ({d_opt / n_opt:.1f} tokens/param)")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/isoflop/tiny.py", "sweep config file")
    flags.DEFINE_string("sweep_dir", None, "sweep directory (default: the config's sweep_dir)")
    flags.DEFINE_bool("dry_run", False, "print the plan (with measured time estimates) and stop")
    flags.DEFINE_float("flops_per_second", 0.0, "dry run: estimate times at this training rate "
                       "(e.g. 3.5e14 for an H100 at 35 % MFU) instead of measuring this machine")
    flags.DEFINE_enum("runner", None, ["local", "subprocess", "slurm"], "override config.runner")
    flags.DEFINE_string("slurm_cluster", None, "submitit cluster: None (auto) or 'local' (tests)")
    flags.DEFINE_bool("analyse", True, "run lm.analysis on the sweep after training")

    def run(_):
        f = flags.FLAGS
        setup_process()
        sweep = f.config
        sweep_dir = Path(f.sweep_dir or sweep.sweep_dir).absolute()
        try:
            runs = plan(sweep, sweep_dir)
            if f.dry_run:
                rate = f.flops_per_second
                print(format_plan(runs, 1 / rate if rate > 0 else measured_seconds_per_flop(runs)))
                return
            write_plan(sweep_dir, sweep, runs)
        except ConfigError as e:
            sys.exit(f"error: {e}")
        # Trunks before their branches (a sequential runner never waits on itself), and the
        # costliest runs first, so parallel workers finish together instead of one trailing.
        todo = [r.name for r in sorted(runs, key=lambda r: (r.after is not None, -trained_flops(r)))
                if not launch.is_done(sweep_dir, r.name)]
        print(f"sweep {sweep_dir}: {len(runs)} runs, {len(runs) - len(todo)} already done",
              flush=True)
        report = Progress(sweep_dir, runs)
        runner = f.runner or sweep.runner
        if todo and runner == "local":
            launch.run_local(sweep_dir, todo, report)
        elif todo and runner == "subprocess":
            launch.run_subprocesses(sweep_dir, todo, sweep.workers, report)
        elif todo:
            launch.run_slurm(sweep_dir, todo, sweep.slurm, f.slurm_cluster)
        report()
        if f.analyse:
            from lm import analysis

            fits = analysis.run(sweep_dir, n=sweep.analysis.n, bootstrap=sweep.analysis.bootstrap)
            print(f"report: {sweep_dir / 'report.md'}")
            print(headline(fits, list(sweep.budgets)))

    app.run(run, argv=argv)


if __name__ == "__main__":
    main(sys.argv)
