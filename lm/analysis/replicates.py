"""Seed replicates: runs of one point (budget, N, D) that differ only in initialisation and data order.
The fits take each point's replicate mean; the spread across replicates is the run-to-run noise."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lm.analysis.load import fit_points, group_budgets


def points(df: pd.DataFrame, tolerance: float = 0.05) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The fits' points (load.fit_points), a row per point: its first run's row with the replicate mean
    loss; with each point's budget label and its replicates' losses (points × most replicates,
    NaN-padded). Rows that share a budget, N and D are replicates of one point."""
    pts = fit_points(df)
    if len(pts) == 0:
        return pts, np.zeros(0), np.zeros((0, 1))
    labels = group_budgets(pts, tolerance)
    key = pd.DataFrame({"C": labels, "N": pts["N"].to_numpy(np.float64), "D": pts["D"].to_numpy(np.float64)})
    groups = key.groupby(["C", "N", "D"], sort=False)
    point, rank = groups.ngroup().to_numpy(), groups.cumcount().to_numpy()
    losses = np.full((point.max() + 1, rank.max() + 1), np.nan)
    losses[point, rank] = pts["loss"].to_numpy(np.float64)
    first = np.flatnonzero(rank == 0)  # in point order: groups are numbered as first seen
    return pts.iloc[first].assign(loss=np.nanmean(losses, 1)), labels[first], losses


def replicated(losses: np.ndarray) -> bool:
    """Whether any point has two or more replicates."""
    return bool((np.isfinite(losses).sum(1) > 1).any())


def spread(losses: np.ndarray) -> np.ndarray:
    """Per point the standard deviation of its replicates' losses (0 with one replicate)."""
    r = np.isfinite(losses).sum(1)
    return np.sqrt(np.nansum((losses - np.nanmean(losses, 1, keepdims=True)) ** 2, 1) / np.maximum(r - 1, 1))


def pooled_sd(losses: np.ndarray) -> float:
    """The replicates' standard deviation pooled over the points that have two or more (0 when none has)."""
    dof = np.isfinite(losses).sum(1) - 1
    m = dof > 0
    return float(np.sqrt(np.sum(dof[m] * spread(losses[m]) ** 2) / np.sum(dof[m]))) if m.any() else 0.0


def noise(df: pd.DataFrame, tolerance: float = 0.05) -> dict:
    """Run-to-run noise of the final eval loss: the standard deviation across replicates pooled over the
    points with replicates, overall and per budget, and how many points have them ({"replicates": 1}
    when none has)."""
    _, labels, losses = points(df, tolerance)
    if not replicated(losses):
        return {"replicates": 1}
    dof = np.isfinite(losses).sum(1) - 1

    def pooled(m: np.ndarray) -> dict:
        return {"points": int(m.sum()), "sd": pooled_sd(losses[m])}

    return {"replicates": int(dof.max() + 1), **pooled(dof > 0),
            "budgets": [{"C": float(C), **pooled((labels == C) & (dof > 0))}
                        for C in np.unique(labels[dof > 0])]}
