"""Seed replicates: the loader's replicate column, the replicate means the fits take, the run-to-run noise
they report, and a two-stage bootstrap that widens the intervals as injected noise predicts."""

import json

import matplotlib.axes
import numpy as np
import pandas as pd
import pytest

from configs.isoflop import tiny
from experiments.isoflop import write_plan
from experiments.plan import plan
from lm import analysis
from lm.analysis import approach3, plots, report
from lm.analysis.approach2 import fit_approach2
from lm.analysis.bootstrap import replicate_means
from lm.analysis.replicates import noise, pooled_sd
from lm.files import FileError

LAW = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Chinchilla's


def parabolas() -> pd.DataFrame:
    """Approach 2's model exactly: 4 budgets × 7 sizes on parabolas in log N, vertex N_opt = 0.1·C^0.5."""
    rows = []
    for C in (1e18, 1e19, 1e20, 1e21):
        x_opt = np.log(0.1 * C**0.5)
        for x in x_opt + np.linspace(-1, 1, 7):
            rows.append({"N": np.exp(x), "D": C / (6 * np.exp(x)), "loss": 2 + 0.05 * (x - x_opt) ** 2,
                         "budget": C})
    return pd.DataFrame(rows)


def law_points(n: int = 80) -> pd.DataFrame:
    """Approach 3's model exactly: LAW at n random (N, D)."""
    rng = np.random.default_rng(0)
    N, D = 10 ** rng.uniform(6, 10, n), 10 ** rng.uniform(8, 12, n)
    return pd.DataFrame({"N": N, "D": D, "loss": approach3.law(LAW, N, D)})


def replicate(table: pd.DataFrame, shift: np.ndarray) -> pd.DataFrame:
    """shift.shape[1] replicates of every row, replicate j's loss moved by shift[:, j]."""
    return pd.concat([table.assign(replicate=j, loss=table["loss"] + shift[:, j])
                      for j in range(shift.shape[1])], ignore_index=True)


FITS = {"approach2": (parabolas, lambda df: fit_approach2(df, bootstrap=200)),
        "approach3": (law_points, lambda df: analysis.fit_approach3(df, bootstrap=200))}


def width(ci: dict, k: str = "a") -> float:
    return ci[k][1] - ci[k][0]


@pytest.mark.parametrize("name", FITS)
def test_replicates_that_agree_leave_the_intervals_the_points_give(name):
    """No run noise (each point off the law by a misfit its replicates share): the replicate stage draws
    the same means, so the two-stage intervals are the points-only ones, and run noise makes none of them."""
    table, fit = FITS[name]
    base = table()
    base = base.assign(loss=base["loss"] + 2e-3 * np.random.default_rng(1).normal(size=len(base)))
    f = fit(analysis.from_table(replicate(base, np.zeros((len(base), 3)))))
    for k in ("a", "b"):
        assert width(f["ci"], k) > 0
        np.testing.assert_allclose(f["ci"][k], f["ci_points"][k], rtol=1e-6)
        assert f["noise_share"][k] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("name", FITS)
def test_run_noise_that_averages_out_is_all_of_the_interval(name):
    """Two replicates at ±d around an exact law: their means are the law, so resampling the points alone
    gives a no wider than rounding, while the two-stage interval, all of it run noise, grows as d."""
    table, fit = FITS[name]
    base = table()
    sign = np.where(np.arange(len(base)) % 2, 1.0, -1.0)[:, None] * np.array([1.0, -1.0])
    widths = []
    for d in (5e-4, 1e-3):
        f = fit(analysis.from_table(replicate(base, d * sign)))
        assert width(f["ci_points"]) < 1e-3 * width(f["ci"])
        assert f["noise_share"]["a"] == pytest.approx(1, abs=1e-5)
        widths.append(width(f["ci"]))
    assert widths[1] == pytest.approx(2 * widths[0], rel=0.05)


def test_gaussian_run_noise_is_reported_averaged_and_widens_the_interval_as_predicted():
    """Noise of sd s on 3 replicates of 80 points of a law: `noise` recovers s (160 degrees of freedom:
    ±6 %), the fits are those of the replicate means, and the replicate stage adds to the points' variance
    s²/r per point its own, s²(r−1)/r²: a share (r−1)/(2r−1) = 0.4 of a's interval (±0.15 for one draw)."""
    s, r = 1e-3, 3
    base = law_points()
    z = np.random.default_rng(2).normal(size=(len(base), r))
    df = analysis.from_table(replicate(base, s * z))
    found = noise(df)
    assert found["replicates"] == r and found["points"] == len(base)
    assert found["sd"] == pytest.approx(s, rel=0.15)
    means = base.assign(loss=base["loss"] + s * z.mean(1))
    fit, plain = analysis.fit_approach3(df, bootstrap=200), analysis.fit_approach3(means)
    assert fit["points"] == len(base)
    for k in ("E", "alpha", "beta", "a"):
        assert fit[k] == pytest.approx(plain[k], rel=1e-9), k
    assert 0.25 < fit["noise_share"]["a"] < 0.55
    assert noise(analysis.from_table(base)) == {"replicates": 1}


def test_one_run_points_draw_run_noise_at_the_pooled_sd():
    """The second stage draws a one-run point's mean from its loss plus normal noise of the pooled sd over
    its copies (variance sd²/c), leaves points with no copies alone, and without a pooled sd keeps it."""
    losses = np.array([[1.0, np.nan], [2.0, np.nan], [3.0, 3.2]])
    copies = np.tile([1.0, 2.0, 1.0], (40_000, 1))
    copies[::2, 0] = 0
    drawn = replicate_means(losses, copies, np.random.default_rng(0), sd=0.1)
    assert np.all(drawn[::2, 0] == 1.0)
    assert drawn[1::2, 0].mean() == pytest.approx(1.0, abs=2e-3)
    assert drawn[1::2, 0].std() == pytest.approx(0.1, rel=0.02)
    assert drawn[:, 1].std() == pytest.approx(0.1 / np.sqrt(2), rel=0.02)
    assert set(np.unique(drawn[:, 2])) == {3.0, 3.1, 3.2}
    assert np.all(replicate_means(losses, copies, np.random.default_rng(0))[:, :2] == [1.0, 2.0])
    assert pooled_sd(losses) == pytest.approx(0.2 / np.sqrt(2)) and pooled_sd(losses[:2]) == 0.0


@pytest.mark.parametrize("name", FITS)
def test_replicates_at_some_points_carry_run_noise_to_all(name):
    """Noise of sd s, replicated (3 runs) at every other point only: the one-run points are drawn at the
    pooled sd, so run noise makes about the share of a's interval it makes with every point replicated
    (left at their means, the one-run points would make it 0.3-0.7 times that)."""
    table, fit = FITS[name]
    base, s = table(), 2e-3
    z = s * np.random.default_rng(4).normal(size=(len(base), 3))
    full = fit(analysis.from_table(replicate(base, z)))
    df = analysis.from_table(replicate(base, z))
    half = fit(df[(df["replicate"] == 0) | (np.arange(len(df)) % len(base) % 2 == 0)])
    assert noise(df)["sd"] == pytest.approx(s, rel=0.2)
    assert half["noise_share"]["a"] > 0.85 * full["noise_share"]["a"] > 0  # at their means: 0.3-0.7 ×
    assert width(half["ci"]) > width(half["ci_points"])


def test_approach2_takes_means_and_the_plot_draws_each_points_spread(tmp_path, monkeypatch):
    """Approach 2 fits the replicate means; noise is pooled per budget; the IsoFLOP plot draws ± each
    point's replicate sd as error bars at its mean."""
    base, z = parabolas(), np.random.default_rng(3).normal(size=(28, 2))
    df = analysis.from_table(replicate(base, 1e-3 * z))
    fit = fit_approach2(df)
    assert fit["a"] == pytest.approx(fit_approach2(base.assign(loss=base["loss"] + 1e-3 * z.mean(1)))["a"],
                                     rel=1e-12)
    assert [b["points"] for b in fit["budgets"]] == [7] * 4
    sd = 1e-3 * np.abs(z[:, 0] - z[:, 1]) / np.sqrt(2)
    assert [b["sd"] for b in noise(df)["budgets"]] == pytest.approx(
        [np.sqrt(np.mean(sd[i:i + 7] ** 2)) for i in range(0, 28, 7)], rel=1e-9)
    bars, draw = [], matplotlib.axes.Axes.errorbar

    def errorbar(ax, x, y, yerr, **kw):
        bars.append(np.asarray(yerr))
        return draw(ax, x, y, yerr, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", errorbar)
    plots.isoflop(fit, df, tmp_path)
    np.testing.assert_allclose(np.concatenate(bars), sd, rtol=1e-9)


def test_the_loader_reads_replicates_and_a_saved_frame_keeps_them(tmp_path):
    """plan.json's `replicate` (0 when absent) becomes the column, a saved frame loads back equal, and a
    replicate that is not an integer >= 0 is one error naming it."""
    sweep = tmp_path / "sweep"
    runs = [{"name": name, "budget": 1e12, "n_params": 1e4, "n_params_non_embedding": 5e3, "tokens": 1.6e7,
             "flops": 1e12, "flops_6nd": 1e12, **extra}
            for name, extra in (("x", {}), ("x-s1", {"replicate": 1}), ("x-s2", {"replicate": 2}))]
    for i, r in enumerate(runs):
        (sweep / "runs" / r["name"]).mkdir(parents=True)
        (sweep / "runs" / r["name"] / "result.json").write_text(json.dumps(
            {**r, "status": "completed", "steps": 10, "eval_loss": 2.0 + i / 100}))
    (sweep / "plan.json").write_text(json.dumps({"runs": runs}))
    df = analysis.load(sweep)
    assert df["replicate"].tolist() == [0, 1, 2]
    assert noise(df)["sd"] == pytest.approx(0.01)
    for path in (tmp_path / "frame.csv", tmp_path / "frame.parquet"):
        df.to_csv(path, index=False) if path.suffix == ".csv" else df.to_parquet(path)
        pd.testing.assert_frame_equal(analysis.load(path), df)
    df.assign(replicate=[0, 1.5, 2]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(FileError, match=r"bad\.csv: column 'replicate' must be an integer >= 0 .* row 1 has"):
        analysis.load(tmp_path / "bad.csv")
    runs[1]["replicate"] = "one"
    (sweep / "plan.json").write_text(json.dumps({"runs": runs}))
    with pytest.raises(FileError, match=r"runs\[1\] 'replicate' is 'one', not an integer"):
        analysis.load(sweep)


def test_a_planned_sweeps_replicates_reach_the_loader(tmp_path):
    """plan.json records each run's replicate, and the loader gives it to the run's row."""
    sweep = tiny.get_config("untuned")
    sweep.seeds = 2
    runs = plan(sweep, tmp_path)
    write_plan(tmp_path, sweep, runs)
    finals = analysis.load(tmp_path)
    assert finals["run"].tolist() == [r.name for r in runs] and finals["replicate"].tolist() == [0, 1] * 15


def test_the_report_and_summary_say_how_much_of_each_interval_is_run_noise():
    fits = {"n": "total", "noise": {"replicates": 3, "points": 15, "sd": 0.0123,
                                    "budgets": [{"C": 1e12, "points": 15, "sd": 0.0123}]},
            "approach2": {"a": 0.5, "b": 0.5, "k_N": 0.1, "k_D": 1.6,
                          "ci": {"a": [0.4, 0.6], "b": [0.4, 0.6]},
                          "ci_points": {"a": [0.45, 0.55], "b": [0.45, 0.55]},
                          "noise_share": {"a": 0.75, "b": 0.75, "k_N": float("nan")}}}
    finals = pd.DataFrame({"point": ["final"], "included": [True]})
    text = report.render(fits, finals, "t.csv", [])
    assert "pooled sd **0.0123** over 15 points with replicates (up to 3 runs each)" in text
    assert "| approach 2 | a | [0.4, 0.6] | [0.45, 0.55] | 75 % |" in text
    assert "k_N" not in text.split("## Run-to-run noise")[1]
    assert ("run-to-run noise: sd 0.0123 of the final eval loss over 15 points with replicates (up to 3 "
            "each); its share of a's interval: approach 2 75 %") in analysis.summary(fits)
    assert "No seed replicates" in report.render({**fits, "noise": {"replicates": 1}}, finals, "t", [])
