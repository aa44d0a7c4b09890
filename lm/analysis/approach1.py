"""Approach 1: the lower envelope of the training curves (the lowest-loss run at each FLOP count),
and power laws of N and D along it. A WSD run's curve is its size's finished runs (docs/experiments.md,
grid sweeps)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lm.analysis import checks
from lm.analysis.approach2 import power_law


def curves(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per run of replicate 0 its included eval points, sorted by FLOPs; but a WSD run's evals before its
    end are not finished runs (stable phase, partial cooldown), so per size the final points of its WSD
    runs (a trunk's and its branches') form that size's curve instead."""
    if "point" not in df.columns:
        return {}
    if "replicate" in df.columns:  # replicate 0's curves: the lowest of several seeds' is a lucky one
        df = df[df["replicate"] == 0]
    ok = df["included"].astype(bool) & np.isfinite(df["C"]) & (df["C"] > 0) & np.isfinite(df["loss"])
    wsd = (df["schedule"] == "wsd") if "schedule" in df.columns else pd.Series(False, index=df.index)
    out = {run: g for run, g in df[ok & (df["point"] == "eval") & ~wsd].groupby("run")}
    out |= {f"N={n:.4g} (wsd ends)": g for n, g in df[ok & (df["point"] == "final") & wsd].groupby("N")}
    return {name: g.sort_values("C") for name, g in out.items() if len(g) >= 2}


def fit_approach1(df: pd.DataFrame, n_grid: int = 40) -> dict:
    """Envelope and its power laws; a reported skip when the sweep has no training curves."""
    runs = curves(df)
    if len(runs) < 2:
        return {"skipped": "needs training curves (two or more eval points) from at least two runs, or "
                           "WSD runs at two or more token counts per size; set train.eval_every below "
                           "the run length"}
    lo = min(np.log(g["C"].min()) for g in runs.values())
    hi = max(np.log(g["C"].max()) for g in runs.values())
    envelope = []
    for log_c in np.linspace(lo, hi, n_grid):
        best = None
        for run, g in runs.items():
            c = np.log(g["C"].to_numpy())
            if not c[0] <= log_c <= c[-1]:
                continue
            loss = float(np.interp(log_c, c, g["loss"].to_numpy()))
            if best is None or loss < best[1]:
                d = float(np.exp(np.interp(log_c, c, np.log(g["D"].to_numpy()))))
                best = (run, loss, float(g["N"].iloc[0]), d)
        if best:
            envelope.append({"C": float(np.exp(log_c)), "run": best[0], "loss": best[1],
                             "N": best[2], "D": best[3]})
    if len({e["N"] for e in envelope}) < 2:
        return {"skipped": "the envelope is a single model: sizes must differ along it",
                "envelope": envelope}
    C = np.array([e["C"] for e in envelope])
    k_n, a = power_law(C, np.array([e["N"] for e in envelope]))
    k_d, b = power_law(C, np.array([e["D"] for e in envelope]))
    return {"a": a, "b": b, "k_N": k_n, "k_D": k_d, "envelope": envelope, "runs": len(runs),
            "warnings": checks.envelope([e["N"] for e in envelope])}
