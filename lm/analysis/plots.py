"""PNG figures of the fits: IsoFLOP profiles, optimal N and D against C, iso-loss contours,
residuals and training-curve envelope. Each function writes one file and returns its name."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lm.analysis import approach3  # noqa: E402
from lm.analysis.load import fit_points  # noqa: E402
from lm.analysis.replicates import points, spread  # noqa: E402


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return name


def isoflop(a2: dict, df: pd.DataFrame, out: Path) -> str:
    """Loss against N per budget (replicate means, with ± their run-to-run sd where a point has
    replicates), the fitted parabolas and their minima."""
    pts, labels, losses = points(df)
    sd, many = spread(losses), np.isfinite(losses).sum(1) > 1
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(a2["budgets"])))
    for b, color in zip(a2["budgets"], colors, strict=True):
        m = np.isclose(labels, b["C"])
        ax.scatter(pts["N"][m], pts["loss"][m], color=color, s=18)
        ax.errorbar(pts["N"][m & many], pts["loss"][m & many], yerr=sd[m & many], fmt="none", ecolor=color,
                    elinewidth=1, capsize=2)
        x = np.linspace(np.log(b["N_min"]) - 0.2, np.log(b["N_max"]) + 0.2, 100)
        ax.plot(np.exp(x), np.polyval(b["parabola"], x), color=color, lw=1,
                label=f"C = {b['C']:.2g}" + (" (edge)" if b["edge"] else ""))
        ax.scatter([b["N_opt"]], [b["loss_min"]], color=color, marker="*", s=120, edgecolor="k")
    ax.set(xscale="log", xlabel="parameters N", ylabel="eval loss", title="IsoFLOP profiles")
    ax.legend(fontsize=8)
    return _save(fig, out, "isoflop.png")


def optimal(fits: dict, out: Path) -> str:
    """N_opt and D_opt against C: the per-budget vertices, power laws and bootstrap bands."""
    a2, a3 = fits.get("approach2", {}), fits.get("approach3", {})
    budgets = [b["C"] for b in a2.get("budgets", [])]
    lo, hi = (min(budgets) / 3, max(budgets) * 30) if budgets else (1e15, 1e21)
    C = np.geomspace(lo, hi, 100)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, k in zip(axes, ("N_opt", "D_opt"), ("k_N", "k_D"), strict=True):
        exp = "a" if key == "N_opt" else "b"
        if "a" in a2:
            ax.scatter(budgets, [b[key] for b in a2["budgets"]], color="C0", zorder=3,
                       label="IsoFLOP vertices")
            ax.plot(C, a2[k] * C ** a2[exp], color="C0", label=f"approach 2: C^{a2[exp]:.3f}")
            if "ci" in a2:
                lo_exp, hi_exp = a2["ci"][exp]
                pivot = float(np.exp(np.mean(np.log(budgets))))
                centre = a2[k] * pivot ** a2[exp]
                ax.fill_between(C, centre * (C / pivot) ** lo_exp, centre * (C / pivot) ** hi_exp,
                                color="C0", alpha=0.15, label="95 % interval of the exponent")
        if "alpha" in a3:
            n_opt, d_opt = approach3.closed_form_optimum(a3, C)
            ax.plot(C, n_opt if key == "N_opt" else d_opt, color="C3", ls="--",
                    label=f"approach 3: C^{a3[exp]:.3f}")
        ax.set(xscale="log", yscale="log", xlabel="FLOPs C", ylabel=key)
        ax.legend(fontsize=8)
    return _save(fig, out, "optimal.png")


def contours(a3: dict, df: pd.DataFrame, out: Path) -> str:
    """Iso-loss contours of L(N, D = C/6N) over (C, N) with the efficient frontier."""
    pts = fit_points(df)
    C_pts, N_pts = pts["C"].to_numpy(), pts["N"].to_numpy()
    C = np.geomspace(C_pts.min() / 10, C_pts.max() * 100, 200)
    N = np.geomspace(N_pts.min() / 10, N_pts.max() * 10, 200)
    cc, nn = np.meshgrid(C, N)
    loss = approach3.law(a3, nn, cc / (6 * nn))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    levels = np.quantile(loss[np.isfinite(loss)], np.linspace(0.02, 0.9, 14))
    cs = ax.contour(cc, nn, loss, levels=np.unique(levels), cmap="viridis", linewidths=0.8)
    ax.clabel(cs, fontsize=7, fmt="%.2f")
    ax.plot(C, approach3.closed_form_optimum(a3, C)[0], color="C3", lw=2, label="efficient frontier")
    ax.scatter(C_pts, N_pts, c="k", s=10, label="runs")
    ax.set(xscale="log", yscale="log", xlabel="FLOPs C", ylabel="parameters N",
           title="approach 3: iso-loss contours")
    ax.legend(fontsize=8)
    return _save(fig, out, "contours.png")


def residuals(a3: dict, df: pd.DataFrame, out: Path) -> str:
    pts = fit_points(df)
    pred = approach3.law(a3, pts["N"].to_numpy(), pts["D"].to_numpy())
    resid = np.log(pts["loss"].to_numpy()) - np.log(pred)
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    sc = ax.scatter(pts["N"], resid, c=np.log10(pts["C"]), cmap="viridis", s=18)
    fig.colorbar(sc, ax=ax, label="log10 C")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="parameters N", ylabel="log L − log L̂", title="approach 3 residuals")
    return _save(fig, out, "residuals.png")


def envelope(a1: dict, df: pd.DataFrame, out: Path) -> str:
    from lm.analysis.approach1 import curves

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for g in curves(df).values():
        ax.plot(g["C"], g["loss"], color="0.6", lw=0.8)
    env = a1["envelope"]
    ax.plot([e["C"] for e in env], [e["loss"] for e in env], color="C3", lw=2, label="lower envelope")
    ax.set(xscale="log", xlabel="FLOPs C", ylabel="eval loss", title="approach 1: training curves")
    ax.legend(fontsize=8)
    return _save(fig, out, "envelope.png")
