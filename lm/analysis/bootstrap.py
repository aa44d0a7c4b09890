"""Bootstrap helpers shared by the approaches: resample weights, percentile intervals, progress."""

from __future__ import annotations

import sys

import numpy as np


def resample_weights(n_points: int, n: int, seed: int) -> np.ndarray:
    """(n, n_points) multinomial counts: resampling the points with replacement, as weights."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_points, np.full(n_points, 1.0 / n_points), size=n).astype(np.float64)


def percentile_ci(samples: dict[str, np.ndarray], level: float = 0.95) -> dict[str, list[float]]:
    """Percentile interval of each sample array, ignoring non-finite (failed) resamples."""
    q = 50 * (1 - level), 50 * (1 + level)
    ci = {}
    for k, v in samples.items():
        v = np.asarray(v, dtype=np.float64)
        v = v[np.isfinite(v)]
        ci[k] = [float(x) for x in np.percentile(v, q)] if len(v) else [float("nan")] * 2
    return ci


def progress(done: int, total: int, label: str) -> None:
    """Progress on stderr: one line rewritten in place on a terminal, one line per update in a log."""
    if sys.stderr.isatty():
        print(f"\r{label}: {done}/{total} resamples", end="\n" if done >= total else "",
              file=sys.stderr, flush=True)
    else:
        print(f"{label}: {done}/{total} resamples", file=sys.stderr, flush=True)
