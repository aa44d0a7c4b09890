"""Approach-3 fit speed: the vectorised JAX fit against a plain scipy L-BFGS-B loop over the grid.

    python benchmarks/fit_speed.py [--points 250] [--scipy_starts 300]

Both fit the same synthetic table (Chinchilla's law with 1 % noise). The scipy loop is timed on
a random subset of the 4,500 starts and extrapolated (say --scipy_starts 4500 for the full loop).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from lm import analysis
from lm.analysis import approach3

LAW = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def scipy_objective(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float = 1e-3):
    def f(theta):
        a, b, e, alpha, beta = theta
        pred = np.logaddexp.reduce([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)], axis=0)
        r = pred - log_l
        return np.sum(np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)))

    return f


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--points", type=int, default=250)
    p.add_argument("--scipy_starts", type=int, default=300)
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    N, D = 10 ** rng.uniform(7, 10, args.points), 10 ** rng.uniform(9, 12, args.points)
    loss = approach3.law(LAW, N, D) * np.exp(rng.normal(0, 0.01, args.points))
    df = analysis.from_table(pd.DataFrame({"N": N, "D": D, "loss": loss}))

    t = time.perf_counter()
    analysis.fit_approach3(df)
    first = time.perf_counter() - t
    fit = analysis.fit_approach3(df)
    print(f"jax vectorised: {fit['starts']} starts, {args.points} points: {fit['seconds']:.2f} s "
          f"after compilation ({first:.1f} s first call incl. compilation); "
          f"objective {fit['objective']:.6g}, "
          f"alpha {fit['alpha']:.4f}, beta {fit['beta']:.4f}")
    t = time.perf_counter()
    boot = analysis.fit_approach3(df, bootstrap=args.bootstrap)
    print(f"jax with {args.bootstrap} bootstrap resamples: {time.perf_counter() - t:.1f} s "
          f"(a in [{boot['ci']['a'][0]:.3f}, {boot['ci']['a'][1]:.3f}])")

    f = scipy_objective(*(np.log(x) for x in (N, D, loss)))
    grid = approach3.default_grid()
    subset = grid[rng.choice(len(grid), min(args.scipy_starts, len(grid)), replace=False)]
    t = time.perf_counter()
    best = min((minimize(f, x0, method="L-BFGS-B") for x0 in subset), key=lambda r: r.fun)
    seconds = time.perf_counter() - t
    full = seconds * len(grid) / len(subset)
    print(f"scipy L-BFGS-B loop: {len(subset)} starts in {seconds:.1f} s -> {full:.0f} s for all "
          f"{len(grid)} (best objective {best.fun:.6g} on the subset)")
    print(f"speed-up: {full / fit['seconds']:.0f}x")


if __name__ == "__main__":
    main()
