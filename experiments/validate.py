"""Checking the law by extrapolation, as Chinchilla checked itself: approach 3's compute-optimal model
of a budget beyond the sweep (config.validate_factor × its largest), planned by the sweep's own rules,
trained like its runs in SWEEP/validation/ (never a point of the fits), and its eval loss held against
the law's prediction and bootstrap interval (docs/experiments.md)."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import replace
from pathlib import Path

import ml_collections

from experiments.plan import Run, format_plan, plan, sci
from lm.analysis.approach3 import closed_form_optimum, fit_approach3, law
from lm.analysis.bootstrap import percentile_ci
from lm.analysis.load import load
from lm.analysis.report import interval
from lm.config import ConfigError
from lm.files import run_dir, write_bytes_atomic, write_json_atomic
from lm.sizing import shape_for_params

DIR = "validation"  # SWEEP/validation: its own plan.json, runs/ and status.json, out of the loader's reach
HEADING = "## Validation"


def directory(sweep_dir: str | Path) -> Path:
    """Where the validation run is planned and trained: a sweep directory of its own."""
    return Path(sweep_dir) / DIR


def budget(sweep: ml_collections.ConfigDict) -> float:
    """The validation budget: validate_factor × the sweep's largest."""
    return sweep.validate_factor * max(sweep.budgets)


def check_options(sweep: ml_collections.ConfigDict, analyse: bool) -> None:
    """--validate needs the analysis with intervals: said before anything trains."""
    if not analyse:
        raise ConfigError("--validate needs the sweep's fits: drop --analyse=false")
    if sweep.analysis.bootstrap == 0:
        raise ConfigError("--validate with config.analysis.bootstrap = 0 is not allowed: the comparison "
                          "needs approach 3's interval, so set it > 0 (e.g. 1000)")


def check_fit(a3: dict) -> None:
    """Approach 3's fit (fits.json's entry) is there and has intervals, or one line says why not."""
    if "alpha" not in a3:
        raise ConfigError(f"--validate: approach 3 was skipped ({a3.get('skipped', 'not computed')}), "
                          "so there is no law to check")
    if "ci" not in a3:
        raise ConfigError("--validate: approach 3 has no bootstrap interval (fitted with bootstrap = 0), "
                          "so there is nothing to check the run against")


def refit(sweep_dir: str | Path, n: str, a3: dict, C: float) -> dict:
    """Approach 3 refitted as the sweep's analysis fitted it (its resamples and seed), now keeping the
    bootstrap samples (fits.json drops them), with the optimum at C and its interval."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # runs left out: the analysis has said which
        df = load(sweep_dir, n)
    return fit_approach3(df, bootstrap=a3["bootstrap"], seed=a3["seed"], budgets=(C,))


def plan_run(sweep: ml_collections.ConfigDict, fit: dict, sweep_dir: str | Path) -> Run:
    """The run at approach 3's optimum N_opt of the validation budget: the sweep's shape rules pick the
    size, plan.plan its batch, steps (the same FLOP tolerance) and optimizer; cosine or WSD as the sweep."""
    C = budget(sweep)
    n_opt = float(closed_form_optimum(fit, C)[0])
    m = shape_for_params(n_opt, aspect_ratio=sweep.aspect_ratio, head_dim=sweep.head_dim,
                         ffn_ratio=sweep.ffn_ratio, base=sweep.train.model, count=sweep.analysis.n)
    v = sweep.copy_and_resolve_references()
    v.budgets, v.shapes = (C,), (f"{m.d_model}x{m.n_layers}",)
    v.mode = "cosine" if sweep.mode == "cosine" else "wsd"  # one size: a grid is a lone WSD trunk
    v.seeds, v.seeds_budgets = 1, 0  # one run: its own noise is what the comparison reports
    (r,) = plan(v, sweep_dir)  # the sweep's own dir: a fitted LR rule reads its tuning fit
    name = f"V{sci(C)}-N{sci(r.n_params)}"
    return replace(r, name=name, workdir=str(run_dir(directory(sweep_dir), name)))


def preview(sweep: ml_collections.ConfigDict, a3: dict | None, sweep_dir: str | Path,
            seconds_per_flop: float | None) -> str:
    """The dry run's lines: the validation run as planned from fits.json's approach 3, or when it is."""
    C = budget(sweep)
    if not a3 or "alpha" not in a3:
        return (f"validation: planned after the fits (no approach-3 fit in {Path(sweep_dir) / 'fits.json'} "
                f"yet), at approach 3's optimum for {C:.3g} FLOPs ({sweep.validate_factor:g} × the "
                "largest budget)")
    r = plan_run(sweep, a3, sweep_dir)
    n_opt, d_opt = (float(x) for x in closed_form_optimum(a3, C))
    return (f"validation at {C:.3g} FLOPs ({sweep.validate_factor:g} × the largest budget), from "
            f"{Path(sweep_dir) / 'fits.json'}: approach 3's optimum N_opt ≈ {n_opt:.3g}, D_opt ≈ "
            f"{d_opt:.3g}\n" + format_plan([r], seconds_per_flop))


def compare(fit: dict, run: Run, result: dict, n: str) -> dict:
    """What validation.json holds: the trained run, approach 3's optimum at its budget, the law's loss at
    the trained (N, D) with its bootstrap interval, the observed eval loss and whether it lies inside."""
    N = run.n_params if n == "total" else run.n_params_non_embedding
    predicted = float(law(fit, N, run.tokens))
    lo, hi = percentile_ci({"loss": law(fit["samples"], N, run.tokens)})["loss"]
    observed = result.get("eval_loss")
    observed = float(observed) if isinstance(observed, int | float) else math.nan
    return {"run": run.name, "status": result["status"], "shape": run.shape, "budget": run.budget,
            "flops": run.flops, "n": n, "N": N, "D": run.tokens, "steps": run.steps,
            "optimum": fit["predictions"][0], "law": {k: fit[k] for k in ("E", "A", "B", "alpha", "beta")},
            "warnings": fit["warnings"], "predicted_loss": predicted, "predicted_loss_ci": [lo, hi],
            "observed_loss": observed, "difference": observed - predicted,
            "inside": bool(lo <= observed <= hi)}


def verdict(v: dict) -> str:
    """Observed against predicted, in one sentence."""
    ci = interval(v["predicted_loss_ci"], ".4f")
    if not math.isfinite(v["observed_loss"]):
        return f"The run ended {v['status']} with no eval loss; predicted {v['predicted_loss']:.4f} {ci}"
    where = "inside" if v["inside"] else "outside"
    return (f"Eval loss {v['observed_loss']:.4f} against the predicted {v['predicted_loss']:.4f}: "
            f"{v['difference']:+.4f} ({v['difference'] / v['predicted_loss']:+.1%}), {where} the 95 % "
            f"interval {ci}")


def observed(v: dict) -> str:
    """The observed eval loss, or why there is none."""
    x = v["observed_loss"]
    return f"{x:.4f} observed" if math.isfinite(x) else f"— ({v['status']})"


def summary(v: dict) -> str:
    """The console lines."""
    o = v["optimum"]
    return (f"validation {v['run']} ({v['shape']}, N = {v['N']:.3g}, D = {v['D']:.3g}, {v['flops']:.3g} "
            f"FLOPs; approach 3's optimum at {o['C']:.3g}: N_opt ≈ {o['N_opt']:.3g} "
            f"{interval(o.get('N_opt_ci'))}, D_opt ≈ {o['D_opt']:.3g} {interval(o.get('D_opt_ci'))})\n"
            f"  {verdict(v)}" + "".join(f"\n  unreliable: {w}" for w in v["warnings"]))


def section(v: dict) -> str:
    """report.md's validation section."""
    o = v["optimum"]
    lines = [HEADING, "",
             f"Approach 3 checked by extrapolation: its compute-optimal model of C = {o['C']:.3g} FLOPs, "
             f"beyond the sweep's budgets, trained as the sweep's runs are (`{DIR}/runs/{v['run']}`, not a "
             f"point of the fits; N counts {v['n']} parameters).", "",
             "| | N | D | loss |", "| --- | --- | --- | --- |",
             f"| approach 3's optimum at C | {o['N_opt']:.3g} {interval(o.get('N_opt_ci'))} | "
             f"{o['D_opt']:.3g} {interval(o.get('D_opt_ci'))} | "
             f"{o['loss']:.4f} {interval(o.get('loss_ci'), '.4f')} |",
             f"| law at the trained (N, D) | {v['N']:,} | {v['D']:,} | {v['predicted_loss']:.4f} "
             f"{interval(v['predicted_loss_ci'], '.4f')} |",
             f"| trained: {v['shape']}, {v['steps']:,} steps, {v['flops']:.3g} FLOPs | {v['N']:,} | "
             f"{v['D']:,} | {observed(v)} |", "",
             f"{verdict(v)}."]
    lines += [f"\n**Unreliable:** {w}." for w in v["warnings"]]
    return "\n".join(lines) + "\n"


def with_section(report: str, text: str) -> str:
    """report.md with `text` as its validation section, in place of an older one, else at the end."""
    rest = re.sub(rf"(^|\n){re.escape(HEADING)}\n.*?(?=\n## |\Z)", "", report, flags=re.S)
    return rest.rstrip("\n") + "\n\n" + text


def record(sweep_dir: str | Path, v: dict) -> None:
    """validation.json and report.md's section, each written atomically."""
    sweep_dir = Path(sweep_dir)
    write_json_atomic(sweep_dir / "validation.json", v)
    path = sweep_dir / "report.md"
    write_bytes_atomic(path, with_section(path.read_text() if path.exists() else "", section(v)).encode())
