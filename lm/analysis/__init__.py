"""Scaling-law analysis: results → DataFrame → Chinchilla approaches 1, 2, 3 → plots → report.
`analysis.run("sweeps/tiny")` does it all; docs/analysis.md shows the functions one by one."""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

from lm.analysis import checks, plots, report
from lm.analysis.approach1 import fit_approach1
from lm.analysis.approach2 import fit_approach2
from lm.analysis.approach3 import closed_form_optimum, fit_approach3, law
from lm.analysis.load import check_n, from_table, is_type, load
from lm.analysis.replicates import noise
from lm.config import ConfigError
from lm.files import write_bytes_atomic, write_json_atomic

__all__ = ["fit_approach1", "fit_approach2", "fit_approach3", "from_table", "load",
           "optimal_allocation", "predict_loss", "run", "summary"]

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


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name} = {value!r} is not allowed: {allowed}")


def check_options(n: str, bootstrap: int, seed: int, budgets: tuple[float, ...], tolerance: float) -> None:
    """run()'s options, before anything is read: a bad one is a ConfigError naming it."""
    check_n(n)
    _check(is_type(bootstrap, int) and bootstrap >= 0, "bootstrap", bootstrap,
           "must be an integer >= 0 (0: no intervals)")
    _check(is_type(seed, int), "seed", seed, "must be an integer")
    _check(all(is_type(c, float) and math.isfinite(c) and c > 0 for c in budgets), "budgets", budgets,
           "must be positive FLOP counts")
    _check(is_type(tolerance, float) and 0 <= tolerance < 1, "tolerance", tolerance,
           "must lie in [0, 1): the relative spread of C within one budget")


def run(path: str | Path, out: str | Path | None = None, n: str = "total", bootstrap: int = 1000,
        seed: int = 0, budgets: tuple[float, ...] | None = None, tolerance: float = 0.05,
        progress: bool = True) -> dict:
    """Load, fit approaches 1–3 with bootstrap intervals, write fits.json, report.md and PNGs to `out`
    (default: the sweep directory, or the table's folder), and return the fits. A run left out for a
    damaged file is a `warning:` line; what the fits' own warnings say, `summary` prints."""
    budgets = DEFAULT_BUDGETS if budgets is None else tuple(budgets)
    check_options(n, bootstrap, seed, budgets, tolerance)
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        df = load(path, n)
    for w in caught:
        print(f"warning: {w.message}", flush=True)
    out = Path(out) if out is not None else (path if path.is_dir() else path.parent)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # edge minima, no interval: in the fit, for summary()
        a2 = _safe(fit_approach2, df, bootstrap=bootstrap, seed=seed, tolerance=tolerance,
                   budgets=budgets)
    a3 = _safe(fit_approach3, df, bootstrap=bootstrap, seed=seed, budgets=budgets,
               progress=progress)
    a3.pop("samples", None)
    a1 = _safe(fit_approach1, df)
    fits = {"source": str(path), "n": n, "noise": noise(df, tolerance), "approach1": a1, "approach2": a2,
            "approach3": a3}
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
    warnings, the run-to-run noise and its share of a's intervals (with seed replicates), and the optimum
    at `next_budget` (default: ten times the largest budget in the data), that line ending in
    `unreliable: ...` when it should not be trusted."""
    lines = []
    for name in ("approach1", "approach2", "approach3"):
        f = fits.get(name) or {}
        if "a" not in f:
            lines.append(f"{_label(name)}: skipped ({f.get('skipped', 'not computed')})")
        else:
            ci = f.get("ci") or {}
            lines.append(f"{_label(name)}: N_opt ∝ C^{f['a']:.3f}{_ci(ci.get('a'))}, "
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
    lines += _noise(fits)
    C = next_budget if next_budget is not None else _next_budget(fits)
    usable = [n for n in ("approach3", "approach2") if "a" in (fits.get(n) or {})]
    trusted = [n for n in usable if not fits[n].get("warnings")]  # approach 3 unless it is unreliable
    if C and usable:
        name = (trusted or usable)[0]
        n_opt, d_opt = optimal_allocation(fits[name], C)
        caveats = _caveats(fits, name, usable, trusted, C, n_opt)
        lines.append(f"next budget {C:.3g} FLOPs ({_label(name)}): N_opt ≈ {n_opt:.3g}, D_opt ≈ {d_opt:.3g} "
                     f"({d_opt / n_opt:.1f} tokens/param)"
                     + ("; unreliable: " + "; ".join(caveats) if caveats else ""))
    return "\n".join(lines)


def _label(name: str) -> str:
    return name.replace("approach", "approach ")


def _noise(fits: dict) -> list[str]:
    """The run-to-run noise line: its sd, and how much of each approach's interval of a it makes."""
    noise = fits.get("noise") or {}
    if "sd" not in noise:
        return []
    shares = [f"{_label(name)} {report.share(fits[name]['noise_share']['a'])}"
              for name in ("approach2", "approach3") if "noise_share" in (fits.get(name) or {})]
    return [f"run-to-run noise: sd {noise['sd']:.4f} of the final eval loss over {noise['points']} points "
            f"with replicates (up to {noise['replicates']} each)"
            + (f"; its share of a's interval: {', '.join(shares)}" if shares else "")]


def _caveats(fits: dict, name: str, usable: list[str], trusted: list[str], C: float,
             n_opt: float) -> list[str]:
    """Why the optimum at C from fit `name` (the first trusted one, else the first usable) should not be
    trusted: every usable fit has warnings, C is further out than the data reach, or another trusted
    approach disagrees (criteria: lm.analysis.checks)."""
    out = [] if trusted else [f"{' and '.join(map(_label, usable))} "
                              f"{'have' if len(usable) > 1 else 'has'} the warnings above"]
    lo_hi = _budget_range(fits)
    if lo_hi:
        out += checks.extrapolation(C, *lo_hi)
    for other in trusted:
        if other != name:
            out += checks.disagreement(n_opt, optimal_allocation(fits[other], C)[0], _label(other))
    return out


def _ci(lo_hi: list | None) -> str:
    text = report.interval(lo_hi, ".3f")
    return "" if text == "—" else f" {text}"


def _budget_range(fits: dict) -> tuple[float, float] | None:
    """Smallest and largest budget in the data (approach 2's, fitted or skipped, else approach 3's)."""
    a2 = fits.get("approach2") or {}
    seen = [b["C"] for b in a2.get("budgets", []) + a2.get("budgets_skipped", [])]
    seen = seen or (fits.get("approach3") or {}).get("C_range") or []
    return (min(seen), max(seen)) if seen else None


def _next_budget(fits: dict) -> float | None:
    """Ten times the largest budget in the data, None without budgets."""
    lo_hi = _budget_range(fits)
    return 10 * lo_hi[1] if lo_hi else None
