"""Tuning stage: `python -m experiments.tune --config=<sweep config> [--sweep_dir=...] [--dry_run]`.

Trains the sweep's own runs at its smallest budgets (`tune.n_budgets`) over a grid of peak
learning rates (`tune.lr_factors` × the `tune.lr_rule` LR) and, optionally, batch sizes
(`tune.batch_sizes`), in SWEEP/tune: a sweep directory of its own (plan.json, locks, resuming,
status.json and every runner as the sweep's). Then it fits each size's optimal LR (and batch)
and power laws of them in N, and writes SWEEP/tune/fit.json and tune.png; a sweep with
`train.optim.lr_rule="fitted"` takes each run's LR (and batch) from those laws
(docs/experiments.md, "Tuning stage").
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import ml_collections
import numpy as np

from experiments.plan import Run, lines, plan, power_of_two, sci, training_order, validate_sweep
from lm.analysis.approach2 import power_law as fit_power_law
from lm.analysis.approach2 import vertex as parabola_vertex
from lm.config import ConfigError, fail
from lm.files import read_json, run_dir, write_json_atomic
from lm.optim import peak_lr

FIT, FIGURE = "fit.json", "tune.png"


def tune_dir(sweep: ml_collections.ConfigDict, sweep_dir: str | Path = "") -> Path:
    """SWEEP/tune, where the tuning runs, their plan and the fit live."""
    return Path(sweep_dir or sweep.sweep_dir) / "tune"


def cut(sweep: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The sweep cut to its tune.n_budgets smallest IsoFLOP lines, as independent runs of its
    schedule (WSD in wsd and grid modes) under tune.lr_rule, one seed each: the (N, D) points it
    trains there."""
    validate_sweep(sweep)
    every = sorted(lines(sweep), key=lambda line: line[0])
    n = sweep.tune.n_budgets
    if n > len(every):
        fail("tune.n_budgets", n, f"the sweep has {len(every)} budget(s): tune at most that many")
    c = sweep.copy_and_resolve_references()
    c.budgets = tuple(budget for budget, _, _ in every[:n])
    c.shapes = tuple(",".join(f"{m.d_model}x{m.n_layers}" for m in models) for _, models, _ in every[:n])
    if sweep.mode != "cosine":
        c.train.optim.schedule, c.train.optim.cooldown_frac = "wsd", sweep.cooldown_frac
    c.mode, c.train.optim.lr_rule, c.seeds = "cosine", sweep.tune.lr_rule, 1
    return c


def tuning_plan(sweep: ml_collections.ConfigDict, sweep_dir: str | Path = "") -> list[Run]:
    """Every tuning run: each run of the cut sweep at each LR factor (times the rule's capped LR)
    and batch size, named T<budget>-N<params>-lr<LR>[-B<batch>], by budget, size, batch and LR."""
    base, out = cut(sweep), []
    for batch in sweep.tune.batch_sizes or (0,):
        for factor in sweep.tune.lr_factors:
            c = base.copy_and_resolve_references()
            c.train.optim.peak_lr *= factor
            c.train.optim.max_lr *= factor  # min(f·rule, f·cap) = f·min(rule, cap)
            if batch:
                c.train.data.batch_size, c.batch_exponent = batch, 0.0
            for r in plan(c):
                name = (f"T{sci(r.budget)}-N{sci(r.n_params)}-lr{sci(learning_rate(r))}"
                        + (f"-B{batch}" if batch else ""))
                out.append(replace(r, name=name, workdir=str(run_dir(tune_dir(sweep, sweep_dir), name))))
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        fail("tune.lr_factors", tuple(sweep.tune.lr_factors), "gives two runs one name "
             f"({sorted({n for n in names if names.count(n) > 1})[0]}): factors too close together")
    return sorted(out, key=lambda r: (r.budget, r.n_params, r.config.data.batch_size, learning_rate(r)))


def learning_rate(r: Run) -> float:
    """The peak LR a run trains at (its rule applied)."""
    return peak_lr(r.config.optim, r.config.model.d_model)


def vertex(xs: list[float], ys: list[float]) -> tuple[float, float, str]:
    """(x, y, edge) of the lowest y over log x: the vertex of the parabola through the best point
    and its neighbours; at the grid's edge, that point, with edge 'smallest' or 'largest' (the
    optimum may lie beyond it). Non-finite y (diverged runs) are left out; none finite: (nan, inf)."""
    pts = sorted((x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(y))
    if not pts:
        return math.nan, math.inf, ""
    i = min(range(len(pts)), key=lambda j: pts[j][1])
    if i in (0, len(pts) - 1):
        return *pts[i], "smallest" if i == 0 else "largest"
    near = np.array(pts[i - 1:i + 2])  # the best point and its neighbours: (lr, loss) rows
    x, y, _ = parabola_vertex(np.log(near[:, 0]), near[:, 1])
    if not math.isfinite(x):  # three equal losses: no curvature to place a vertex
        return *pts[i], ""
    return float(np.exp(x)), y, ""


def power_law(n: list[float], y: list[float]) -> dict[str, float]:
    """k and e of y = k N^e, least squares in log-log."""
    if len(set(n)) < 2:
        raise ConfigError(f"tuning: optima at {len(set(n))} size(s), and a power law in N needs at "
                          "least 2: tune at a budget with several sizes")
    k, e = fit_power_law(np.array(n, float), np.array(y, float))
    return {"k": k, "e": e}


def law(p: dict[str, float], n: float) -> float:
    return p["k"] * n ** p["e"]


def optima(points: list[dict]) -> list[dict]:
    """Per budget and size: the optimal LR (at the best batch) and, over a batch grid, the
    optimal batch, each with where it sits on its grid."""
    groups: dict[tuple[float, int], list[dict]] = {}
    for p in points:
        groups.setdefault((p["budget"], p["n_params"]), []).append(p)
    out = []
    for (budget, n), pts in sorted(groups.items()):
        by_batch = {b: vertex([p["lr"] for p in pts if p["batch"] == b],
                              [p["loss"] for p in pts if p["batch"] == b])
                    for b in sorted({p["batch"] for p in pts})}
        best = min(by_batch, key=lambda b: by_batch[b][1])
        lr, loss, edge = by_batch[best]
        if not math.isfinite(loss):
            raise ConfigError(f"tuning: every run of C = {sci(budget)}, N = {n:,} diverged: lower "
                              "tune.lr_factors")
        entry = {"budget": budget, "n_params": n, "lr_opt": lr, "loss_min": loss, "lr_edge": edge,
                 "batch": best}
        if len(by_batch) > 1:
            batch, _, batch_edge = vertex(list(by_batch), [v[1] for v in by_batch.values()])
            entry |= {"batch_opt": batch, "batch_edge": batch_edge}
        out.append(entry)
    return out


def edge_warnings(opts: list[dict]) -> list[str]:
    """One line per optimum at its grid's edge, which the fit uses as it is."""
    return [f"warning: C = {sci(o['budget'])}, N = {o['n_params']:,}: the lowest loss is at the "
            f"grid's {o[key + '_edge']} {key} ({o[key + '_opt']:.3g}), so the optimum may lie beyond "
            f"it; the fit uses that edge (widen tune.{'lr_factors' if key == 'lr' else 'batch_sizes'})"
            for o in opts for key in ("lr", "batch") if o.get(key + "_edge")]


def fit(points: list[dict]) -> dict:
    """Each size's optima and power laws of them in N (total parameters): lr_opt = k N^e, and
    batch_opt = k N^e when batch sizes were tuned."""
    opts = optima(points)
    n = [o["n_params"] for o in opts]
    batch = power_law(n, [o["batch_opt"] for o in opts]) if "batch_opt" in opts[0] else None
    return {"variable": "N", "lr": power_law(n, [o["lr_opt"] for o in opts]), "batch": batch,
            "optima": opts, "warnings": edge_warnings(opts), "points": points}


def measured(directory: Path, runs: list[Run]) -> list[dict]:
    """The tuning runs' (budget, N, batch, LR, eval loss) points; a diverged run's loss is inf."""
    from experiments.launch import read_result

    out = []
    for r in runs:
        result = read_result(directory, r.name) or {}
        loss = result.get("eval_loss") if result.get("status") == "completed" else None
        out.append({"name": r.name, "budget": r.budget, "n_params": r.n_params,
                    "batch": r.config.data.batch_size, "lr": learning_rate(r),
                    "loss": math.inf if loss is None else loss})
    return out


def plot(result: dict, out: Path) -> None:
    """tune.png: loss against LR per size (at its best batch) with the optimum starred, and the
    optima against N with the fitted law."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    opts = result["optima"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for o, color in zip(opts, plt.cm.viridis(np.linspace(0, 0.9, len(opts))), strict=True):
        pts = sorted((p["lr"], p["loss"]) for p in result["points"] if math.isfinite(p["loss"])
                     and (p["budget"], p["n_params"], p["batch"]) == (o["budget"], o["n_params"], o["batch"]))
        left.plot(*zip(*pts, strict=True), "o-", color=color, ms=4,
                  label=f"C {sci(o['budget'])}, N {sci(o['n_params'])}" + (" (edge)" if o["lr_edge"] else ""))
        left.scatter([o["lr_opt"]], [o["loss_min"]], color=color, marker="*", s=140, edgecolor="k", zorder=3)
    left.set(xscale="log", xlabel="peak learning rate", ylabel="eval loss", title="loss against LR per size")
    left.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on a short range
    left.legend(fontsize=7)
    n = np.array([o["n_params"] for o in opts], float)
    lr = result["lr"]
    right.scatter(n, [o["lr_opt"] for o in opts], facecolors=["none" if o["lr_edge"] else "C0" for o in opts],
                  edgecolors="C0", zorder=3, label="per-size optima (hollow: at the grid's edge)")
    grid = np.geomspace(n.min() / 2, n.max() * 2, 50)
    right.plot(grid, law(lr, grid), color="C1", label=f"lr = {lr['k']:.3g} N^{lr['e']:.3f}")
    right.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="optimal peak LR",
              title="fitted LR rule")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / FIGURE, dpi=120)
    plt.close(fig)


def read_fit(path: Path) -> dict:
    """fit.json, or one line saying how to make it."""
    if not path.exists():
        raise ConfigError(f"config.train.optim.lr_rule = 'fitted' needs {path}, the tuning stage's fit: "
                          "run `python -m experiments.tune --config=<this sweep's config>` (same "
                          "--sweep_dir) first")
    result = read_json(path, dict, ("lr", "batch"))
    if not (isinstance(result["lr"], dict) and {"k", "e"} <= result["lr"].keys()):
        raise ConfigError(f"{path}: 'lr' is not a fitted law {{'k': ..., 'e': ...}}")
    return result


def fitted(sweep: ml_collections.ConfigDict, sweep_dir: str | Path, n_params: int, batch: int,
           data_parallel: int) -> tuple[float, int]:
    """A run's peak LR and batch size (a power of two; the sweep's `batch` where the fit has no
    batch law) from the tuning fit, for lr_rule 'fitted'. The LR is not capped at optim.max_lr:
    the cap guards the heuristic rules, and the fit measured where the optimum is."""
    result = read_fit(tune_dir(sweep, sweep_dir) / FIT)
    lr = law(result["lr"], n_params)
    if result["batch"]:
        batch = power_of_two(law(result["batch"], n_params), data_parallel)
    return lr, batch


def provenance(sweep: ml_collections.ConfigDict, sweep_dir: str | Path,
               config: ml_collections.ConfigDict) -> dict:
    """For plan.json: the peak LR and batch a planned run got, and where each came from."""
    rule = sweep.train.optim.lr_rule
    path = tune_dir(sweep, sweep_dir) / FIT
    batch_fitted = rule == "fitted" and read_fit(path)["batch"]
    return {"peak_lr": peak_lr(config.optim, config.model.d_model),
            "batch_size": config.data.batch_size,
            "lr_source": f"fitted: {path}" if rule == "fitted" else f"{rule} rule",
            "batch_source": f"fitted: {path}" if batch_fitted else (
                "batch_exponent rule" if sweep.batch_exponent else "train.data.batch_size")}


def execute(directory: Path, sweep: ml_collections.ConfigDict, runs: list[Run], runner: str) -> list[str]:
    """Train the runs not done (in `training_order`) with the runner; the lines of those still not
    done after it, each with why."""
    from experiments import launch
    from experiments.isoflop import Progress, train

    todo = [r.name for r in training_order(runs) if not launch.is_done(directory, r.name)]
    print(f"tuning {directory}: {len(runs)} runs, {len(runs) - len(todo)} already done", flush=True)
    report = Progress(directory, runs)
    train(directory, todo, sweep, runner, report, job=f"{sweep.name}-tune")
    report()
    stuck, busy = launch.unfinished(directory, [r.name for r in runs])
    return stuck + busy


def stage(sweep: ml_collections.ConfigDict, sweep_dir: str | Path, runner: str) -> dict | None:
    """Plan, record, train what is missing, and fit once every run is done (None until then,
    with the runs not done listed)."""
    from experiments.isoflop import data_warnings, write_plan

    directory = tune_dir(sweep, sweep_dir).absolute()
    runs = tuning_plan(sweep, directory.parent)
    for line in data_warnings(sweep, runs):
        print(line, flush=True)
    write_plan(directory, cut(sweep), runs)
    left = execute(directory, sweep, runs, runner)
    if left:
        print(f"{len(left)} of {len(runs)} tuning runs not done (rerun the same command to train "
              "them; the fit waits for all):\n  " + "\n  ".join(left), flush=True)
        return None
    result = fit(measured(directory, runs))
    write_json_atomic(directory / FIT, result)
    plot(result, directory)
    return result


def summary(result: dict, directory: Path) -> str:
    """The fitted laws, each size's optimum and the edge warnings, for the console."""
    out = [*result["warnings"]]
    for o in result["optima"]:
        out.append(f"C {sci(o['budget'])}, N {o['n_params']:>12,}: lr_opt {o['lr_opt']:.3g}"
                   + (f" (edge: {o['lr_edge']})" if o["lr_edge"] else "")
                   + (f", batch_opt {o['batch_opt']:.3g}" if "batch_opt" in o else ""))
    for key in ("lr", "batch"):
        if result[key]:
            out.append(f"{key}_opt = {result[key]['k']:.4g} × N^{result[key]['e']:.3f}")
    out.append(f"fit: {directory / FIT}, figure: {directory / FIGURE}; the sweep uses it with "
               "--config.train.optim.lr_rule=fitted")
    return "\n".join(out)


def main(argv: list[str]) -> None:
    from absl import flags

    from lm import cli
    from lm.process import setup

    cli.define_config("isoflop/tiny.py", "sweep config file (its `tune` section)")
    flags.DEFINE_string("sweep_dir", None, "sweep directory (default: the config's sweep_dir); the "
                        "tuning runs live in its tune/")
    flags.DEFINE_bool("dry_run", False, "print the tuning plan with its FLOPs and estimated time, "
                      "and stop")
    flags.DEFINE_float("flops_per_second", 0.0, "dry run: estimate times at this training rate "
                       "instead of measuring this machine")
    flags.DEFINE_enum("runner", None, ["local", "subprocess", "slurm"], "override config.runner")

    def run():
        from experiments import launch
        from experiments.isoflop import data_warnings, dry_run_rate, sweep_path
        from experiments.plan import format_plan

        f = flags.FLAGS
        setup()
        sweep = f.config
        sweep_dir = sweep_path(f.sweep_dir, sweep)
        runner = f.runner or sweep.runner
        try:
            launch.validate_slurm(sweep.slurm)
            if f.dry_run:
                runs = tuning_plan(sweep, sweep_dir)
                for line in data_warnings(sweep, runs):
                    print(line, flush=True)
                print(format_plan(runs, dry_run_rate(runs, f.flops_per_second)))
                print(f"fit: {tune_dir(sweep, sweep_dir) / FIT}")
                return
            result = stage(sweep, sweep_dir, runner)
        except ConfigError as e:
            sys.exit(f"error: {e}")
        if result is None:
            sys.exit(1)
        print(summary(result, tune_dir(sweep, sweep_dir)))

    cli.run(run, argv)


if __name__ == "__main__":
    main(sys.argv)
