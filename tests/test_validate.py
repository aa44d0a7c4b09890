"""--validate: the run planned at approach 3's optimum beyond the sweep, the numbers it is compared
with, report.md's section, and the whole path on a sweep whose results a known law wrote."""

import json
import math

import numpy as np
import pytest

from configs.isoflop import tiny
from experiments import validate
from experiments.plan import plan, sci
from lm.analysis.approach3 import closed_form_optimum
from lm.config import ConfigError
from lm.files import run_dir, write_json_atomic
from lm.sizing import shape_for_params

from .test_experiments import _config_flags, _isoflop, micro_sweep

LAW = {"E": 1.0, "A": 30.0, "B": 100.0, "alpha": 0.5, "beta": 0.5}  # N_opt = 0.3 sqrt(C / 6)


def law_loss(N: float, D: float, p: dict = LAW) -> float:
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def fit_with_samples(C: float) -> dict:
    """An approach-3 fit as `validate.refit` returns it: the law, 5 resamples and the optimum at C."""
    samples = {k: np.full(5, v) for k, v in LAW.items()}
    samples["E"] = np.array([0.9, 0.95, 1.0, 1.05, 1.1])
    n_opt, d_opt = (float(x) for x in closed_form_optimum(LAW, C))
    optimum = {"C": C, "N_opt": n_opt, "D_opt": d_opt, "tokens_per_param": d_opt / n_opt,
               "loss": law_loss(n_opt, d_opt), "N_opt_ci": [n_opt, n_opt], "D_opt_ci": [d_opt, d_opt],
               "loss_ci": [0.0, 9.0]}
    return {**LAW, "samples": samples, "predictions": [optimum], "warnings": []}


@pytest.mark.parametrize("mode, n", [("cosine", "total"), ("wsd", "non_embedding"), ("grid", "total")])
def test_planned_at_the_predicted_optimum(mode, n, tmp_path):
    c = tiny.get_config("untuned")
    c.mode, c.analysis.n = mode, n
    C = 3 * max(c.budgets)
    n_opt = float(closed_form_optimum(LAW, C)[0])
    r = validate.plan_run(c, LAW, tmp_path)
    N = r.n_params if n == "total" else r.n_params_non_embedding
    assert r.budget == C and abs(r.flops / C - 1) < 0.01 and abs(math.log(N / n_opt)) < math.log(1.25)
    assert r.config.model.to_dict() == shape_for_params(
        n_opt, aspect_ratio=c.aspect_ratio, head_dim=c.head_dim, ffn_ratio=c.ffn_ratio, base=c.train.model,
        count=n).to_dict()
    assert r.name == f"V9e12-N{sci(r.n_params)}" and r.workdir == str(tmp_path / "validation/runs" / r.name)
    assert r.config.optim.schedule == ("cosine" if mode == "cosine" else "wsd")
    assert r.config.optim.peak_lr == c.train.optim.peak_lr and r.config.data.batch_size == 16
    assert r.after is None and not r.config.train.init_from  # an independent run


def test_bad_input_is_one_line():
    c = tiny.get_config("untuned")
    c.validate_factor = 1.0
    with pytest.raises(ConfigError, match=r"^config.validate_factor = 1.0 is not allowed: must be > 1"):
        plan(c)
    c.validate_factor, c.analysis.bootstrap = 3.0, 0
    with pytest.raises(ConfigError, match=r"bootstrap = 0 is not allowed"):
        validate.check_options(c, analyse=True)
    with pytest.raises(ConfigError, match=r"drop --analyse=false"):
        validate.check_options(tiny.get_config("untuned"), analyse=False)
    with pytest.raises(ConfigError, match=r"approach 3 was skipped \(too few points\)"):
        validate.check_fit({"skipped": "too few points"})
    with pytest.raises(ConfigError, match=r"approach 3 has no bootstrap interval"):
        validate.check_fit(dict(LAW))


def test_compare_holds_the_observed_loss_against_the_law_at_the_trained_size(tmp_path):
    c = tiny.get_config("untuned")
    C = validate.budget(c)
    fit = fit_with_samples(C)
    r = validate.plan_run(c, fit, tmp_path)
    predicted = law_loss(r.n_params, r.tokens)
    lo, hi = np.percentile(predicted + fit["samples"]["E"] - 1.0, [2.5, 97.5])
    inside = validate.compare(fit, r, {"status": "completed", "eval_loss": predicted + 0.05}, "total")
    assert inside["predicted_loss"] == pytest.approx(predicted, rel=1e-12)
    assert inside["predicted_loss_ci"] == pytest.approx([lo, hi], rel=1e-12)
    assert inside["difference"] == pytest.approx(0.05) and inside["inside"]
    assert (inside["N"], inside["D"], inside["optimum"]) == (r.n_params, r.tokens, fit["predictions"][0])
    outside = validate.compare(fit, r, {"status": "completed", "eval_loss": hi + 0.01}, "total")
    assert not outside["inside"] and "outside the 95 % interval" in validate.summary(outside)
    diverged = validate.compare(fit, r, {"status": "diverged"}, "total")
    assert math.isnan(diverged["observed_loss"]) and not diverged["inside"]
    assert "ended diverged with no eval loss" in validate.summary(diverged)
    ne = validate.compare(fit, r, {"status": "completed", "eval_loss": 1.5}, "non_embedding")
    assert ne["N"] == r.n_params_non_embedding
    assert ne["predicted_loss"] == pytest.approx(law_loss(r.n_params_non_embedding, r.tokens))


def test_report_section_replaces_an_older_one(tmp_path):
    fit = fit_with_samples(9e12)
    r = validate.plan_run(tiny.get_config("untuned"), fit, tmp_path)
    v = validate.compare(fit, r, {"status": "completed", "eval_loss": 1.1234}, "total")
    text = validate.section(v)
    assert text.startswith("## Validation\n") and "1.1234 observed" in text and f"{r.n_params:,}" in text
    lo, hi = v["predicted_loss_ci"]
    assert f"| {v['predicted_loss']:.4f} [{lo:.4f}, {hi:.4f}] |" in text and "inside the 95 %" in text
    report = "# Fits\n\n## Approach 2\n\nx\n\n## Figures\n\n![a](a.png)\n"
    once = validate.with_section(report, text)
    assert once == report + "\n" + text
    assert validate.with_section(once, text) == once
    older = report.replace("## Figures", "## Validation\n\nold\n\n## Figures")
    assert validate.with_section(older, text) == once


def test_dry_run_preview():
    c = tiny.get_config("untuned")
    before = validate.preview(c, {"skipped": "too few points"}, "/sweep", None)
    assert before == ("validation: planned after the fits (no approach-3 fit in /sweep/fits.json yet), at "
                      "approach 3's optimum for 9e+12 FLOPs (3 × the largest budget)")
    r = validate.plan_run(c, LAW, "/sweep")
    text = validate.preview(c, LAW, "/sweep", 1e-9)
    n_opt = float(closed_form_optimum(LAW, 9e12)[0])
    assert f"N_opt ≈ {n_opt:.3g}" in text and f"\n{r.name} " in text and f"{r.shape:>7}" in text
    assert f"{r.flops * 1e-9:8.0f}s" in text  # its estimated time


def write_results(sweep_dir, runs, loss) -> None:
    """Each run's result.json as a finished run writes it, with eval loss `loss(N, D)`."""
    for r in runs:
        write_json_atomic(run_dir(sweep_dir, r.name) / "result.json", {
            "status": "completed", "eval_loss": loss(r.n_params, r.tokens), "n_params": r.n_params,
            "n_params_non_embedding": r.n_params_non_embedding, "tokens": r.tokens, "flops": r.flops,
            "flops_6nd": r.flops_6nd})


def test_validate_end_to_end(tmp_path):
    """A sweep whose results LAW wrote, and a finished run at LAW's optimum of 1.5 × its largest
    budget under SWEEP/validation: --validate plans that very run (so trains nothing), holds its loss
    against the refitted law's and records it, and the fits leave it out; a dry run then shows it."""
    c = micro_sweep(tmp_path / "data")  # nothing trains: no corpus needed
    c.validate_factor = 1.5
    sweep_dir = tmp_path / "sweep"
    write_results(sweep_dir, plan(c, sweep_dir), law_loss)
    r = validate.plan_run(c, LAW, sweep_dir)
    observed = law_loss(r.n_params, r.tokens) + 0.01
    write_results(validate.directory(sweep_dir), [r], lambda N, D: observed)
    flags = [*_config_flags(c), "--validate", "--config.validate_factor=1.5"]
    proc = _isoflop(sweep_dir, *flags)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and f"{r.name} ({r.shape}, {r.flops:.3g} FLOPs), already done" in out, out
    v = json.loads((sweep_dir / "validation.json").read_text())
    assert (v["run"], v["N"], v["D"], v["observed_loss"]) == (r.name, r.n_params, r.tokens, observed)
    assert v["predicted_loss"] == pytest.approx(law_loss(r.n_params, r.tokens), rel=1e-4)
    assert v["difference"] == pytest.approx(0.01, rel=0.01) and not v["inside"]  # an exact law: no spread
    assert v["optimum"]["N_opt"] == pytest.approx(closed_form_optimum(LAW, r.budget)[0], rel=1e-3)
    assert "outside the 95 % interval" in out
    assert json.loads((sweep_dir / "fits.json").read_text())["approach3"]["points"] == 6
    assert (sweep_dir / "report.md").read_text().endswith(validate.section(v))
    dry = _isoflop(sweep_dir, *flags, "--dry_run", "--flops_per_second=1e9").communicate(timeout=120)[0]
    assert f"N_opt ≈ {v['optimum']['N_opt']:.3g}" in dry and f"\n{r.name} " in dry, dry
