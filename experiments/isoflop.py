"""IsoFLOP sweep, end to end: `python -m experiments.isoflop [--config=...] [--sweep_dir=...]`.

With `train.optim.lr_rule="fitted"` it first runs the tuning stage (experiments/tune.py; a
no-op refit once its runs are done, so tuning happens once and is reused). Plans the runs
(pure), writes plan.json, trains what is missing (skipping completed runs, resuming
interrupted ones), then runs `lm.analysis` on what completed and prints the headline:
the fitted exponents with intervals and the optimum at the next budget up. Runs that did not
finish are listed with why (SWEEP/status.json), and the exit status is then 1. With --validate,
approach 3's predicted optimum at a budget beyond the sweep is then trained and its loss held
against the law's prediction (experiments/validate.py).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Collection
from pathlib import Path

import ml_collections

from experiments import launch, tune, validate
from experiments.plan import Run, format_plan, plan, repeats, trained_flops, training_order
from lm.config import ConfigError
from lm.files import read_json, run_dir, write_json_atomic
from lm.metrics import format_duration
from lm.process import setup


def write_plan(sweep_dir: Path, sweep: ml_collections.ConfigDict, runs: list[Run],
               root: Path | None = None) -> None:
    """Record the plan, with each run's LR and batch and where they came from (the tuning fit of
    the sweep at `root`, default sweep_dir); refuse a run whose workdir holds a different config."""
    for r in runs:
        saved = run_dir(sweep_dir, r.name) / "config.json"
        if saved.exists() and read_json(saved) != json.loads(r.config.to_json()):
            raise ConfigError(
                f"{saved.parent} was trained with a different config than this sweep plans; "
                "use a new --sweep_dir (or delete that run) to change the sweep")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(sweep_dir / "plan.json", {
        "sweep": json.loads(sweep.to_json()),
        "runs": [{"name": r.name, "budget": r.budget, "steps": r.steps, "n_params": r.n_params,
                  "n_params_non_embedding": r.n_params_non_embedding, "tokens": r.tokens,
                  "flops": r.flops, "flops_6nd": r.flops_6nd, "after": r.after,
                  "branch_step": r.branch_step, "replicate": r.seed,
                  **tune.provenance(sweep, root or sweep_dir, r.config),
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
            r.name in started or (run_dir(self.sweep_dir, r.name) / ".lock").exists())
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


def data_warnings(sweep: ml_collections.ConfigDict, runs: list[Run]) -> list[str]:
    """What the plan asks of the train split: a warning per run that repeats it, a ConfigError past
    config.max_epochs, or a line saying the split's size is not known here yet."""
    from lm.data import split_tokens

    d = sweep.train.data
    name = d.dataset if d.dataset != "folder" else d.text_dir
    tokens = sweep.data_tokens or split_tokens(d)
    if not tokens:
        return [f"data: {name}'s train split is not prepared here, so whether runs repeat it is not "
                "checked (python -m lm.data.prepare --config=... prepares it; --config.data_tokens=N "
                "gives its size)"]
    return repeats(runs, tokens, sweep.max_epochs, name)


MEASURE_LIMIT_S = 60.0  # the longest a dry run's measurement may take, at the device's peak


def measured_seconds_per_flop(runs: list[Run]) -> float | None:
    """Time per FLOP of the middle run's train step, measured with lm.bench (one compile); None,
    with a line saying why, when this machine cannot measure it in reasonable time or memory
    (a GPU study planned on a laptop)."""
    import jax

    from lm.bench import benchmark
    from lm.metrics import device_peak_flops

    r = runs[len(runs) // 2]
    c = r.config
    step = c.data.batch_size * c.data.seq_len * r.flops / r.tokens
    seconds = 6 * step / (device_peak_flops() * jax.device_count())  # 5 steps and a warm-up
    advice = "pass --flops_per_second for time estimates"
    if not seconds <= MEASURE_LIMIT_S:
        print(f"no time estimates: 6 steps of {r.name} would take about {seconds:.0f} s on "
              f"{jax.devices()[0].device_kind} at its peak; {advice}", flush=True)
        return None
    try:
        return 1.0 / benchmark(c, steps=5, warmup=1)["achieved_flops"]
    except Exception as e:  # noqa: BLE001 - out of memory, most likely: the plan still prints
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"no time estimates: measuring {r.name} failed ({type(e).__name__}: {first}); "
              f"{advice}", flush=True)
        return None


def sweep_path(flag: str | None, sweep: ml_collections.ConfigDict) -> Path:
    """--sweep_dir, else the config's, made absolute; an empty flag is an error, not the cwd."""
    if flag is not None and not flag.strip():
        raise ConfigError("--sweep_dir is empty: name the sweep directory, or leave the flag "
                          f"out for the config's ({sweep.sweep_dir})")
    return Path(flag or sweep.sweep_dir).absolute()


def dry_run_rate(runs: list[Run], flops_per_second: float) -> float | None:
    """Seconds per FLOP for a dry run's estimates: --flops_per_second's, else measured here."""
    return 1 / flops_per_second if flops_per_second > 0 else measured_seconds_per_flop(runs)


def train(sweep_dir: Path, names: list[str], sweep: ml_collections.ConfigDict, runner: str,
          report: Progress, job: str = "") -> None:
    """Train the planned runs `names` of sweep_dir with the runner named (SLURM jobs named `job`,
    default the sweep's name)."""
    if names and runner == "local":
        launch.run_local(sweep_dir, names, report)
    elif names and runner == "subprocess":
        launch.run_subprocesses(sweep_dir, names, sweep.workers, report)
    elif names:
        launch.run_slurm(sweep_dir, names, sweep.slurm, job or sweep.name, report)


def tuned_first(sweep: ml_collections.ConfigDict, sweep_dir: Path, runner: str, dry_run: bool,
                flops_per_second: float = 0.0) -> bool:
    """With lr_rule 'fitted': the tuning stage, trained where runs are missing and fitted (its
    summary printed), before the sweep plans from the fit; True when the sweep must stop here (a
    dry run before the fit exists: the tuning plan is printed instead)."""
    if sweep.train.optim.lr_rule != "fitted":
        return False
    fit = tune.tune_dir(sweep, sweep_dir) / tune.FIT
    if dry_run:
        if fit.exists():
            return False
        runs = tune.tuning_plan(sweep, sweep_dir)
        print(format_plan(runs, dry_run_rate(runs, flops_per_second)))
        print(f"the sweep plans from the tuning fit ({fit}), which these tuning runs make "
              "first: its plan shows once they are done", flush=True)
        return True
    result = tune.stage(sweep, sweep_dir, runner)
    if result is None:
        sys.exit(1)
    print(tune.summary(result, fit.parent), flush=True)
    return False


def validate_law(sweep_dir: Path, sweep: ml_collections.ConfigDict, a3: dict, runner: str) -> bool:
    """--validate: train approach 3's optimum beyond the sweep as a sweep of one run (a rerun reuses
    it), then compare and record; False when it did not finish."""
    validate.check_fit(a3)
    fit = validate.refit(sweep_dir, sweep.analysis.n, a3, validate.budget(sweep))
    r = validate.plan_run(sweep, fit, sweep_dir)
    vdir = validate.directory(sweep_dir)
    for line in data_warnings(sweep, [r]):
        print(line, flush=True)
    write_plan(vdir, sweep, [r], root=sweep_dir)
    done = launch.is_done(vdir, r.name)
    print(f"validation {vdir}: {r.name} ({r.shape}, {r.flops:.3g} FLOPs)"
          + (", already done" if done else ""), flush=True)
    train(vdir, [] if done else [r.name], sweep, runner, Progress(vdir, [r]))
    stuck, busy = launch.unfinished(vdir, [r.name])
    if stuck or busy:
        print(f"validation not done (rerun the same command to finish it): {(stuck + busy)[0]}",
              flush=True)
        return False
    v = validate.compare(fit, r, launch.read_result(vdir, r.name), sweep.analysis.n)
    validate.record(sweep_dir, v)
    print(validate.summary(v), flush=True)
    return True


def main(argv: list[str]) -> None:
    from absl import flags

    from lm import cli

    cli.define_config("isoflop/tiny.py", "sweep config file")
    flags.DEFINE_string("sweep_dir", None, "sweep directory (default: the config's sweep_dir)")
    flags.DEFINE_bool("dry_run", False, "print the plan (with measured time estimates) and its FLOPs "
                      "of results against FLOPs of training, and stop")
    flags.DEFINE_float("flops_per_second", 0.0, "dry run: estimate times at this training rate "
                       "(e.g. 3.5e14 for an H100 at 35 % MFU) instead of measuring this machine")
    flags.DEFINE_enum("runner", None, ["local", "subprocess", "slurm"], "override config.runner")
    flags.DEFINE_bool("analyse", True, "run lm.analysis on the sweep after training")
    flags.DEFINE_enum("preflight", None, ["cuda", "tpu"],
                      "lower every planned run's train step for this platform (lm.bench "
                      "--lower_only: jax.export on an abstract mesh, no device), once per distinct "
                      "program, list the failures and exit (1 if any failed); nothing trains")
    flags.DEFINE_integer("preflight_devices", 0,
                         "preflight: devices of the abstract mesh, which resolve the -1 of each "
                         "run's mesh.shape (0: config.slurm.gpus_per_node × config.slurm.nodes, "
                         "what one run gets on SLURM)")
    flags.DEFINE_bool("validate", False, "after the fits, train approach 3's compute-optimal model "
                      "of config.validate_factor × the largest budget and compare its eval loss with "
                      "the law's prediction and interval (SWEEP/validation.json, report.md)")

    def run():
        f = flags.FLAGS
        setup()
        sweep = f.config
        sweep_dir = sweep_path(f.sweep_dir, sweep)
        runner = f.runner or sweep.runner
        try:
            launch.validate_slurm(sweep.slurm)
            if tuned_first(sweep, sweep_dir, runner, f.dry_run or bool(f.preflight),
                           f.flops_per_second):
                return
            runs = plan(sweep, sweep_dir)
            if f.validate:
                validate.check_options(sweep, f.analyse)
            for line in data_warnings(sweep, runs):
                print(line, flush=True)
            if f.preflight:
                from lm.bench import preflight

                devices = f.preflight_devices or sweep.slurm.gpus_per_node * sweep.slurm.nodes
                sys.exit(1 if preflight([(r.name, r.config) for r in runs], f.preflight,
                                        devices) else 0)
            todo = [r.name for r in training_order(runs) if not launch.is_done(sweep_dir, r.name)]
            if f.dry_run:
                seconds_per_flop = dry_run_rate(runs, f.flops_per_second)
                print(format_plan(runs, seconds_per_flop))
                if f.validate:
                    saved = sweep_dir / "fits.json"
                    a3 = read_json(saved).get("approach3") if saved.exists() else None
                    print("\n" + validate.preview(sweep, a3, sweep_dir, seconds_per_flop))
                if runner == "slurm" and todo:
                    print(f"\nsbatch script for the {len(todo)} run(s) to submit:\n")
                    print(launch.sbatch_script(sweep_dir, sweep.slurm, sweep.name, len(todo)))
                return
            write_plan(sweep_dir, sweep, runs)
        except ConfigError as e:
            sys.exit(f"error: {e}")
        print(f"sweep {sweep_dir}: {len(runs)} runs, {len(runs) - len(todo)} already done",
              flush=True)
        report = Progress(sweep_dir, runs)
        train(sweep_dir, todo, sweep, runner, report)
        report()
        stuck, busy = launch.unfinished(sweep_dir, [r.name for r in runs])
        if f.analyse and len(stuck) + len(busy) < len(runs):
            from lm import analysis

            fits = analysis.run(sweep_dir, n=sweep.analysis.n, bootstrap=sweep.analysis.bootstrap)
            print(f"report: {sweep_dir / 'report.md'}")
            print(analysis.summary(fits, next_budget=10 * max(sweep.budgets)))
        if f.validate and (stuck or busy):
            print(f"validation: not run while {len(stuck) + len(busy)} of the sweep's runs are not "
                  "done", flush=True)
        elif f.validate and not validate_law(sweep_dir, sweep, fits["approach3"], runner):
            sys.exit(1)
        if busy:
            print("still training elsewhere:\n  " + "\n  ".join(busy), flush=True)
        if stuck:
            print(f"{len(stuck)} of {len(runs)} runs not done (rerun the same command to "
                  "train them):\n  " + "\n  ".join(stuck), flush=True)
            sys.exit(1)

    cli.run(run, argv)


if __name__ == "__main__":
    main(sys.argv)
