"""The tuning stage: planning its runs, fitting a synthetic loss surface, and the sweep planner's
`lr_rule="fitted"`; nothing trains here (the fit runs on written results)."""

import json
import math

import pytest

from configs.isoflop import tiny, tiny_grid
from experiments import tune
from experiments.plan import plan, sci
from lm.config import ConfigError
from lm.files import run_dir, write_json_atomic

K, E, K_B, E_B = 2.0, -0.4, 0.5, 0.5  # the surface's optima: lr* = K N^E, batch* = K_B N^E_B


def surface(n: float, lr: float, batch: int = 16) -> float:
    """A loss quadratic in log LR and log batch around known optima (a parabola fits it exactly)."""
    return (3.0 - 0.1 * math.log(n) + 0.2 * math.log(lr / (K * n ** E)) ** 2
            + 0.05 * math.log(batch / (K_B * n ** E_B)) ** 2)


def points(sizes, factors, batches=(16,), centre=1.3, budget=1e12):
    """Grid points around each size's optimum × `centre` (off the grid's middle)."""
    return [{"budget": budget, "n_params": n, "batch": b, "lr": lr, "loss": surface(n, lr, b)}
            for n in sizes for b in batches
            for lr in (f * centre * K * n ** E for f in factors)]


def test_fit_recovers_a_known_optimum():
    sizes = (10_000, 30_000, 100_000, 300_000)
    result = tune.fit(points(sizes, (0.25, 0.5, 1, 2, 4)))
    assert result["lr"] == pytest.approx({"k": K, "e": E}, rel=1e-6)
    assert result["batch"] is None and result["warnings"] == []
    assert [o["lr_opt"] for o in result["optima"]] == pytest.approx([K * n ** E for n in sizes])


def test_fit_recovers_the_batch_optimum_from_a_batch_grid():
    sizes = (4096, 16384, 65536)  # batch* = 32, 64, 128
    result = tune.fit(points(sizes, (0.5, 1, 2), batches=(16, 32, 64, 128, 256)))
    assert result["batch"] == pytest.approx({"k": K_B, "e": E_B}, rel=1e-6)
    assert result["lr"] == pytest.approx({"k": K, "e": E}, rel=1e-6)


def test_an_edge_minimum_is_flagged_warned_and_used():
    pts = points((10_000, 100_000), (1, 2, 4), centre=1.0)  # the smallest LR is each size's optimum
    pts += points((30_000,), (0.25, 0.5, 1, 2, 4), centre=1.0)
    pts[-1]["loss"] = math.inf  # a diverged run: left out, not a minimum
    result = tune.fit(pts)
    opts = {o["n_params"]: o for o in result["optima"]}
    assert opts[10_000]["lr_edge"] == "smallest" and opts[10_000]["lr_opt"] == pytest.approx(K * 1e4 ** E)
    assert opts[30_000]["lr_edge"] == "" and opts[30_000]["lr_opt"] == pytest.approx(K * 3e4 ** E)
    warnings = result["warnings"]
    assert len(warnings) == 2 and "N = 10,000: the lowest loss is at the grid's smallest lr" in warnings[0]
    assert "widen tune.lr_factors" in warnings[0]
    assert tune.vertex([1e-3, 2e-3, 4e-3], [3.0, 2.0, 1.0])[2] == "largest"
    pts = points((10_000, 30_000), (1, 2, 4))
    for p in pts[3:]:
        p["loss"] = math.inf
    with pytest.raises(ConfigError, match=r"every run of C = 1e12, N = 30,000 diverged: lower tune"):
        tune.fit(pts)


def test_tuning_runs_are_the_sweeps_runs_at_its_smallest_budget_times_each_factor(tmp_path):
    c = tiny.get_config("untuned")
    runs = tune.tuning_plan(c, tmp_path)
    sweep = {r.n_params: r for r in plan(c) if r.budget == min(c.budgets)}
    assert len(runs) == len(sweep) * len(c.tune.lr_factors) == len({r.name for r in runs})
    for r in runs:
        twin = sweep[r.n_params]
        factor = tune.learning_rate(r) / tune.learning_rate(twin)
        assert min(abs(factor / f - 1) for f in c.tune.lr_factors) < 1e-9, r.name
        assert (r.steps, r.tokens, r.config.model.to_dict()) == (twin.steps, twin.tokens,
                                                                 twin.config.model.to_dict())
        assert r.name == f"T3e11-N{r.name.split('-N')[1].split('-')[0]}-lr{sci(tune.learning_rate(r))}"
        assert r.workdir == str(run_dir(tmp_path / "tune", r.name))
    again = tune.tuning_plan(c, tmp_path)  # planning is pure: a rerun plans the same runs
    assert [(r.name, r.config.to_dict()) for r in again] == [(r.name, r.config.to_dict()) for r in runs]
    c.seeds = 3  # replicates the sweep's runs, not the tuning grid's
    assert [r.name for r in tune.tuning_plan(c, tmp_path)] == [r.name for r in runs]
    grid = tune.tuning_plan(tiny_grid.get_config(), tmp_path)  # a WSD grid: independent WSD runs
    assert all(r.after is None and r.config.optim.schedule == "wsd" for r in grid)


@pytest.mark.parametrize("field, value, message", [
    ("n_budgets", 0, r"config\.tune\.n_budgets = 0 is not allowed: must be a positive integer"),
    ("lr_factors", (1.0, 2.0), r"config\.tune\.lr_factors = \(1\.0, 2\.0\) is not allowed: .*at least 3"),
    ("lr_factors", (0.5, 1.0, 1.0), r"config\.tune\.lr_factors = .*distinct"),
    ("lr_factors", (-1.0, 1.0, 2.0), r"config\.tune\.lr_factors = .*> 0"),
    ("batch_sizes", (8, 16), r"config\.tune\.batch_sizes = \(8, 16\) is not allowed: must be \(\)"),
    ("lr_rule", "fitted", r"config\.tune\.lr_rule = 'fitted' is not allowed: must be 'constant' or"),
])
def test_bad_tune_fields_are_one_line_naming_the_field(field, value, message):
    c = tiny.get_config("untuned")
    c.tune[field] = value
    with pytest.raises(ConfigError, match=message) as e:
        tune.tuning_plan(c)
    assert "\n" not in str(e.value)


def test_more_tuning_budgets_than_the_sweep_has_is_refused():
    c = tiny.get_config("untuned")
    c.tune.n_budgets = 4
    with pytest.raises(ConfigError, match=r"config\.tune\.n_budgets = 4 .*has 3 budget\(s\)"):
        tune.tuning_plan(c)


def fitted_sweep(tmp_path, batch=None):
    """The tiny sweep under lr_rule 'fitted', with a fit.json of known laws written for it."""
    c = tiny.get_config("untuned")
    c.train.optim.lr_rule = "fitted"
    write_json_atomic(tmp_path / "tune" / "fit.json", {"lr": {"k": 0.5, "e": -0.3}, "batch": batch})
    return c


def test_the_planner_gives_each_run_the_fitted_lr_and_records_where_it_came_from(tmp_path):
    c = fitted_sweep(tmp_path)
    runs = plan(c, tmp_path)
    assert len(runs) == 15 and any(r.config.optim.peak_lr > 0.02 for r in runs)  # not capped at max_lr
    for r in runs:
        lr = 0.5 * r.n_params ** -0.3
        assert r.config.optim.lr_rule == "constant" and r.config.optim.peak_lr == pytest.approx(lr)
        assert tune.learning_rate(r) == pytest.approx(lr)
        assert tune.provenance(c, tmp_path, r.config) == {
            "peak_lr": pytest.approx(lr), "batch_size": 16, "batch_source": "train.data.batch_size",
            "lr_source": f"fitted: {tmp_path / 'tune' / 'fit.json'}"}
    untuned = tiny.get_config("untuned")
    assert tune.provenance(untuned, tmp_path, runs[0].config)["lr_source"] == "inverse_width rule"
    c = fitted_sweep(tmp_path, batch={"k": 0.25, "e": 0.5})  # batch = 0.25 sqrt(N), a power of two
    for r in plan(c, tmp_path):
        assert r.config.data.batch_size == 2 ** round(math.log2(0.25 * r.n_params ** 0.5)), r.name
        assert abs(r.flops / r.budget - 1) < 0.01
        assert tune.provenance(c, tmp_path, r.config)["batch_source"].startswith("fitted: ")


def test_a_missing_fit_says_how_to_make_it_in_one_line(tmp_path):
    c = tiny.get_config("untuned")
    c.train.optim.lr_rule = "fitted"
    with pytest.raises(ConfigError, match=r"lr_rule = 'fitted' needs .*tune/fit\.json.*python -m "
                                          r"experiments\.tune") as e:
        plan(c, tmp_path)
    assert "\n" not in str(e.value)


def test_a_run_config_with_the_sweeps_fitted_rule_is_refused():
    from lm.optim import peak_lr

    o = tiny.get_config("untuned").train.optim
    o.lr_rule = "fitted"
    with pytest.raises(ConfigError, match=r"optim\.lr_rule = 'fitted' is not allowed: a run takes"):
        peak_lr(o, 64)


def test_the_stage_fits_written_results_idempotently_and_the_sweep_uses_the_fit(tmp_path):
    c = tiny.get_config("untuned")
    c.runner = "local"
    for r in tune.tuning_plan(c, tmp_path):  # results as training would leave them
        write_json_atomic(run_dir(tmp_path / "tune", r.name) / "result.json", {
            "status": "completed", "eval_loss": surface(r.n_params, tune.learning_rate(r))})
    result = tune.stage(c, tmp_path, "local")
    assert result["lr"] == pytest.approx({"k": K, "e": E}, rel=1e-6) and result["warnings"] == []
    fit_file = tmp_path / "tune" / "fit.json"
    assert json.loads(fit_file.read_text())["lr"] == pytest.approx(result["lr"])
    assert (tmp_path / "tune" / "tune.png").stat().st_size > 0
    planned = json.loads((tmp_path / "tune" / "plan.json").read_text())["runs"]
    assert len(planned) == 5 * len(c.tune.lr_factors)
    before = fit_file.read_text()
    assert tune.stage(c, tmp_path, "local") == result and fit_file.read_text() == before
    c.train.optim.lr_rule = "fitted"
    for r in plan(c, tmp_path):
        assert tune.learning_rate(r) == pytest.approx(tune.law(result["lr"], r.n_params))



def test_the_sweep_command_tunes_first_once_and_a_dry_run_shows_the_tuning_plan(tmp_path, capsys):
    """isoflop with lr_rule 'fitted': before the fit exists a dry run prints the tuning plan and
    stops; a real run fits the (here written) tuning results first, then plans from the fit; a
    rerun refits the same results (tuning is done once and reused)."""
    from experiments.isoflop import tuned_first

    c = tiny.get_config("untuned")
    c.train.optim.lr_rule = "fitted"
    assert tuned_first(c, tmp_path, "local", dry_run=True, flops_per_second=1e9)
    out = capsys.readouterr().out
    assert "T3e11-N1.5e4-lr" in out and "the sweep plans from the tuning fit" in out
    assert not (tmp_path / "tune" / "fit.json").exists()
    for r in tune.tuning_plan(c, tmp_path):
        write_json_atomic(run_dir(tmp_path / "tune", r.name) / "result.json", {
            "status": "completed", "eval_loss": surface(r.n_params, tune.learning_rate(r))})
    assert not tuned_first(c, tmp_path, "local", dry_run=False)
    assert "lr_opt = 2 × N^-0.400" in capsys.readouterr().out
    fit = (tmp_path / "tune" / "fit.json").read_text()
    assert not tuned_first(c, tmp_path, "local", dry_run=True)  # the fit exists: the sweep's plan
    assert not tuned_first(c, tmp_path, "local", dry_run=False)
    assert "15 runs, 15 already done" in capsys.readouterr().out
    assert (tmp_path / "tune" / "fit.json").read_text() == fit
    c.train.optim.lr_rule = "inverse_width"
    assert not tuned_first(c, tmp_path, "local", dry_run=False)
    assert capsys.readouterr().out == ""
