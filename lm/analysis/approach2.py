"""Approach 2: IsoFLOP profiles. Per budget a parabola of loss in log N; its vertex is N_opt(C), and
the vertices give the power laws N_opt = k_N·C^a, D_opt = k_D·C^b (docs/analysis.md)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from lm.analysis import checks
from lm.analysis.bootstrap import noise_share, percentile_ci, replicate_means, second_stage
from lm.analysis.load import labelled
from lm.analysis.replicates import points, pooled_sd, replicated

MIN_POINTS = 3  # a parabola needs three distinct sizes
# Bootstrap intervals need at least this fraction of resamples to give power laws: resampling
# with replacement loses sizes, and with few per budget only near-copies of the data survive.
MIN_KEPT = 0.5


def vertex(log_n: np.ndarray, loss: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(x*, loss at x*, coefficients) of the least-squares parabola; x* = nan if it opens downward."""
    coef = np.polyfit(log_n, loss, 2)
    if not coef[0] > 0:
        return float("nan"), float("nan"), coef
    x = -coef[1] / (2 * coef[0])
    return float(x), float(np.polyval(coef, x)), coef


def power_law(C: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(k, exponent) of y = k·C^exponent, least squares in log space."""
    slope, intercept = np.polyfit(np.log(C), np.log(y), 1)
    return float(np.exp(intercept)), float(slope)


def _profiles(groups: list[tuple[float, np.ndarray, np.ndarray, np.ndarray]]) -> list[dict]:
    """Vertex of every budget: groups of (C, log N, loss, log(FLOPs per token / N))."""
    out = []
    for C, log_n, loss, log_ratio in groups:
        x, loss_min, coef = vertex(log_n, loss)
        if np.isfinite(x):
            order = np.argsort(log_n)
            with np.errstate(over="ignore"):  # a nearly flat parabola (a resample): vertex beyond float64
                n_opt = float(np.exp(x))
                fpt = n_opt * float(np.exp(np.interp(x, log_n[order], log_ratio[order])))
            edge = not (log_n.min() <= x <= log_n.max())
        else:  # no minimum: the profile falls (or rises) across the whole range
            best = int(np.argmin(loss))
            n_opt, loss_min = float(np.exp(log_n[best])), float(loss[best])
            fpt, edge = n_opt * float(np.exp(log_ratio[best])), True
        out.append({"C": float(C), "N_opt": n_opt, "D_opt": float(C / fpt), "loss_min": loss_min,
                    "edge": bool(edge), "points": int(len(log_n)), "N_min": float(np.exp(log_n.min())),
                    "N_max": float(np.exp(log_n.max())), "parabola": [float(c) for c in coef]})
    return out


def _laws(budgets: list[dict]) -> dict | None:
    """Power laws through the interior vertices (all finite vertices when fewer than two are interior)."""
    finite = [b for b in budgets if np.isfinite(b["N_opt"]) and np.isfinite(b["D_opt"]) and b["N_opt"] > 0
              and b["D_opt"] > 0]
    used = [b for b in finite if not b["edge"]]
    if len(used) < 2:
        used = finite
    if len({b["C"] for b in used}) < 2:
        return None
    C = np.array([b["C"] for b in used])
    k_n, a = power_law(C, np.array([b["N_opt"] for b in used]))
    k_d, b_ = power_law(C, np.array([b["D_opt"] for b in used]))
    return {"a": a, "b": b_, "k_N": k_n, "k_D": k_d, "budgets_used": [float(c) for c in C]}


def fit_approach2(df: pd.DataFrame, bootstrap: int = 0, seed: int = 0, tolerance: float = 0.05,
                  budgets: tuple[float, ...] = ()) -> dict:
    """IsoFLOP fit; a reported skip ({"skipped": reason}) when the data cannot support one, and in
    `warnings` the reasons not to trust it (lm.analysis.checks)."""
    pts, labels, losses = points(df, tolerance)
    if len(pts) == 0:
        return {"skipped": "no completed points to fit"}
    log_n = np.log(pts["N"].to_numpy(np.float64))
    loss = pts["loss"].to_numpy(np.float64)
    fpt = pts["flops_per_token"].to_numpy(np.float64) if "flops_per_token" in pts else 6 * np.exp(log_n)
    log_ratio = np.log(np.where(np.isfinite(fpt), fpt, 6 * np.exp(log_n)) / np.exp(log_n))
    groups, reps, skipped = [], [], []
    for C in np.unique(labels):
        m = labels == C
        if len(np.unique(log_n[m])) < MIN_POINTS:
            skipped.append({"C": float(C), "reason": f"{len(np.unique(log_n[m]))} distinct sizes, "
                            f"a parabola needs {MIN_POINTS}"})
        else:
            groups.append((C, log_n[m], loss[m], log_ratio[m]))
            reps.append(losses[m])
    if not groups:
        return {"skipped": _single_points(pts, labels, tolerance) or "no budget has 3 distinct model sizes",
                "budgets_skipped": skipped}
    profiles = _profiles(groups)
    for b in profiles:
        if b["edge"]:
            warnings.warn(f"approach 2: budget {b['C']:.3g} has its minimum at N = {b['N_opt']:.3g}, "
                          f"outside its sampled sizes [{b['N_min']:.3g}, {b['N_max']:.3g}] (edge minimum)",
                          stacklevel=2)
    fit: dict = {"budgets": profiles, "budgets_skipped": skipped}
    laws = _laws(profiles)
    if laws is None:
        fit["skipped"] = "power laws need at least two budgets"
        if hint := _single_points(pts, labels, tolerance):
            fit["skipped"] += f" ({hint})"
        return fit
    fit.update(laws)
    fit["predictions"] = [prediction(fit, C) for C in budgets]
    if bootstrap > 0:
        _intervals(fit, groups, reps, bootstrap, seed, pooled_sd(losses))
    edges = [f"{b['C']:.3g}" for b in profiles if b["edge"] and b["C"] in fit["budgets_used"]]
    fit["warnings"] = checks.budgets(len(fit["budgets_used"])) + checks.exponents(fit) + (
        [f"the power laws go through edge minima (budgets {', '.join(edges)}), vertices outside the "
         "sampled sizes"] if edges else [])
    return fit


def _single_points(pts: pd.DataFrame, labels: np.ndarray, tolerance: float) -> str | None:
    """Why a table grouped by C has too few budgets to fit, when most of its budgets hold a single
    point (each row's C differs a little, e.g. real runs' 6ND); None otherwise."""
    if labelled(pts) or len(labels) < 2:
        return None
    counts = np.unique(labels, return_counts=True)[1]
    singles = int((counts == 1).sum())
    if singles * 2 <= len(counts):
        return None
    which = "every budget has" if singles == len(counts) else f"{singles} of {len(counts)} budgets have"
    return (f"{which} a single point: rows are grouped into budgets by C within tolerance "
            f"{100 * tolerance:.3g} % (C defaults to 6ND); add a budget column (each row's nominal C) "
            "or raise --tolerance")


def _intervals(fit: dict, groups: list, reps: list[np.ndarray], n: int, seed: int, sd: float) -> None:
    """Bootstrap intervals of the power laws and predictions, or `ci_skipped` when too few resamples fit;
    with replicates also the points-only intervals (`ci_points`) and the share run noise makes."""
    samples = _bootstrap(groups, n, seed, reps, sd)
    kept = int(np.isfinite(samples["a"]).sum())
    fit.update(bootstrap=n, seed=seed, bootstrap_kept=kept)
    if kept < MIN_KEPT * n:
        fit["ci_skipped"] = (f"only {kept} of {n} resamples kept {MIN_POINTS} distinct sizes in "
                             "two budgets; an interval from them would describe that subset (too few "
                             "sizes per budget for a bootstrap)")
        warnings.warn(f"approach 2: no bootstrap interval: {fit['ci_skipped']}", stacklevel=3)
        return
    ci = percentile_ci(samples)
    fit.update({"a_ci": ci["a"], "b_ci": ci["b"], "ci": ci})
    if any(replicated(r) for r in reps):
        fit["ci_points"] = percentile_ci(_bootstrap(groups, n, seed))
        fit["noise_share"] = noise_share(ci, fit["ci_points"])
    for p in fit["predictions"]:
        with np.errstate(over="ignore", invalid="ignore"):  # resamples with steep laws overflow: no interval
            n_opt, d_opt = samples["k_N"] * p["C"] ** samples["a"], samples["k_D"] * p["C"] ** samples["b"]
        p.update({f"{k}_ci": v for k, v in percentile_ci({"N_opt": n_opt, "D_opt": d_opt}).items()})


def _bootstrap(groups: list, n: int, seed: int, reps: list[np.ndarray] | None = None,
               sd: float = 0.0) -> dict[str, np.ndarray]:
    """Resample points with replacement within each budget and, given each budget's replicate losses
    `reps`, each drawn point's replicates (a two-stage bootstrap; one-run points get run noise of the
    pooled `sd`), and refit everything, n times."""
    rng, stage2 = np.random.default_rng(seed), second_stage(seed)
    keys = ("a", "b", "k_N", "k_D")
    samples = {k: np.full(n, np.nan) for k in keys}
    for r in range(n):
        resampled = []
        for g, (C, log_n, loss, log_ratio) in enumerate(groups):
            i = rng.integers(0, len(log_n), len(log_n))
            if len(np.unique(log_n[i])) >= MIN_POINTS:
                drawn = loss[i] if reps is None else replicate_means(
                    reps[g][i], np.ones((1, len(i))), stage2, sd)
                resampled.append((C, log_n[i], drawn.ravel(), log_ratio[i]))
        with np.errstate(over="ignore"):  # a resample's steep power law: k = e^intercept beyond float64
            laws = _laws(_profiles(resampled)) if len(resampled) >= 2 else None
        for k in keys:
            samples[k][r] = laws[k] if laws else np.nan
    return samples


def prediction(fit: dict, C: float) -> dict:
    n_opt, d_opt = fit["k_N"] * C ** fit["a"], fit["k_D"] * C ** fit["b"]
    return {"C": float(C), "N_opt": float(n_opt), "D_opt": float(d_opt),
            "tokens_per_param": float(d_opt / n_opt)}
