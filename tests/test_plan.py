"""The sweep planner checks every sweep field (bar slurm) before it plans anything; nothing compiles."""

import json

import pytest

from configs.isoflop import gpu, micro, tiny, tiny_grid
from experiments.plan import plan
from experiments.tune import tuning_plan
from lm.config import ConfigError


def _set(config, dotted: str, value) -> None:
    *parents, key = dotted.split(".")
    for p in parents:
        config = config[p]
    config[key] = value


@pytest.mark.parametrize("sweep", [lambda: tiny.get_config("untuned"), gpu.get_config, micro.get_config,
                                   lambda: micro.get_config("quick"), tiny_grid.get_config])
def test_the_packaged_sweeps_pass(sweep):
    assert plan(sweep())


def test_the_default_sweep_tunes_first_then_replicates_its_cheapest_budget(tmp_path):
    """The demo: a tuning plan at its smallest budget, then, from the fit, the untuned sweep's 15 points
    at the fitted LRs, with a second seed at 3e11."""
    demo, untuned = tiny.get_config(), plan(tiny.get_config("untuned"))
    assert len(tuning_plan(demo, tmp_path)) == 5 * len(demo.tune.lr_factors)
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "fit.json").write_text(json.dumps({"lr": {"k": 2.0, "e": -0.5}, "batch": None}))
    runs = plan(demo, tmp_path)
    assert [r.name for r in runs if r.seed == 0] == [r.name for r in untuned]
    assert [r.name for r in runs if r.seed] == [r.name + "-s1" for r in untuned if r.budget == 3e11]
    assert all(r.config.optim.peak_lr == pytest.approx(2.0 * r.n_params**-0.5) for r in runs)


GENERATED = {"shapes": ()}  # fields only generated sizes read
BAD = [
    ({"workers": 0}, r"config\.workers = 0 is not allowed: must be a positive integer"),
    ({"workers": -2}, r"config\.workers = -2"),
    ({"runner": "ssh"}, r"config\.runner = 'ssh' is not allowed: must be one of local, subprocess, slurm"),
    ({"mode": "linear"}, r"config\.mode = 'linear'"),
    ({"flops": "approx"}, r"config\.flops = 'approx'"),
    ({"budgets": ()}, r"config\.budgets = \(\) is not allowed: list at least one"),
    ({"budgets": (1e12, -3e12, 1e13)}, r"config\.budgets = .* must be positive"),
    ({"budgets": (1e12, float("nan"), 1e13)}, r"config\.budgets = .* must be positive"),
    ({"budgets": (1e12, 1e12, 3e12)}, r"config\.budgets = .* duplicates"),
    ({"shapes": ("16x1", "16x2")}, r"config\.shapes = .* has 2 entries for 3 budgets"),
    ({"shapes": ("16x1", "16x2", "24by2")}, r"config\.shapes\[2\] = '24by2'"),
    ({"shapes": ("16x1", "16x2", "25x2")}, r"config\.shapes\[2\]: shape '25x2' needs an even d_model"),
    ({**GENERATED, "sizes_per_budget": 0}, r"config\.sizes_per_budget = 0"),
    ({**GENERATED, "size_span": 1.0}, r"config\.size_span = 1\.0 is not allowed: must be > 1"),
    ({"size_span": 0.5}, r"config\.size_span = 0\.5"),
    ({**GENERATED, "tokens_per_param": 0.0}, r"config\.tokens_per_param = 0\.0"),
    ({"tokens_per_param": -20.0}, r"config\.tokens_per_param = -20\.0"),
    ({**GENERATED, "aspect_ratio": 0.0}, r"config\.aspect_ratio = 0\.0"),
    ({"head_dim": 0}, r"config\.head_dim = 0"),
    ({"ffn_ratio": 0.0}, r"config\.ffn_ratio = 0\.0"),
    ({"batch_exponent": -0.5}, r"config\.batch_exponent = -0\.5 is not allowed: must lie in \[0, 1\]"),
    ({"batch_exponent": 2.0}, r"config\.batch_exponent = 2\.0"),
    ({"batch_ref_params": 0.0}, r"config\.batch_ref_params = 0\.0"),
    ({"cooldown_frac": 0.0}, r"config\.cooldown_frac = 0\.0 is not allowed: must lie in \(0, 1\)"),
    ({"cooldown_frac": 1.0}, r"config\.cooldown_frac = 1\.0"),
    ({"analysis.n": "embedding"}, r"config\.analysis\.n = 'embedding'"),
    ({"analysis.bootstrap": -1}, r"config\.analysis\.bootstrap = -1"),
    ({"seeds": 0}, r"config\.seeds = 0 is not allowed: must be an integer >= 1: runs per planned point"),
    ({"seeds": -1}, r"config\.seeds = -1 is not allowed"),
    ({"seeds_budgets": -1}, r"config\.seeds_budgets = -1 is not allowed: must be an integer >= 0: how many"),
    ({"mode": "grid", "shapes": (), "seeds_budgets": 1},
     r"config\.seeds_budgets = 1 is not allowed: must be 0 in grid mode"),
    ({"name": ""}, r"config\.name = ''"),
    ({"sweep_dir": ""}, r"config\.sweep_dir = ''"),
    # the base training config, through lm.config.validate, named as the sweep names it
    ({"train.data.batch_size": 0}, r"config\.train\.data\.batch_size = 0"),
    ({"train.data.seq_len": 0}, r"config\.train\.data\.seq_len = 0"),
    ({"train.optim.b1": 1.5}, r"config\.train\.optim\.b1 = 1\.5"),
    ({"train.train.microbatches": 3}, r"config\.train\.train\.microbatches = 3"),
    ({"train.mesh.shape": (0, 1, 1)}, r"config\.train\.mesh\.shape = \(0, 1, 1\)"),
    # ... and each planned run's: the batch rule gives the small models 2 sequences, not divisible by 16
    ({"batch_exponent": 0.5, "train.train.microbatches": 16},
     r"run C3e11-N1\.1e4 as planned: config\.train\.train\.microbatches = 16 is not allowed: must divide "
     r"data\.batch_size = 2"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[str(o) for o, _ in BAD])
def test_bad_sweep_fields_are_one_error_naming_the_field(overrides, message):
    refuses(tiny.get_config("untuned"), overrides, message)


def refuses(c, overrides: dict, message: str) -> None:
    """Planning `c` with the dotted `overrides` set stops with one ConfigError matching `message`."""
    for k, v in overrides.items():
        _set(c, k, v)
    with pytest.raises(ConfigError, match=message):
        plan(c)


def test_a_sweep_config_without_a_field_says_which():
    c = tiny.get_config("untuned")
    del c["workers"]
    with pytest.raises(ConfigError, match=r"config\.workers is missing"):
        plan(c)


def test_a_budget_too_small_for_generated_sizes_says_so_and_what_it_needs():
    c = tiny.get_config("untuned")
    c.shapes, c.budgets = (), (1e6, 1e12)
    with pytest.raises(ConfigError, match=r"budget 1e6 is too small for generated sizes") as e:
        plan(c)
    assert "duplicate" not in str(e.value)
    need = float(str(e.value).split("at least ")[1].split(" FLOPs")[0])
    c.budgets = (need * 1.01, 1e12)
    try:  # from the budget it names the sizes are not too small (each may still lack steps for 1 %) ...
        plan(c)
    except ConfigError as later:
        assert "too small for generated sizes" not in str(later)
    c.budgets = (need * 30, 1e12)  # ... and with enough steps for the 1 % budget tolerance, it plans
    assert len(plan(c)) == 2 * c.sizes_per_budget
    c.budgets, c.size_span = (1e12,), 1.05  # sizes too close together: still the span's fault
    with pytest.raises(ConfigError, match=r"budget 1e12 has duplicate model sizes .* widen config\.size_"):
        plan(c)


def test_runs_that_repeat_their_data_are_warned_and_refused_past_max_epochs():
    """Epochs are a run's tokens over the train split's: one warning per run above 1, and a
    ConfigError naming every run above max_epochs."""
    from experiments.plan import repeats

    runs = plan(tiny.get_config("untuned"))
    *_, third, second, first = sorted(runs, key=lambda r: r.tokens)
    split = third.tokens  # the two longest runs make more than one pass
    lines = repeats(runs, split, 4.0, "stdlib")
    assert lines == [f"warning: {r.name} repeats its data: {r.tokens / split:.2f} epochs of stdlib's "
                     f"{split:,} train tokens" for r in runs if r in (first, second)]
    limit = (second.tokens + first.tokens) / 2 / split  # only the longest run is past it
    with pytest.raises(ConfigError, match=rf"^1 run\(s\) would make more than max_epochs = "
                                          rf"{limit:g} passes over stdlib's {split:,} train tokens: "
                                          rf"{first.name} \({first.tokens / split:.1f}\)"):
        repeats(runs, split, limit, "stdlib")
    assert repeats(runs, first.tokens, 4.0, "stdlib") == []


def test_seeds_plan_replicates_with_their_own_seeds_and_trunks():
    """Replicate 0 is the run a sweep without seeds plans (name and config), so a sweep resumes when
    seeds are added; replicate k is `<name>-s<k>` with the init and data seeds moved by k, and in grid
    mode every replicate has its own trunks."""
    base = tiny.get_config("untuned")
    base.train.seed, base.train.data.seed = 5, 7
    three = base.copy_and_resolve_references()
    three.seeds = 3
    one, runs = plan(base, "sweep"), plan(three, "sweep")
    assert runs[::3] == one
    assert [r.name for r in runs] == [r.name + s for r in one for s in ("", "-s1", "-s2")]
    seeds = [(r.seed, r.config.seed, r.config.data.seed) for r in runs[:3]]
    assert seeds == [(0, 5, 7), (1, 6, 8), (2, 7, 9)]
    assert runs[2].workdir == "sweep/runs/" + runs[2].name and runs[2].steps == runs[0].steps
    cheap = three.copy_and_resolve_references()
    cheap.seeds_budgets = 2  # replicates at the two smallest budgets only
    some = plan(cheap, "sweep")
    assert [r.name for r in some] == [r.name for r in runs if r.budget < 3e12 or r.seed == 0]
    grid = tiny_grid.get_config()
    grid.seeds = 2
    twice = plan(grid)
    trunks = {r.name: r for r in twice if r.after is None}
    assert len(trunks) == 2 * sum(r.after is None for r in plan(tiny_grid.get_config()))
    for r in twice:
        if r.after:
            assert trunks[r.after].seed == r.seed and r.config.train.init_from == trunks[r.after].workdir


def test_wsd_replicates_at_the_smallest_budget_train_the_schedule_of_their_seed_0_run():
    """In wsd mode with seeds_budgets, a replicate has no longer run of its seed to branch from, so
    it is its own trunk, and trains seed 0's schedule there: same steps, warmup and cooldown."""
    c = tiny.get_config("untuned")
    c.mode, c.seeds, c.seeds_budgets = "wsd", 2, 1
    runs = {r.name: r for r in plan(c, "sweep")}
    replicates = [r for r in runs.values() if r.seed == 1]
    assert sorted(r.name for r in replicates) == sorted(
        r.name + "-s1" for r in runs.values() if r.seed == 0 and r.budget == min(c.budgets))
    for r in replicates:
        zero = runs[r.name.removesuffix("-s1")]
        assert r.after is None and r.config.train.init_from == "" and r.config.train.save_steps == ()
        assert (r.steps, r.config.seed) == (zero.steps, zero.config.seed + 1)
        for o in (r.config.optim, zero.config.optim):
            assert (o.schedule, o.cooldown_frac) == ("wsd", c.cooldown_frac)
        assert r.config.optim.warmup_steps == zero.config.optim.warmup_steps
    assert sum(runs[r.name.removesuffix("-s1")].after is not None for r in replicates) == 4  # branches


def test_training_order_starts_one_run_of_each_program_before_repeats():
    """Costliest first, trunks before branches, and within one cost every shape once before any
    twice: the tuning grid's LRs and a point's replicates do not start together (two workers
    compiling one program) but after it is in the cache."""
    from experiments.plan import trained_flops, training_order

    def shapes(runs):
        return [(r.shape, round(r.budget)) for r in runs]

    tuning = training_order(tuning_plan(tiny.get_config()))
    assert len(tuning) == 15 and len(set(shapes(tuning[:5]))) == 5
    assert shapes(tuning[:5]) == shapes(tuning[5:10]) == shapes(tuning[10:])
    c = tiny.get_config("untuned")
    c.seeds, c.seeds_budgets = 2, 1
    sweep = training_order(plan(c))
    assert [r.budget for r in sweep] == sorted((r.budget for r in sweep), reverse=True)
    at_3e11 = [r.seed for r in sweep if r.budget == 3e11]
    assert at_3e11 == [0] * 5 + [1] * 5
    wsd = tiny.get_config("untuned")
    wsd.mode = "wsd"
    ordered = training_order(plan(wsd))
    first_branch = next(i for i, r in enumerate(ordered) if r.after is not None)
    assert all(r.after is None for r in ordered[:first_branch])
    assert all(r.after is not None for r in ordered[first_branch:])
    assert [trained_flops(r) for r in ordered[:first_branch]] == sorted(
        (trained_flops(r) for r in ordered[:first_branch]), reverse=True)
