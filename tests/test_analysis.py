"""Scaling-law fits recover known laws; bad input is a clear error or a reported skip."""

import json
import math
import os
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize, minimize_scalar

from lm import analysis
from lm.analysis import approach3
from lm.analysis.approach2 import fit_approach2
from lm.config import ConfigError
from lm.files import FileError

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
    fit = analysis.fit_approach3(law_table(law))  # a bare N, D, loss frame
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
    theta, value, _ = approach3.solve(start[None], log_n, log_d, log_l, np.ones((1, len(log_n))))
    assert value[0] == pytest.approx(ref.fun, rel=1e-4)
    np.testing.assert_allclose(theta[0][3:], ref.x[3:], rtol=1e-3)


def test_hand_gradient_equals_autodiff():
    """The hand-derived gradient is jax.grad of `objective`, with points on both sides of the Huber kink
    and resample weights, at the optimum and across the grid; its numpy form (scipy's) is the same."""
    df = law_table(CHINCHILLA, 40, noise=0.002, seed=1)
    log_n, log_d, log_l = (np.log(df[c].to_numpy()) for c in ("N", "D", "loss"))
    rng = np.random.default_rng(0)
    best = np.array([np.log(406.4), np.log(410.7), np.log(1.69), 0.34, 0.28])
    x = np.concatenate([best + rng.normal(0, 1e-3, (4, 5)), approach3.default_grid()[::450]])
    w = rng.poisson(1.0, (len(x), len(log_n))).astype(np.float64)
    r = np.log(approach3.law(CHINCHILLA, df["N"].to_numpy(), df["D"].to_numpy())) - log_l
    assert (np.abs(r) < 1e-3).any() and (np.abs(r) > 1e-3).any()  # both Huber branches
    with jax.enable_x64(True):
        f, g = approach3.value_and_grad(jnp.asarray(x), log_n, log_d, log_l, jnp.asarray(w))
        ref_f, ref_g = jax.vmap(jax.value_and_grad(approach3.objective), (0, None, None, None, 0))(
            jnp.asarray(x), log_n, log_d, log_l, jnp.asarray(w))
    np.testing.assert_allclose(f, ref_f, rtol=1e-12)
    np.testing.assert_allclose(g, ref_g, rtol=1e-9, atol=1e-12 * float(np.abs(ref_g).max()))
    np_f, np_g = approach3.value_and_grad(x, log_n, log_d, log_l, w, xp=np)
    np.testing.assert_allclose(np_f, f, rtol=1e-12)
    np.testing.assert_allclose(np_g, g, rtol=1e-9, atol=1e-12 * float(np.abs(ref_g).max()))


def test_bootstrap_from_the_best_fit_gives_the_intervals_of_more_starts():
    """Each resample refitted from the full data's best fit alone lands where the 8 best starts take it:
    the same intervals (the same resamples, so no Monte-Carlo noise between the two)."""
    df = analysis.from_table(law_table(CHINCHILLA, 80, noise=0.01, seed=4))
    one, more = (analysis.fit_approach3(df, bootstrap=100, bootstrap_starts=k) for k in (1, 8))
    for k in ("a", "alpha", "beta", "E"):
        np.testing.assert_allclose(one["ci"][k], more["ci"][k], rtol=1e-4, err_msg=k)
    np.testing.assert_allclose(one["samples"]["a"], more["samples"]["a"], atol=1e-4)
    with pytest.raises(ConfigError, match="bootstrap_starts = 0 is not allowed"):
        analysis.fit_approach3(df, bootstrap=10, bootstrap_starts=0)


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


def test_approach2_says_why_a_bare_table_of_real_runs_has_one_point_per_budget():
    """Real runs' C = 6ND differs a little within a budget (here by 8 % steps): grouped by C within
    the 5 % tolerance every row is its own budget, and the skip says so and what to do."""
    rows = []
    for C in (1e19, 1e20):
        for k, N in enumerate(np.geomspace(1e7, 1e9, 5) * C / 1e19):
            rows.append({"N": N, "D": C * 1.08 ** (k - 2) / (6 * N), "loss": 2 + 0.05 * np.log(N / 1e8) ** 2})
    df = analysis.from_table(pd.DataFrame(rows))
    fit = fit_approach2(df)
    assert fit["skipped"] == ("every budget has a single point: rows are grouped into budgets by C within "
                              "tolerance 5 % (C defaults to 6ND); add a budget column (each row's nominal "
                              "C) or raise --tolerance"), fit["skipped"]
    assert "a" in fit_approach2(df, tolerance=0.4)  # the budgets found again: the fit runs


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
    assert fit["warnings"] == []  # 7 sizes, and the envelope visits at least 4 of them


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
    proc = _cli(f"--path={tmp_path / 'points.csv'}", "--out", str(tmp_path / "out"), "--bootstrap=50",
                "--budgets", "1e21,1e22")
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
    assert "unreliable" not in proc.stdout and "warning" not in proc.stdout + proc.stderr
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
    a = CHINCHILLA["beta"] / (29.3 + CHINCHILLA["beta"])
    fit = {**CHINCHILLA, "alpha": 29.3, "points": 6, "n_budgets": 3, "a": a, "b": 1 - a}
    warning, exponents = approach3.diagnose(fit)
    assert "alpha = 29.3" in warning and "6 points" in warning
    assert exponents == ("exponents outside 0.2–0.8 (where language models' compute-optimal exponents lie): "
                         "a = 0.009, b = 0.991; these points do not determine them")
    interval = {**fit, "alpha": 0.34, "a": 0.45, "b": 0.55, "ci": {"a": [0.15, 0.7], "b": [0.3, 0.85]}}
    assert approach3.diagnose(interval)[0].endswith(
        "a's 95 % interval 0.150–0.700, b's 95 % interval 0.300–0.850; these points do not determine them")
    sound = {**CHINCHILLA, "points": 6, "n_budgets": 3, "a": 0.45, "b": 0.55}
    assert approach3.diagnose(sound) == []
    assert approach3.diagnose({**sound, "n_budgets": 2}) == [
        "only 2 budgets: a power law in C needs at least 3 to be checked, not just drawn through them"]
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
        f"D_opt ≈ {1.6 * 3e13 ** 0.48:.3g} ({1.6 * 3e13 ** 0.48 / (0.1 * 3e13 ** 0.52):.1f} tokens/param); "
        "unreliable: 3e+13 is 1.0 decades beyond the largest budget, more than the 0.5 the fitted budgets "
        "span"]
    assert analysis.summary({"approach2": a2}, next_budget=6e12).splitlines()[-1].endswith("tokens/param)")
    assert "next budget 1e+20" in analysis.summary({"approach2": a2}, next_budget=1e20)
    assert "next budget" not in analysis.summary({"approach2": {"skipped": "no completed points"}})


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lm.analysis", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.filterwarnings("ignore:approach 2")  # one budget's minimum is at its edge
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("n", ["total", "non_embedding"])
def test_a_saved_frame_loads_back_as_the_same_frame(tmp_path, suffix, n):
    """Eval-curve points and left-out runs stay what they were: a saved frame is not a bare table."""
    df = analysis.load(_sweep(tmp_path), n)
    path = tmp_path / f"frame{suffix}"
    df.to_csv(path, index=False) if suffix == ".csv" else df.to_parquet(path)
    back = analysis.load(path, n)
    pd.testing.assert_frame_equal(back, df)
    assert (back["point"] == "final").sum() == 8 and back["included"].sum() == 6 + 4 * 6
    assert fit_approach2(back)["a"] == fit_approach2(df)["a"]


def test_every_fit_takes_a_bare_frame_with_c_6nd():
    table = isoflop_table(0.5).drop(columns="budget")  # N, D, loss and nothing else
    fit = fit_approach2(table)
    assert fit["a"] == pytest.approx(0.5, abs=1e-6)
    assert fit["a"] == pytest.approx(fit_approach2(analysis.from_table(table))["a"], abs=1e-12)
    assert "curves" in analysis.fit_approach1(table)["skipped"]  # approach 3: see recovers_known_laws


@pytest.mark.parametrize("name, content, message", [
    ("empty.csv", "", r"empty\.csv: empty file; expected a table with columns N, D, loss"),
    ("header.csv", "N,D,loss\n", r"header\.csv: no rows"),
    ("two.csv", "N,D\n1e6,1e9\n", r"two\.csv lacks column\(s\) \['loss'\]"),
    ("flags.csv", "N,D,loss,included\n1e6,1e9,2.5,maybe\n", r"flags\.csv: column 'included' must be True"),
    ("points.parquet", "not parquet", r"points\.parquet: not a readable parquet table"),
    ("points.json", "{}", r"points\.json: expected a \.csv or \.parquet table"),
])
def test_an_unusable_table_is_one_error_naming_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(FileError, match=message):
        analysis.load(tmp_path / name)


def test_a_parquet_without_the_columns_names_file_and_columns(tmp_path):
    pd.DataFrame({"N": [1e6], "loss": [2.0]}).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(FileError, match=re.escape(f"{tmp_path / 't.parquet'} lacks column(s) ['D']")):
        analysis.load(tmp_path / "t.parquet")
    with pytest.raises(FileError, match="no such sweep directory"):
        analysis.load(tmp_path / "missing")


PLAN_RUN = '{"name": "x", "budget": 1e12, "n_params": 1e4, "n_params_non_embedding": 5e3, "tokens": 1e7, ' \
           '"flops": 1e12, "flops_6nd": 1e12'


@pytest.mark.parametrize("content, message", [
    ("", r"plan\.json: not readable JSON"),
    ("[1, 2]", r"plan\.json: expected a JSON dict, found list"),
    ('{"runs": {}}', r"plan\.json: 'runs' is a dict, not a list of runs"),
    ('{"runs": [3]}', r"plan\.json: runs\[0\] is not a JSON object \(found int\)"),
    ('{"runs": [{"name": "x"}]}', r"plan\.json: runs\[0\] missing 'budget', 'n_params'"),
    ('{"runs": [' + PLAN_RUN.replace("1e7", '"many"') + '}]}', r"runs\[0\] 'tokens' is 'many', not a number"),
    ('{"runs": [' + PLAN_RUN + ', "steps": 2.5}]}', r"runs\[0\] 'steps' is 2\.5, not an integer"),
])
def test_a_damaged_plan_is_one_error_naming_it(tmp_path, content, message):
    sweep = _sweep(tmp_path)
    (sweep / "plan.json").write_text(content)
    with pytest.raises(FileError, match=message):
        analysis.load(sweep)


@pytest.mark.parametrize("content, problem", [
    ("{", "not readable JSON"),
    ("[1]", "expected a JSON dict, found list"),
    ('{"status": 3}', "'status' is 3, not a string"),
    ('{"status": "completed"}',
     "missing 'n_params', 'n_params_non_embedding', 'tokens', 'flops', 'flops_6nd'"),
    ("{" + PLAN_RUN.replace("1e4", '"big"')[1:] + ', "status": "completed"}',
     "'n_params' is 'big', not a number"),
    ("{" + PLAN_RUN[1:] + ', "status": "completed", "eval_loss": [2.0]}',
     "'eval_loss' is [2.0], not a number"),
])
def test_a_damaged_result_leaves_its_run_out_with_a_warning(tmp_path, content, problem):
    sweep = _sweep(tmp_path)
    path = sweep / "runs" / "C1e+13-N1e+05" / "result.json"
    path.write_text(content)
    with pytest.warns(UserWarning, match=re.escape(f"{path}: ") + ".*" + re.escape(problem)):
        df = analysis.load(sweep)
    finals = df[df["point"] == "final"].set_index("run")
    assert finals["included"].sum() == 5 and finals.loc["C1e+13-N1e+05", "status"] == "damaged"
    assert finals.loc["C1e+13-N1e+05", "reason"].startswith(f"damaged: {path}: ")
    assert not df[df["run"] == "C1e+13-N1e+05"]["included"].any()  # nor its curve
    assert finals.loc["C1e+13-N1e+05", "N"] == 1e5  # from the plan, for the report


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    proc = _cli(f"--path={tmp_path / 'empty.csv'}")
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert proc.stderr.splitlines() == [f"error: {tmp_path / 'empty.csv'}: empty file; expected a table with "
                                        "columns N, D, loss"]
    with pytest.raises(ConfigError, match=r"^bootstrap = -1 is not allowed: must be an integer >= 0"):
        analysis.run(tmp_path, bootstrap=-1)  # a ConfigError: one line through lm.cli


# The tiny sweep's final points (docs/experiments.md): budget, N, tokens, eval loss.
TINY_SWEEP = [
    (3e11, 11344, 4358144, 1.9205), (3e11, 14448, 2654208, 1.8548), (3e11, 26280, 1513472, 1.8658),
    (3e11, 41184, 1001472, 1.9345), (3e11, 80208, 536576, 2.1553), (1e12, 14448, 8849408, 1.8300),
    (1e12, 26280, 5042176, 1.6548), (1e12, 41184, 3336192, 1.5602), (1e12, 80208, 1785856, 1.6658),
    (1e12, 131520, 1118208, 1.8627), (3e12, 26280, 15128576, 1.6258), (3e12, 41184, 10010624, 1.4817),
    (3e12, 80208, 5355520, 1.4643), (3e12, 131520, 3354624, 1.4731), (3e12, 272080, 1585152, 1.5954)]


def test_the_tiny_sweep_fits_are_trusted():
    """The criteria of lm.analysis.checks pass a sound sweep: 3 budgets, interior minima, a ≈ 0.5."""
    df = analysis.from_table(pd.DataFrame(TINY_SWEEP, columns=["budget", "N", "D", "loss"]))
    fits = {"approach2": fit_approach2(df, bootstrap=200), "approach3": analysis.fit_approach3(df)}
    assert fits["approach2"]["warnings"] == [] and fits["approach3"]["warnings"] == []
    line = analysis.summary(fits).splitlines()[-1]
    assert line.startswith("next budget 3e+13 FLOPs (approach 3)") and "unreliable" not in line


def test_degenerate_resamples_make_no_numerical_noise():
    """Nearly flat profiles: some resamples' vertices and power laws overflow float64. That stays inside
    the fit (np.errstate, not a global filter): no numpy warning, and the wide interval is flagged."""
    rng = np.random.default_rng(2)  # (35 numpy warnings before np.errstate)
    table = isoflop_table(0.5, budgets=(1e18, 1e19, 1e20))
    table = table[table.groupby("budget").cumcount() % 3 != 1]  # 5 sizes per budget
    x = np.log(table["N"]) - np.log(0.1 * table["budget"] ** 0.5)
    table = table.assign(loss=2 + 0.01 * x**2 + rng.normal(0, 0.01, len(table)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)  # edge minima
        fit = fit_approach2(analysis.from_table(table), bootstrap=200, budgets=analysis.DEFAULT_BUDGETS)
    assert any(w.startswith("exponents outside 0.2–0.8") for w in fit["warnings"])


def test_the_headline_of_a_micro_sweep_says_it_is_unreliable():
    """Two budgets of three sizes (configs/isoflop/micro.py): the power law is a line through two points,
    and ten times the largest budget is further out than the budgets reach."""
    table = isoflop_table(0.5, budgets=(3e13, 1e14)).groupby("budget").nth([0, 3, 6])
    a2 = fit_approach2(analysis.from_table(table))
    assert a2["warnings"] == ["only 2 budgets: a power law in C needs at least 3 to be checked, not just "
                              "drawn through them"]
    line = analysis.summary({"approach2": a2}).splitlines()[-1]
    assert line.startswith("next budget 1e+15 FLOPs (approach 2): N_opt ≈ ")
    assert line.endswith("; unreliable: approach 2 has the warnings above; 1e+15 is 1.0 decades beyond the "
                         "largest budget, more than the 0.5 the fitted budgets span")


def test_the_headline_says_when_the_approaches_disagree():
    a3 = {**CHINCHILLA, "a": 0.452, "b": 0.548, "warnings": [], "C_range": [1e19, 1e21], "seconds": 0.1,
          "starts": 4500}
    n3, d3 = analysis.optimal_allocation(a3, 1e22)

    def a2(factor):  # approach 2's N_opt at 1e22 `factor` times approach 3's
        return {"a": 0.452, "b": 0.548, "k_N": factor * n3 / 1e22 ** 0.452,
                "k_D": d3 / factor / 1e22 ** 0.548, "warnings": []}

    near = analysis.summary({"approach2": a2(1.5), "approach3": a3}).splitlines()[-1]
    assert near.startswith("next budget 1e+22 FLOPs (approach 3)") and "unreliable" not in near
    far = analysis.summary({"approach2": a2(3.0), "approach3": a3}).splitlines()[-1]
    assert far.endswith(f"; unreliable: approach 2 gives N_opt ≈ {3 * n3:.3g}, more than a factor 2 apart")
