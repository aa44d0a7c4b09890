"""Scaling-law analysis: results → DataFrame → Chinchilla approaches 1, 2, 3 → plots → report.
`analysis.run("sweeps/tiny")` does it all; docs/analysis.md shows the functions one by one."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from lm.analysis import plots, report
from lm.analysis.approach1 import fit_approach1
from lm.analysis.approach2 import fit_approach2
from lm.analysis.approach3 import closed_form_optimum, fit_approach3, law
from lm.analysis.load import fit_points, from_table, load
from lm.files import write_bytes_atomic, write_json_atomic

__all__ = ["fit_approach1", "fit_approach2", "fit_approach3", "from_table", "load",
           "optimal_allocation", "predict_loss", "run"]

DEFAULT_BUDGETS = tuple(10.0 ** k for k in range(18, 26))


def optimal_allocation(fit: dict, C: float) -> tuple[float, float]:
    """(N_opt, D_opt) at budget C: closed form for approach 3, the power laws for approaches 1/2."""
    if "alpha" in fit:
        n_opt, d_opt = closed_form_optimum(fit, C)
        return float(n_opt), float(d_opt)
    if "k_N" in fit:
        return float(fit["k_N"] * C ** fit["a"]), float(fit["k_D"] * C ** fit["b"])
    raise ValueError("optimal_allocation needs an approach-3 fit (E, A, B, alpha, beta) or an "
                     f"approach-1/2 fit (k_N, a, k_D, b); got keys {sorted(fit)}")


def predict_loss(fit: dict, N, D):
    """L(N, D) from an approach-3 fit (approaches 1 and 2 do not model the loss)."""
    if "alpha" not in fit:
        raise ValueError("predict_loss needs an approach-3 fit (E, A, B, alpha, beta)")
    return law(fit, N, D)


def _safe(fn, *args, **kwargs) -> dict:
    """A fit that cannot be made is a reported skip, never a crash of the whole analysis."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        return {"skipped": str(e)}


def run(path: str | Path, out: str | Path | None = None, n: str = "total", bootstrap: int = 1000,
        seed: int = 0, budgets: tuple[float, ...] | None = None, tolerance: float = 0.05,
        progress: bool = True) -> dict:
    """Load, fit approaches 1–3 with bootstrap intervals, write fits.json, report.md and PNGs to `out`
    (default: the sweep directory, or the table's folder), and return the fits."""
    path = Path(path)
    out = Path(out) if out is not None else (path if path.is_dir() else path.parent)
    out.mkdir(parents=True, exist_ok=True)
    budgets = DEFAULT_BUDGETS if budgets is None else tuple(budgets)
    df = load(path, n)
    fit_points(df)  # bad values fail here, with the column and row named
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a2 = _safe(fit_approach2, df, bootstrap=bootstrap, seed=seed, tolerance=tolerance,
                   budgets=budgets)
    for w in caught:
        print(f"warning: {w.message}", flush=True)
    a3 = _safe(fit_approach3, df, bootstrap=bootstrap, seed=seed, budgets=budgets,
               progress=progress)
    a3.pop("samples", None)
    for w in a3.get("warnings", []):
        print(f"warning: approach 3: {w}", flush=True)
    a1 = _safe(fit_approach1, df)
    fits = {"source": str(path), "n": n, "approach1": a1, "approach2": a2, "approach3": a3}
    figures = []
    if "budgets" in a2:
        figures.append(plots.isoflop(a2, df, out))
    if "a" in a2 or "alpha" in a3:
        figures.append(plots.optimal(fits, out))
    if "alpha" in a3:
        figures += [plots.contours(a3, df, out), plots.residuals(a3, df, out)]
    if "envelope" in a1 and "a" in a1:
        figures.append(plots.envelope(a1, df, out))
    fits["figures"] = figures
    fits["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(out / "fits.json", fits)
    write_bytes_atomic(out / "report.md", report.render(fits, df, str(path), figures).encode())
    return fits


def summary(fits: dict, next_budget: float | None = None) -> str:
    """The console lines of `python -m lm.analysis` and of a sweep's end: exponents with intervals,
    warnings, and the optimum at `next_budget` (default: ten times the largest budget in the data)."""
    lines = []
    for name in ("approach1", "approach2", "approach3"):
        f = fits.get(name) or {}
        label = name.replace("approach", "approach ")
        if "a" not in f:
            lines.append(f"{label}: skipped ({f.get('skipped', 'not computed')})")
        else:
            ci = f.get("ci") or {}
            lines.append(f"{label}: N_opt ∝ C^{f['a']:.3f}{_ci(ci.get('a'))}, "
                         f"D_opt ∝ C^{f['b']:.3f}{_ci(ci.get('b'))}")
        if "ci_skipped" in f:
            lines.append(f"  no bootstrap interval: only {f['bootstrap_kept']} of {f['bootstrap']} "
                         "resamples gave power laws (too few sizes per budget)")
        if f.get("budgets") and name == "approach2":
            edges = [f"{b['C']:.3g}" for b in f["budgets"] if b["edge"]]
            lines.append(f"  edge minima at budgets: {', '.join(edges)}" if edges else
                         "  every budget has an interior minimum")
        if "alpha" in f:
            lines.append(f"  L = {f['E']:.3f} + {f['A']:.4g}/N^{f['alpha']:.3f} + "
                         f"{f['B']:.4g}/D^{f['beta']:.3f} (fit {f['seconds']:.2f} s, {f['starts']:,} starts)")
        lines += [f"  unreliable: {w}" for w in f.get("warnings", [])]
    C = next_budget if next_budget is not None else _next_budget(fits)
    usable = [n for n in ("approach3", "approach2") if "a" in (fits.get(n) or {})]
    trusted = [n for n in usable if not fits[n].get("warnings")]  # approach 3 unless it is unreliable
    if C and usable:
        name = (trusted or usable)[0]
        n_opt, d_opt = optimal_allocation(fits[name], C)
        lines.append(f"next budget {C:.3g} FLOPs ({name.replace('approach', 'approach ')}): "
                     f"N_opt ≈ {n_opt:.3g}, D_opt ≈ {d_opt:.3g} ({d_opt / n_opt:.1f} tokens/param)")
    return "\n".join(lines)


def _ci(lo_hi: list | None) -> str:
    text = report.interval(lo_hi, ".3f")
    return "" if text == "—" else f" {text}"


def _next_budget(fits: dict) -> float | None:
    """Ten times the largest budget approach 2 saw (fitted or skipped), None without budgets."""
    a2 = fits.get("approach2") or {}
    seen = [b["C"] for b in a2.get("budgets", []) + a2.get("budgets_skipped", [])]
    return 10 * max(seen) if seen else None
