"""Scaling-law fits recover known laws; bad input is a clear error or a reported skip."""

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize, minimize_scalar

from lm import analysis
from lm.analysis import approach3
from lm.analysis.approach2 import fit_approach2

from .conftest import ROOT

CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
LAWS = [CHINCHILLA, {"E": 2.0, "A": 50.0, "B": 2000.0, "alpha": 0.25, "beta": 0.4},
        {"E": 1.2, "A": 3000.0, "B": 300.0, "alpha": 0.5, "beta": 0.3}]


def law_table(law: dict, n: int = 120, noise: float = 0.0, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    N, D = 10 ** rng.uniform(6, 10, n), 10 ** rng.uniform(8, 12, n)
    loss = approach3.law(law, N, D) * np.exp(rng.normal(0, noise, n))
    return pd.DataFrame({"N": N, "D": D, "loss": loss})


@pytest.mark.parametrize("law", LAWS)
def test_approach3_recovers_known_laws(law):
    fit = analysis.fit_approach3(analysis.from_table(law_table(law)))
    assert fit["starts"] == 4500
    for k in ("E", "alpha", "beta"):
        assert fit[k] == pytest.approx(law[k], rel=1e-3), k
    for k in ("A", "B"):
        assert fit[k] == pytest.approx(law[k], rel=2e-2), k
    assert fit["warnings"] == []


def test_predict_loss_extrapolates_a_fitted_law_to_unseen_sizes():
    fit = analysis.fit_approach3(analysis.from_table(law_table(CHINCHILLA)))
    N, D = np.array([3e5, 2e10, 4.4e7, 3e11]), np.array([3e12, 5e7, 1.7e9, 1e13])  # two outside the table
    np.testing.assert_allclose(analysis.predict_loss(fit, N, D), approach3.law(CHINCHILLA, N, D), rtol=1e-3)
    with pytest.raises(ValueError, match="approach-3 fit"):
        analysis.predict_loss({"a": 0.5, "k_N": 1.0, "b": 0.5, "k_D": 1.0}, 1e8, 1e9)


def test_approach3_with_noise_and_bootstrap_interval_covers_truth():
    fit = analysis.fit_approach3(analysis.from_table(law_table(CHINCHILLA, 250, noise=0.01)),
                                 bootstrap=200)
    for k in ("alpha", "beta", "E"):
        assert fit[k] == pytest.approx(CHINCHILLA[k], rel=0.1)
    true_a = CHINCHILLA["beta"] / (CHINCHILLA["alpha"] + CHINCHILLA["beta"])
    lo, hi = fit["ci"]["a"]
    assert lo <= true_a <= hi and hi - lo < 0.1


def test_closed_form_optimum_matches_brute_force():
    for C in (1e18, 1e21, 1e24):
        n_opt, d_opt = analysis.optimal_allocation(CHINCHILLA, C)
        assert n_opt * d_opt * 6 == pytest.approx(C)
        def loss_at(x, C=C):
            return float(approach3.law(CHINCHILLA, np.exp(x), C / (6 * np.exp(x))))

        best = minimize_scalar(loss_at, bounds=(np.log(1e3), np.log(1e15)), method="bounded",
                               options={"xatol": 1e-10})
        assert np.exp(best.x) == pytest.approx(n_opt, rel=1e-3)


def test_vectorised_fit_equals_scipy_from_the_same_start():
    df = law_table(CHINCHILLA, 60, noise=0.005, seed=3)
    log_n, log_d, log_l = (np.log(df[c].to_numpy()) for c in ("N", "D", "loss"))
    start = np.array([5.0, 5.0, 0.5, 0.5, 0.5])

    def f(theta):
        a, b, e, alpha, beta = theta
        pred = np.logaddexp.reduce([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)], axis=0)
        r = pred - log_l
        return np.sum(np.where(np.abs(r) <= 1e-3, 0.5 * r**2, 1e-3 * (np.abs(r) - 0.5e-3)))

    ref = minimize(f, start, method="L-BFGS-B", options={"maxiter": 10000, "ftol": 1e-15, "gtol": 1e-12})
    theta, value, _ = approach3.solve(start[None, None], log_n, log_d, log_l, np.ones((1, len(log_n))))
    assert value[0, 0] == pytest.approx(ref.fun, rel=1e-4)
    np.testing.assert_allclose(theta[0, 0][3:], ref.x[3:], rtol=1e-3)


def isoflop_table(a_true: float = 0.5, budgets=(1e18, 1e19, 1e20, 1e21), width: float = 1.0,
                  centre_shift: float = 0.0) -> pd.DataFrame:
    """Parabolic profiles in log N whose vertex is N_opt = 0.1 · C^a_true (C = 6ND)."""
    rows = []
    for C in budgets:
        x_opt = np.log(0.1 * C**a_true)
        for x in x_opt + centre_shift + np.linspace(-width, width, 7):
            rows.append({"N": np.exp(x), "D": C / (6 * np.exp(x)), "loss": 2 + 0.05 * (x - x_opt) ** 2,
                         "budget": C})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("a_true", [0.4, 0.5, 0.6])
def test_approach2_recovers_exponents(a_true):
    fit = fit_approach2(analysis.from_table(isoflop_table(a_true)), bootstrap=50)
    assert fit["a"] == pytest.approx(a_true, abs=1e-6)
    assert fit["b"] == pytest.approx(1 - a_true, abs=1e-6)
    assert not any(b["edge"] for b in fit["budgets"])
    assert fit["a_ci"][0] <= a_true <= fit["a_ci"][1]


def test_approach2_gives_no_interval_when_resamples_cannot_vary():
    """Three sizes per budget: a resample keeps all three in both budgets (6/27)² of the time, and
    those resamples are the data itself, so a percentile interval would be a false certainty."""
    table = isoflop_table(0.5, budgets=(1e19, 1e20))
    table = table.groupby("budget").nth([0, 3, 6])
    with pytest.warns(UserWarning, match="no bootstrap interval"):
        fit = fit_approach2(analysis.from_table(table), bootstrap=100)
    assert fit["a"] == pytest.approx(0.5, abs=1e-6)
    assert "a_ci" not in fit and fit["bootstrap_kept"] < 50 and "too few sizes" in fit["ci_skipped"]
    five = fit_approach2(analysis.from_table(isoflop_table(0.5).groupby("budget").nth([0, 2, 3, 4, 6])),
                         bootstrap=100)
    assert five["bootstrap_kept"] >= 50 and five["a_ci"][0] <= 0.5 <= five["a_ci"][1]


def test_approach2_groups_a_bare_table_by_flops_and_flags_edge_minima():
    table = isoflop_table(0.5).drop(columns="budget")
    table.loc[:6, "loss"] = 2 + 0.05 * (np.log(table.loc[:6, "N"]) - np.log(table.loc[6, "N"] * 5)) ** 2
    with pytest.warns(UserWarning, match="edge minimum"):
        fit = fit_approach2(analysis.from_table(table))
    assert len(fit["budgets"]) == 4
    assert [b["edge"] for b in fit["budgets"]] == [True, False, False, False]
    assert fit["a"] == pytest.approx(0.5, abs=1e-6)  # the edge budget is left out of the power law


def test_approach1_envelope_on_synthetic_curves():
    rows = []
    for N in np.geomspace(1e6, 1e9, 7):
        for D in np.geomspace(1e8, 1e12, 25):
            rows.append({"run": f"N{N:.0e}", "point": "eval", "N": N, "D": D, "C": 6 * N * D,
                         "loss": float(approach3.law(CHINCHILLA, N, D)), "included": True})
    fit = analysis.fit_approach1(pd.DataFrame(rows))
    true_a = CHINCHILLA["beta"] / (CHINCHILLA["alpha"] + CHINCHILLA["beta"])
    assert fit["a"] == pytest.approx(true_a, abs=0.08)
    assert fit["a"] + fit["b"] == pytest.approx(1.0, abs=1e-6)


SMALL = {"E": 1.5, "A": 100.0, "B": 1000.0, "alpha": 0.4, "beta": 0.4}  # optimum within the sizes


def _sweep(tmp_path):
    """A sweep directory: 2 budgets × 4 sizes, one run diverged, one unfinished."""
    sweep = tmp_path / "sweep"
    plan = []
    for C in (1e12, 1e13):
        for N in (1e4, 3e4, 1e5, 3e5):
            name = f"C{C:.0e}-N{N:.0e}"
            D = C / (6 * N)
            plan.append({"name": name, "budget": C, "n_params": N, "n_params_non_embedding": N / 2,
                         "tokens": D, "flops": C, "flops_6nd": C})
            if name == "C1e+13-N3e+05":
                continue  # unfinished
            status = "diverged" if name == "C1e+12-N1e+04" else "completed"
            run = sweep / "runs" / name
            run.mkdir(parents=True)
            loss = float(approach3.law(SMALL, N, D))
            (run / "result.json").write_text(json.dumps({
                "status": status, "name": name, "steps": 100, "n_params": N, "n_params_non_embedding": N / 2,
                "tokens": D, "flops": C, "flops_6nd": C, "flops_per_token": 6 * N,
                "eval_loss": loss if status == "completed" else None, "config_hash": "x",
                "diverged_step": 50 if status == "diverged" else None}))
            (run / "metrics.jsonl").write_text("".join(
                json.dumps({"step": s, "tokens": D * s / 100, "flops": C * s / 100,
                            "eval_loss": float(approach3.law(SMALL, N, D * s / 100))}) + "\n"
                for s in (25, 50, 75, 100)))
    (sweep / "plan.json").write_text(json.dumps({"runs": plan}))
    return sweep


def test_sweep_loader_keeps_left_out_runs_and_reports_them(tmp_path):
    sweep = _sweep(tmp_path)
    df = analysis.load(sweep)
    finals = df[df["point"] == "final"].set_index("run")
    assert len(finals) == 8 and finals["included"].sum() == 6
    assert finals.loc["C1e+12-N1e+04", "reason"] == "status diverged at step 50"
    assert finals.loc["C1e+13-N3e+05", "reason"].startswith("unfinished")
    assert (df["point"] == "eval").sum() == 4 * 7
    assert analysis.load(sweep, n="non_embedding")["N"].max() == 1.5e5
    fits = analysis.run(sweep, tmp_path / "out", bootstrap=20, progress=False)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "`C1e+12-N1e+04`: status diverged at step 50" in report
    assert "`C1e+13-N3e+05`: unfinished" in report
    assert "a" in fits["approach1"] and "budgets" in fits["approach2"]


def test_cli_on_a_table_writes_strict_json_report_and_plots(tmp_path):
    table = isoflop_table(0.5, budgets=(1e18, 1e19, 1e20))
    table["loss"] = approach3.law(CHINCHILLA, table["N"], table["D"])
    table.drop(columns="budget").to_csv(tmp_path / "points.csv", index=False)
    proc = subprocess.run([sys.executable, "-m", "lm.analysis", str(tmp_path / "points.csv"),
                           "--out", str(tmp_path / "out"), "--bootstrap", "50", "--budgets", "1e21,1e22"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    fits = json.loads((tmp_path / "out" / "fits.json").read_text(), parse_constant=pytest.fail)
    a2, a3 = fits["approach2"], fits["approach3"]
    assert {"a", "b", "a_ci", "b_ci", "budgets"} <= set(a2)
    assert {"C", "N_opt", "D_opt", "loss_min", "edge"} <= set(a2["budgets"][0])
    assert {"E", "A", "B", "alpha", "beta", "a", "b", "objective", "ci", "seconds"} <= set(a3)
    assert a3["alpha"] == pytest.approx(0.34, rel=1e-2)
    assert [p["C"] for p in a3["predictions"]] == [1e21, 1e22]
    assert "skipped" in fits["approach1"]
    assert "approach 3: N_opt ∝ C^" in proc.stdout and "  L = 1.690 + " in proc.stdout
    assert "next budget 1e+21 FLOPs (approach 3)" in proc.stdout  # ten times the largest budget
    for png in ("isoflop.png", "optimal.png", "contours.png", "residuals.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    assert "Approach 3" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("change, message", [
    (lambda t: t.drop(columns="loss"), r"lacks column\(s\) \['loss'\]"),
    (lambda t: t.assign(N=-t["N"]), r"column 'N' must be finite and > 0, but row 0 has"),
    (lambda t: t.assign(D=0.0), r"column 'D' must be finite and > 0"),
    (lambda t: t.assign(loss=np.where(t.index == 3, np.nan, t["loss"])), r"column 'loss' .* row 3 has nan"),
])
def test_bad_tables_are_clear_errors(tmp_path, change, message):
    change(law_table(CHINCHILLA, 20)).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match=message):
        analysis.run(tmp_path / "t.csv", bootstrap=0, progress=False)


def test_too_few_points_and_a_single_budget_are_reported_skips(tmp_path):
    table = isoflop_table(0.5, budgets=(1e19,)).head(4)
    table.to_csv(tmp_path / "t.csv", index=False)
    fits = analysis.run(tmp_path / "t.csv", bootstrap=10, progress=False)
    assert "at least 5 points" in fits["approach3"]["skipped"]
    assert "two budgets" in fits["approach2"]["skipped"]
    assert math.isfinite(fits["approach2"]["budgets"][0]["N_opt"])
    assert "Skipped" in (tmp_path / "report.md").read_text()


def test_approach3_flags_exponents_the_points_do_not_determine():
    fit = {**CHINCHILLA, "alpha": 29.3, "points": 6}
    (warning,) = approach3.diagnose(fit)
    assert "alpha = 29.3" in warning and "6 points" in warning
    assert approach3.diagnose({**CHINCHILLA, "points": 6}) == []
    report = analysis.report.render(
        {"n": "total", "approach3": {**fit, "a": 0.1, "b": 0.9, "huber_delta": 1e-3, "objective": 1e-4,
                                     "starts": 4500, "seconds": 0.1, "warnings": [warning],
                                     "predictions": [approach3.prediction(fit, 1e20)]}},
        pd.DataFrame({"point": ["final"], "included": [True]}), "t.csv", [])
    assert "**Unreliable:** alpha = 29.3" in report and "(approach 3, unreliable: see above)" in report


def test_degenerate_approach3_solutions_never_win():
    """α ≤ 0, β ≤ 0 or an overflowing coefficient is not a scaling law, whatever its objective."""
    theta = np.array([[5.0, 6.0, 0.5, 0.3, 0.3],     # a proper law
                      [5.0, 6.0, 0.5, -1.3, 0.3],    # alpha < 0: loss grows with N
                      [5.0, 6.0, 0.5, 0.3, 0.0],     # beta = 0
                      [5.0, 800.0, 0.5, 0.3, 78.0]])  # B = exp(800) overflows float64
    value = np.array([1e-3, 1e-6, 1e-6, 1e-6])
    np.testing.assert_array_equal(approach3.admissible(theta, value), [1e-3, np.inf, np.inf, np.inf])


def test_summary_says_what_to_distrust():
    """Edge minima, a skipped interval and an unreliable approach 3 are said; the next-budget line
    then comes from approach 2, and a failed (nan) interval is left out rather than printed."""
    a2 = {"a": 0.52, "b": 0.48, "k_N": 0.1, "k_D": 1.6, "bootstrap": 100, "bootstrap_kept": 4,
          "ci_skipped": "too few sizes", "budgets": [{"C": 1e12, "edge": True}, {"C": 3e12, "edge": False}]}
    a3 = {**CHINCHILLA, "alpha": 29.3, "a": 0.01, "b": 0.99, "seconds": 0.2, "starts": 4500,
          "ci": {"a": [float("nan")] * 2, "b": [0.2, 0.9]}, "warnings": ["alpha = 29.3 is beyond the grid"]}
    text = analysis.summary({"approach1": {"skipped": "needs training curves"}, "approach2": a2,
                             "approach3": a3})
    assert text.splitlines() == [
        "approach 1: skipped (needs training curves)",
        "approach 2: N_opt ∝ C^0.520, D_opt ∝ C^0.480",
        "  no bootstrap interval: only 4 of 100 resamples gave power laws (too few sizes per budget)",
        "  edge minima at budgets: 1e+12",
        "approach 3: N_opt ∝ C^0.010, D_opt ∝ C^0.990 [0.200, 0.900]",
        "  L = 1.690 + 406.4/N^29.300 + 410.7/D^0.280 (fit 0.20 s, 4,500 starts)",
        "  unreliable: alpha = 29.3 is beyond the grid",
        f"next budget 3e+13 FLOPs (approach 2): N_opt ≈ {0.1 * 3e13 ** 0.52:.3g}, "
        f"D_opt ≈ {1.6 * 3e13 ** 0.48:.3g} ({1.6 * 3e13 ** 0.48 / (0.1 * 3e13 ** 0.52):.1f} tokens/param)"]
    assert "next budget 1e+20" in analysis.summary({"approach2": a2}, next_budget=1e20)
    assert "next budget" not in analysis.summary({"approach2": {"skipped": "no completed points"}})
