"""Bootstrap helpers shared by the approaches: resample weights, the replicate stage, percentile intervals,
the share of an interval that run noise makes, progress."""

from __future__ import annotations

import sys

import numpy as np


def resample_weights(n_points: int, n: int, seed: int) -> np.ndarray:
    """(n, n_points) multinomial counts: resampling the points with replacement, as weights."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_points, np.full(n_points, 1.0 / n_points), size=n).astype(np.float64)


def second_stage(seed: int) -> np.random.Generator:
    """The replicate draws' own stream, apart from the points': with the same seed, the points drawn are
    those of the points-only bootstrap, so the two intervals differ by the replicate stage alone."""
    return np.random.default_rng([seed, 1])


def replicate_means(losses: np.ndarray, copies: np.ndarray, rng: np.random.Generator,
                    sd: float = 0.0) -> np.ndarray:
    """The bootstrap's second stage: per resample (row of `copies`, resamples × points) and point, the
    mean of copies · r draws with replacement from the point's r replicates (`losses`, points × most
    replicates, NaN-padded), which is its copies' resampled replicate means pooled. A point with one
    replicate has nothing to draw from: its copies get normal run noise of `sd` (the pooled run-to-run
    sd of the points that have replicates; 0 keeps its mean), so a sweep that replicates only its cheap
    budgets still carries run noise into every budget's points. A point with no copies keeps its mean."""
    r = np.isfinite(losses).sum(1)
    out = np.broadcast_to(np.nanmean(losses, 1), copies.shape).copy()
    if sd > 0 and (single := np.flatnonzero(r == 1)).size:
        c = copies[:, single]
        noise = sd * rng.standard_normal(c.shape) / np.sqrt(np.maximum(c, 1))
        out[:, single] += np.where(c > 0, noise, 0.0)
    for k in np.unique(r[r > 1]):
        cols = np.flatnonzero(r == k)
        draws = copies[:, cols].astype(np.int64) * k
        sums = np.einsum("npk,pk->np", rng.multinomial(draws, np.full(k, 1 / k)), losses[cols, :k])
        out[:, cols] = np.where(draws > 0, sums / np.maximum(draws, 1), out[:, cols])
    return out


def percentile_ci(samples: dict[str, np.ndarray], level: float = 0.95) -> dict[str, list[float]]:
    """Percentile interval of each sample array, ignoring non-finite (failed) resamples."""
    q = 50 * (1 - level), 50 * (1 + level)
    ci = {}
    for k, v in samples.items():
        v = np.asarray(v, dtype=np.float64)
        v = v[np.isfinite(v)]
        ci[k] = [float(x) for x in np.percentile(v, q)] if len(v) else [float("nan")] * 2
    return ci


def noise_share(ci: dict[str, list[float]], ci_points: dict[str, list[float]]) -> dict[str, float]:
    """Per parameter the share of its interval's variance that resampling replicates adds: 1 − (w_points /
    w)², w the two-stage interval's width, w_points that of resampling the points' means alone; clipped to
    [0, 1], nan where an interval failed or has no width."""
    out = {}
    for k, (lo, hi) in ci.items():
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.float64(ci_points[k][1] - ci_points[k][0]) / np.float64(hi - lo)
        out[k] = float(np.clip(1 - ratio**2, 0, 1))
    return out


def progress(done: int, total: int, label: str) -> None:
    """Progress on stderr: one line rewritten in place on a terminal, one line per update in a log."""
    if sys.stderr.isatty():
        print(f"\r{label}: {done}/{total} resamples", end="\n" if done >= total else "",
              file=sys.stderr, flush=True)
    else:
        print(f"{label}: {done}/{total} resamples", file=sys.stderr, flush=True)
