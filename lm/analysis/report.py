"""report.md: the fits with their intervals, predictions per budget, and what was left out."""

from __future__ import annotations

import math

import pandas as pd

SHOWN = ("E", "A", "B", "alpha", "beta", "a", "b")  # the fitted parameters the noise table lists


def _ci(fit: dict, key: str) -> str:
    return interval((fit.get("ci") or {}).get(key))


def interval(lo_hi: list | None, fmt: str = ".3g") -> str:
    """`[lo, hi]`, or `—` when there is no interval (skipped, or a failed bootstrap: null or nan)."""
    ok = lo_hi and all(x is not None and math.isfinite(x) for x in lo_hi)
    return f"[{lo_hi[0]:{fmt}}, {lo_hi[1]:{fmt}}]" if ok else "—"


def share(x: float | None) -> str:
    """A share as a percentage, `—` when there is none (null or nan)."""
    return f"{100 * x:.0f} %" if x is not None and math.isfinite(x) else "—"


def noise(fits: dict) -> list[str]:
    """The run-to-run noise section: the pooled sd overall and per budget, and per fitted parameter its
    two-stage and points-only intervals and the share run noise makes."""
    n = fits.get("noise") or {}
    if "sd" not in n:
        return ["No seed replicates (config.seeds = 1): run-to-run noise is not measured, and the intervals "
                "resample points only."]
    lines = [f"Final eval loss across seed replicates: pooled sd **{n['sd']:.4g}** over {n['points']} "
             f"points with replicates (up to {n['replicates']} runs each). The fits take each point's "
             "replicate mean; their bootstrap resamples the points and, within each drawn point, its "
             "replicates.", "", "| budget C | points with replicates | sd |", "| --- | --- | --- |"]
    lines += [f"| {b['C']:.3g} | {b['points']} | {b['sd']:.4g} |" for b in n["budgets"]]
    rows = [(name, k, fit) for name in ("approach2", "approach3") for fit in [fits.get(name) or {}]
            if "noise_share" in fit for k in SHOWN if k in fit["noise_share"]]
    if rows:
        lines += ["", "Share of each 95 % interval from run noise, 1 − (points-only width / two-stage "
                  "width)²:", "", "| fit | parameter | two-stage 95 % | points only 95 % | from run noise |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {name.replace('approach', 'approach ')} | {k} | {_ci(fit, k)} | "
                  f"{interval(fit['ci_points'].get(k))} | {share(fit['noise_share'][k])} |"
                  for name, k, fit in rows]
    return lines


def _predictions(preds: list[dict]) -> list[str]:
    lines = ["| C | N_opt | D_opt | tokens/param | loss | N_opt 95 % | D_opt 95 % |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for p in preds:
        loss = f"{p['loss']:.3f}" if "loss" in p else "—"
        lines.append(f"| {p['C']:.0e} | {p['N_opt']:.3g} | {p['D_opt']:.3g} | {p['tokens_per_param']:.1f} | "
                     f"{loss} | {interval(p.get('N_opt_ci'))} | {interval(p.get('D_opt_ci'))} |")
    return lines


def render(fits: dict, df: pd.DataFrame, source: str, figures: list[str]) -> str:
    lines = [f"# Scaling-law fits: {source}", ""]
    finals = df[df["point"] == "final"]
    lines += [f"{int(finals['included'].sum())} of {len(finals)} runs enter the fits; N counts "
              f"{fits['n']} parameters.", ""]
    a2 = fits.get("approach2", {})
    lines += ["## Approach 2: IsoFLOP profiles", ""]
    if "budgets" in a2:
        lines += ["| budget C | points | N range | N_opt | D_opt | tokens/param | loss_min | minimum |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for b in a2["budgets"]:
            lines.append(f"| {b['C']:.3g} | {b['points']} | {b['N_min']:.3g}–{b['N_max']:.3g} | "
                         f"{b['N_opt']:.3g} | {b['D_opt']:.3g} | {b['D_opt'] / b['N_opt']:.1f} | "
                         f"{b['loss_min']:.4f} | {'**edge**' if b['edge'] else 'interior'} |")
        lines.append("")
    if "a" in a2:
        lines += [f"N_opt = {a2['k_N']:.4g} · C^**{a2['a']:.3f}** (95 % {_ci(a2, 'a')}), "
                  f"D_opt = {a2['k_D']:.4g} · C^**{a2['b']:.3f}** (95 % {_ci(a2, 'b')})", ""]
    if "ci_skipped" in a2:
        lines += [f"No bootstrap interval: {a2['ci_skipped']}.", ""]
    lines += [f"**Unreliable:** {w}.\n" for w in a2.get("warnings", [])]
    if "skipped" in a2:
        lines += [f"Skipped: {a2['skipped']}.", ""]
    for s in a2.get("budgets_skipped", []):
        lines += [f"- budget {s['C']:.3g} left out: {s['reason']}"]
    a3 = fits.get("approach3", {})
    lines += ["", "## Approach 3: L(N, D) = E + A/N^α + B/D^β", ""]
    if "alpha" in a3:
        lines += ["| parameter | value | 95 % interval |", "| --- | --- | --- |"]
        lines += [f"| {k} | {a3[k]:.4g} | {_ci(a3, k)} |" for k in ("E", "A", "B", "alpha", "beta", "a", "b")]
        lines += ["", f"Huber (δ = {a3['huber_delta']:g}) objective {a3['objective']:.4g} over "
                  f"{a3['points']} points, best of {a3['starts']:,} L-BFGS starts in {a3['seconds']:.2f} s."]
        lines += [f"\n**Unreliable:** {w}." for w in a3.get("warnings", [])]
    else:
        lines += [f"Skipped: {a3.get('skipped', 'not computed')}."]
    a1 = fits.get("approach1", {})
    lines += ["", "## Approach 1: envelope of training curves", ""]
    if "a" in a1:
        lines += [f"N_opt ∝ C^**{a1['a']:.3f}**, D_opt ∝ C^**{a1['b']:.3f}** along the lower envelope "
                  f"of {a1['runs']} runs' curves ({len(a1['envelope'])} envelope points)."]
        lines += [f"\n**Unreliable:** {w}." for w in a1.get("warnings", [])]
    else:
        lines += [f"Skipped: {a1.get('skipped', 'not computed')}."]
    for name, fit in (("approach 3", a3), ("approach 2", a2)):
        if fit.get("predictions"):
            caveat = ", unreliable: see above" if fit.get("warnings") else ""
            lines += ["", f"## Compute-optimal predictions ({name}{caveat})", "",
                      *_predictions(fit["predictions"])]
    lines += ["", "## Run-to-run noise", "", *noise(fits)]
    left = finals[~finals["included"].astype(bool)]
    lines += ["", "## Runs left out", ""]
    lines += [f"- `{r.run}`: {r.reason}" for r in left.itertuples()] or ["None."]
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
