"""Approach 3: the parametric law L(N, D) = E + A/N^α + B/D^β fitted on log loss as Hoffmann et al.
(2022) do, every start and resample in one compiled, batched JAX BFGS computation (docs/analysis.md)."""

from __future__ import annotations

import functools
import itertools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from lm.analysis import checks
from lm.analysis.bootstrap import noise_share, percentile_ci, replicate_means, resample_weights, second_stage
from lm.analysis.bootstrap import progress as show_progress
from lm.analysis.replicates import points, pooled_sd, replicated
from lm.config import ConfigError

HUBER_DELTA = 1e-3
NAMES = ("E", "A", "B", "alpha", "beta")
N_PARAMS = 5
MAX_ITER, GTOL, FTOL = 1000, 1e-10, 1e-15
# Two phases keep the 4,500-start grid fast: every start takes SCREEN_ITER float32 BFGS steps,
# then the POLISH best run to convergence in float64 (the best of those is the fit).
SCREEN_ITER, POLISH = 6, 64
# Backtracks of a line search before the lane stops (scipy's L-BFGS-B allows 20); a screen lane gets
# fewer: the lanes advance in lockstep, so one lane at float32's floor would make every lane wait.
BACKTRACKS, SCREEN_BACKTRACKS = 20, 10
# Chinchilla's grid of initial values (4,500 starts), in the solver's order (a, b, e, α, β).
GRID = {
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}


def default_grid() -> np.ndarray:
    """The 4,500 starts as rows (a, b, e, α, β)."""
    return np.array(list(itertools.product(*GRID.values())), dtype=np.float64)


def huber(r, delta: float, xp=jnp):
    """Huber loss: quadratic within ±delta, linear outside (as scipy.special.huber)."""
    abs_r = xp.abs(r)
    return xp.where(abs_r <= delta, 0.5 * r**2, delta * (abs_r - 0.5 * delta))


def objective(theta: jax.Array, log_n: jax.Array, log_d: jax.Array, log_l: jax.Array,
              weights: jax.Array, delta: float = HUBER_DELTA) -> jax.Array:
    """Weighted sum over points of Huber(LSE(a − α log N, b − β log D, e) − log L)."""
    a, b, e, alpha, beta = theta
    terms = jnp.stack([a - alpha * log_n, b - beta * log_d, jnp.broadcast_to(e, log_n.shape)])
    return jnp.sum(weights * huber(jax.nn.logsumexp(terms, axis=0) - log_l, delta))


def value_and_grad(x, log_n, log_d, log_l, weights, delta: float = HUBER_DELTA, xp=jnp):
    """`objective` and its gradient for every row of x (L, 5), weights (L or 1, P), in one pass over the
    points: by hand, the Huber slope clip(r, ±δ) times LSE's softmax (autodiff through vmap took twice
    as long). `xp=np` is the same in numpy, for scipy."""
    a, b, e, alpha, beta = (x[:, i, None] for i in range(N_PARAMS))
    t_n, t_d = a - alpha * log_n, b - beta * log_d
    m = xp.maximum(xp.maximum(t_n, t_d), e)
    p_n, p_d, p_e = xp.exp(t_n - m), xp.exp(t_d - m), xp.exp(e - m)
    total = p_n + p_d + p_e
    r = m + xp.log(total) - log_l
    slope = weights * xp.clip(r, -delta, delta) / total
    g_n, g_d = slope * p_n, slope * p_d
    grad = xp.stack([g_n.sum(-1), g_d.sum(-1), (slope * p_e).sum(-1), -g_n @ log_n, -g_d @ log_d], -1)
    return xp.sum(weights * huber(r, delta, xp), -1), grad


class _State(NamedTuple):
    """Batched BFGS state: one row per lane (start × resample)."""

    x: jax.Array  # (L, 5) parameters
    f: jax.Array  # (L,) objective
    g: jax.Array  # (L, 5) gradient
    h: jax.Array  # (L, 5, 5) inverse-Hessian estimate
    done: jax.Array  # (L,) converged or stalled
    it: jax.Array  # () iterations taken


def _bfgs_update(h: jax.Array, s: jax.Array, y: jax.Array, keep: jax.Array) -> jax.Array:
    """The BFGS inverse update H ← (I − ρsyᵀ) H (I − ρysᵀ) + ρssᵀ, ρ = 1/sᵀy, where `keep`."""
    sy = jnp.sum(s * y, -1)
    rho = jnp.where(keep, 1.0 / jnp.where(keep, sy, 1.0), 0.0)[:, None, None]
    eye = jnp.eye(s.shape[-1], dtype=s.dtype)
    left = eye - rho * s[:, :, None] * y[:, None, :]
    new = left @ h @ jnp.swapaxes(left, 1, 2) + rho * s[:, :, None] * s[:, None, :]
    return jnp.where(keep[:, None, None], new, h)


def _bfgs(value_and_grad, x0: jax.Array, max_iter: int, gtol: float, ftol: float,
          max_backtracks: int = BACKTRACKS) -> _State:
    """Minimise every lane of x0 (L, 5) at once, in lockstep: BFGS (5 parameters: the dense 5 × 5
    inverse Hessian is cheaper than L-BFGS's history) with Armijo backtracking. A lane stops at
    |gradient| < gtol, a decrease ≤ ftol·max(|f|, 1) or a failed line search; all stop at max_iter."""
    L, P = x0.shape
    f0, g0 = value_and_grad(x0)
    scale = jnp.minimum(1.0, 1.0 / jnp.maximum(jnp.linalg.norm(g0, axis=-1), 1e-300))
    h0 = scale[:, None, None] * jnp.eye(P, dtype=x0.dtype)  # first step: steepest descent, at most 1 long
    init = _State(x0, f0, g0, h0, ~jnp.isfinite(f0), jnp.zeros((), jnp.int32))

    def step(st: _State) -> _State:
        d = -jnp.einsum("lij,lj->li", st.h, st.g)
        slope = jnp.sum(st.g * d, -1)
        descent = slope < 0  # otherwise restart from steepest descent
        scale = jnp.minimum(1.0, 1.0 / jnp.linalg.norm(st.g, axis=-1))
        d = jnp.where(descent[:, None], d, -st.g * scale[:, None])
        slope = jnp.sum(st.g * d, -1)

        def search_going(c):
            _, _, _, ok, k = c
            return jnp.any(~ok) & (k < max_backtracks)

        def search(c):
            t, f_t, g_t, ok, k = c
            t = jnp.where(ok, t, 0.5 * t)
            f_new, g_new = value_and_grad(st.x + t[:, None] * d)
            f_t, g_t = jnp.where(ok, f_t, f_new), jnp.where(ok[:, None], g_t, g_new)
            ok = ok | (jnp.isfinite(f_t) & (f_t <= st.f + 1e-4 * t * slope))
            return t, f_t, g_t, ok, k + 1

        t0 = jnp.full((L,), 2.0, x0.dtype)  # halved before the first trial: t = 1
        t, f_t, g_t, ok, _ = jax.lax.while_loop(
            search_going, search, (t0, st.f, st.g, st.done, jnp.zeros((), jnp.int32)))
        move = ok & ~st.done
        x_new = jnp.where(move[:, None], st.x + t[:, None] * d, st.x)
        f_new, g_new = jnp.where(move, f_t, st.f), jnp.where(move[:, None], g_t, st.g)
        s_k, y_k = x_new - st.x, g_new - st.g
        sy, yy = jnp.sum(s_k * y_k, -1), jnp.sum(y_k**2, -1)
        keep = move & (sy > 1e-12 * yy)  # curvature condition, else skip the update
        first = (st.it == 0) | ~descent  # (re)start: scale H to the curvature seen (Nocedal & Wright 6.20)
        gamma = jnp.where(keep & first, sy / jnp.where(yy > 0, yy, 1.0), 1.0)
        h = jnp.where((keep & first)[:, None, None], gamma[:, None, None] * jnp.eye(P, dtype=x0.dtype), st.h)
        small_step = st.f - f_new <= ftol * jnp.maximum(jnp.abs(st.f), 1.0)
        converged = (jnp.max(jnp.abs(g_new), -1) < gtol) | small_step
        return _State(x_new, f_new, g_new, _bfgs_update(h, s_k, y_k, keep),
                      st.done | ~ok | converged, st.it + 1)

    return jax.lax.while_loop(lambda st: jnp.any(~st.done) & (st.it < max_iter), step, init)


@functools.partial(jax.jit, static_argnames=("max_iter", "gtol", "ftol", "delta", "backtracks"))
def _solve(x0: jax.Array, log_n: jax.Array, log_d: jax.Array, log_l: jax.Array, weights: jax.Array,
           max_iter: int, gtol: float, ftol: float, delta: float, backtracks: int,
           ) -> tuple[jax.Array, jax.Array]:
    """Minimise every lane of x0 (L, 5) under its row of weights (L or 1, P)."""
    st = _bfgs(lambda x: value_and_grad(x, log_n, log_d, log_l, weights, delta), x0, max_iter, gtol, ftol,
               backtracks)
    return st.x, st.f


def solve(x0: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, weights: np.ndarray,
          max_iter: int = MAX_ITER, gtol: float = GTOL, ftol: float = FTOL, delta: float = HUBER_DELTA,
          dtype: str = "float64", backtracks: int = BACKTRACKS) -> tuple[np.ndarray, np.ndarray, float]:
    """Compile (cached per shape), then minimise from every row of x0 (L, 5) under its row of weights
    (L or 1, P) and of log_l (P, or L × P): returns (theta (L, 5), objective (L,), run seconds)."""
    with jax.enable_x64(True):
        args = [jnp.asarray(x, dtype) for x in (x0, log_n, log_d, log_l, np.atleast_2d(weights))]
        compiled = _compiled(tuple((a.shape, str(a.dtype)) for a in args), max_iter, gtol, ftol, delta,
                             backtracks)
        t0 = time.perf_counter()
        theta, value = compiled(*args)
        theta, value = np.asarray(theta), np.asarray(value)
        return theta, value, time.perf_counter() - t0


@functools.lru_cache(maxsize=16)
def _compiled(shapes: tuple, max_iter: int, gtol: float, ftol: float, delta: float, backtracks: int):
    """Ahead-of-time compilation per input shape, so `solve` can time the run alone."""
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
    return _solve.lower(*args, max_iter=max_iter, gtol=gtol, ftol=ftol, delta=delta,
                        backtracks=backtracks).compile()


def unpack(theta: np.ndarray) -> dict[str, np.ndarray]:
    """Solver parameters (a, b, e, α, β) → the law's E, A, B, α, β and the optimum exponents."""
    theta = np.asarray(theta, dtype=np.float64)
    a_, b_, e_, alpha, beta = np.moveaxis(theta, -1, 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return {"E": np.exp(e_), "A": np.exp(a_), "B": np.exp(b_), "alpha": alpha, "beta": beta,
                "a": beta / (alpha + beta), "b": alpha / (alpha + beta)}


def admissible(theta: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Objective values, inf for solutions that are not a scaling law (α or β ≤ 0, or A, B, E beyond
    float64): they have no compute-optimal allocation, so they must never win."""
    p = unpack(theta)
    ok = (p["alpha"] > 0) & (p["beta"] > 0) & np.isfinite(p["A"]) & np.isfinite(p["B"]) & np.isfinite(p["E"])
    return np.where(ok & np.isfinite(value), value, np.inf)


def closed_form_optimum(fit: dict, C: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b with G = (αA / (βB))^(1/(α+β)) (C = 6ND)."""
    alpha, beta, A, B = (np.asarray(fit[k], dtype=np.float64) for k in ("alpha", "beta", "A", "B"))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
        a, b = beta / (alpha + beta), alpha / (alpha + beta)
        C6 = np.asarray(C, dtype=np.float64) / 6.0
        return G * C6**a, C6**b / G


def law(fit: dict, N: np.ndarray | float, D: np.ndarray | float) -> np.ndarray:
    """L(N, D) = E + A/N^α + B/D^β."""
    N, D = np.asarray(N, dtype=np.float64), np.asarray(D, dtype=np.float64)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # a degenerate (resampled) fit's
        return fit["E"] + fit["A"] / N ** fit["alpha"] + fit["B"] / D ** fit["beta"]


def _data(df: pd.DataFrame) -> tuple[np.ndarray, ...]:
    """log N, log D, log L (the replicate mean), the budget and the replicates' losses of the points that
    enter fits, checked for a well-posed fit."""
    pts, labels, losses = points(df)
    if len(pts) < N_PARAMS:
        raise ValueError(f"approach 3 needs at least {N_PARAMS} points (one per parameter), got {len(pts)}")
    return (*(np.log(pts[c].to_numpy(np.float64)) for c in ("N", "D", "loss")), labels, losses)


def fit_approach3(df: pd.DataFrame, starts: np.ndarray | None = None, bootstrap: int = 0, seed: int = 0,
                  budgets: tuple[float, ...] = (), max_iter: int = MAX_ITER, gtol: float = GTOL,
                  ftol: float = FTOL, delta: float = HUBER_DELTA, bootstrap_starts: int = 1,
                  progress: bool = False, screen_iter: int = SCREEN_ITER) -> dict:
    """Fit L(N, D) from every start (default: the 4,500-start grid) and keep the best; `bootstrap`
    resamples add intervals (`ci`) and `samples` (with replicates: two-stage, and the points-only
    `ci_points` and `noise_share` beside them), and `budgets` closed-form predictions."""
    if not (isinstance(bootstrap_starts, int) and 1 <= bootstrap_starts <= POLISH):
        raise ConfigError(f"bootstrap_starts = {bootstrap_starts!r} is not allowed: must be an integer in "
                          f"1..{POLISH} (the polished solutions each resample is refitted from)")
    log_n, log_d, log_l, labels, losses = _data(df)
    starts = default_grid() if starts is None else np.atleast_2d(np.asarray(starts, dtype=np.float64))
    n_starts = len(starts)
    opts = {"max_iter": max_iter, "gtol": gtol, "ftol": ftol, "delta": delta}
    seconds = 0.0
    if len(starts) > POLISH:  # screen every start briefly, keep the most promising
        theta, value, seconds = solve(starts, log_n, log_d, log_l, np.ones((1, len(log_n))),
                                      max_iter=screen_iter, gtol=gtol, ftol=ftol, delta=delta,
                                      dtype="float32", backtracks=SCREEN_BACKTRACKS)
        starts = theta[np.argsort(np.where(np.isfinite(value), value, np.inf))[:POLISH]].astype(np.float64)
    lanes = np.resize(starts, (max(POLISH, len(starts)), N_PARAMS))  # the bootstrap's program: POLISH lanes
    every = np.ones((len(lanes), len(log_n)))  # a row per lane, as the bootstrap's: one program for both
    theta, value, polish_seconds = solve(lanes, log_n, log_d, log_l * every, every, **opts)
    seconds += polish_seconds
    value = admissible(theta, value)
    if not np.isfinite(value).any():
        raise ValueError(f"approach 3: every fit from the {n_starts} starts is degenerate (alpha or beta "
                         f"<= 0, or A, B, E overflow): these {len(log_n)} points do not pin down "
                         "L(N, D); more sizes per budget or more budgets are needed")
    order = np.argsort(value)
    fit = {k: float(v) for k, v in unpack(theta[order[0]]).items()}
    fit.update(objective=float(value[order[0]]), seconds=seconds, starts=n_starts, points=len(log_n),
               huber_delta=delta, n_budgets=len(np.unique(labels)),
               C_range=[float(labels.min()), float(labels.max())])
    fit["predictions"] = [prediction(fit, C) for C in budgets]
    if bootstrap > 0:
        weights, warm = resample_weights(len(log_n), bootstrap, seed), theta[order[:bootstrap_starts]]
        drawn = np.log(replicate_means(losses, weights, second_stage(seed), pooled_sd(losses)))
        samples = bootstrap_samples(warm, log_n, log_d, drawn, weights, progress, **opts)
        fit.update(samples=samples, ci=percentile_ci(samples), bootstrap=bootstrap, seed=seed)
        if replicated(losses):
            means = log_l * np.ones_like(weights)  # the points-only bootstrap of the same resamples
            only = bootstrap_samples(warm, log_n, log_d, means, weights, False, **opts)
            fit["ci_points"] = percentile_ci(only)
            fit["noise_share"] = noise_share(fit["ci"], fit["ci_points"])
        for p in fit["predictions"]:
            n_opt, d_opt = closed_form_optimum(samples, p["C"])
            ci = percentile_ci({"N_opt": n_opt, "D_opt": d_opt, "loss": law(samples, n_opt, d_opt)})
            p.update({f"{k}_ci": v for k, v in ci.items()})
    fit["warnings"] = diagnose(fit)
    return fit


def diagnose(fit: dict) -> list[str]:
    """Why a fit that is formally a scaling law should not be trusted (empty when nothing is wrong): an
    exponent beyond the start grid is a term bent through a few points, not a trend they determine; too
    few budgets, or compute-optimal exponents outside the plausible range (lm.analysis.checks)."""
    top = max(GRID["alpha"])
    return [f"{name} = {fit[name]:.3g} is beyond the start grid's 0–{top:g} (language "
            f"models give about 0.3–0.8): the {term} term is not determined by these "
            f"{fit['points']} points, so a, b and the predictions are unreliable"
            for name, term in (("alpha", "N"), ("beta", "D")) if fit[name] > top
            ] + checks.budgets(fit["n_budgets"]) + checks.exponents(fit)


def prediction(fit: dict, C: float) -> dict:
    """Closed-form optimum at budget C with its predicted loss."""
    n_opt, d_opt = (float(x) for x in closed_form_optimum(fit, C))
    return {"C": float(C), "N_opt": n_opt, "D_opt": d_opt, "tokens_per_param": d_opt / n_opt,
            "loss": float(law(fit, n_opt, d_opt))}


def bootstrap_samples(warm: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
                      weights: np.ndarray, progress: bool, **opts) -> dict[str, np.ndarray]:
    """Refit once per row of `weights` and of `log_l` (resamples × points) from each of the `warm` starts
    (k, 5), POLISH lanes at a time (the polish's compiled program; small blocks stay in cache), keeping
    each resample's best admissible fit."""
    n = len(weights)
    k = len(warm)
    chunk = max(POLISH // k, 1)
    out = []
    for i in range(0, n, chunk):
        pad = chunk - len(weights[i:i + chunk])  # pad the last block so every block reuses one compilation
        w, l_ = (np.pad(x[i:i + chunk], ((0, pad), (0, 0)), mode="edge") for x in (weights, log_l))
        theta, value, _ = solve(np.tile(warm, (chunk, 1)), log_n, log_d, np.repeat(l_, k, axis=0),
                                np.repeat(w, k, axis=0), **opts)
        theta, value = theta.reshape(chunk, k, -1), admissible(theta, value).reshape(chunk, k)
        out.append(theta[np.arange(chunk), np.argmin(value, axis=1)][:chunk - pad])
        done = min(i + chunk, n)
        if progress and (4 * done // n > 4 * i // n):  # at each quarter
            show_progress(done, n, "bootstrap approach 3")
    return unpack(np.concatenate(out))
