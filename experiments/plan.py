"""Planning an IsoFLOP sweep: a pure function from a sweep config to its named runs, each with the
step count that meets its FLOP budget (and, in `wsd` and `grid` modes, its trunk); see
docs/experiments.md."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ml_collections

from lm.config import ConfigError, fail, validate
from lm.files import run_dir
from lm.sizing import count_params, flops_per_token, flops_per_token_6n, model_for_shape, shape_for_params


@dataclass(frozen=True)
class Run:
    name: str
    budget: float
    config: ml_collections.ConfigDict
    steps: int
    n_params: int
    n_params_non_embedding: int
    tokens: int
    flops: float  # exact Appendix-F training FLOPs
    flops_6nd: float
    workdir: str = ""
    after: str | None = None  # wsd and grid modes: the trunk run this one branches from
    branch_step: int = 0  # ... at this step (the steps before it are shared, not retrained)
    seed: int = 0  # replicate: 0 the planned run, k its copy with init and data seeds moved by k

    @property
    def shape(self) -> str:
        m = self.config.model
        return f"{m.d_model}x{m.n_layers}"


def sci(x: float) -> str:
    """Compact scientific notation for names: 1e12, 3.2e5."""
    mantissa, exp = f"{x:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


def parse_shapes(spec: str, field: str) -> list[tuple[int, int]]:
    """'16x1,24x2' -> [(16, 1), (24, 2)]."""
    shapes = []
    for item in spec.split(","):
        try:
            d, n_layers = (int(x) for x in item.strip().lower().split("x"))
        except ValueError:
            raise ConfigError(f"config.{field} = {spec!r} is not allowed: expected "
                              f"comma-separated d_modelxn_layers items like '32x2'") from None
        if d <= 0 or n_layers <= 0 or d % 2:
            raise ConfigError(f"config.{field}: shape {item!r} needs an even d_model > 0 and "
                              "n_layers > 0")
        shapes.append((d, n_layers))
    return shapes


def budget_models(sweep: ml_collections.ConfigDict, i: int, budget: float):
    """Model configs of budget i and their parameter targets: the explicit shapes (no targets), or
    sizes generated around the optimum."""
    base = sweep.train.model
    if sweep.shapes:
        return [model_for_shape(base, d, n_layers, head_dim=sweep.head_dim, ffn_ratio=sweep.ffn_ratio)
                for d, n_layers in parse_shapes(sweep.shapes[i], f"shapes[{i}]")], []
    centre = math.sqrt(budget / (6 * sweep.tokens_per_param))
    k = sweep.sizes_per_budget
    targets = [centre * sweep.size_span ** (j / (k - 1) - 0.5) for j in range(k)] if k > 1 else [
        centre]
    return [shape_for_params(target, aspect_ratio=sweep.aspect_ratio, head_dim=sweep.head_dim,
                             ffn_ratio=sweep.ffn_ratio, base=base) for target in targets], targets


def _batch_size(sweep, n_params: int, data_parallel: int) -> int:
    base = sweep.train.data.batch_size
    if sweep.batch_exponent == 0:
        return base
    return power_of_two(base * (n_params / sweep.batch_ref_params) ** sweep.batch_exponent, data_parallel)


def power_of_two(batch: float, data_parallel: int) -> int:
    """A batch rule's size as the nearest power of two, at least one row per data-parallel shard."""
    return max(data_parallel, 2 ** round(math.log2(max(batch, 1))))


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _real(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


MODES = ("cosine", "wsd", "grid")
FLOPS = ("exact", "6nd")
RUNNERS = ("local", "subprocess", "slurm")
# Every sweep field but budgets, shapes and train (checked together below) and slurm (by launch):
# what it must be, and the words that say so.
FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda v: isinstance(v, str) and v != "", "must be a non-empty string"),
    "sweep_dir": (lambda v: isinstance(v, str) and v != "", "must name a directory (--sweep_dir's default)"),
    "head_dim": (lambda v: _integer(v) and v > 0, "must be a positive integer (the width heads aim at)"),
    "ffn_ratio": (lambda v: _real(v) and v > 0, "must be > 0 (d_ff / d_model)"),
    "sizes_per_budget": (lambda v: _integer(v) and v > 0, "must be a positive integer"),
    "seeds": (lambda v: _integer(v) and v >= 1, "must be an integer >= 1: runs per planned point, each "
              "with its own initialisation and data order (1: no replicates)"),
    "seeds_budgets": (lambda v: _integer(v) and v >= 0, "must be an integer >= 0: how many of the smallest "
                      "budgets get config.seeds replicates (0: every budget)"),
    "size_span": (lambda v: _real(v) and v > 1, "must be > 1 (largest / smallest generated size)"),
    "tokens_per_param": (lambda v: _real(v) and v > 0, "must be > 0 (where generated sizes centre)"),
    "aspect_ratio": (lambda v: _real(v) and v > 0, "must be > 0 (d_model / n_layers of generated sizes)"),
    "batch_exponent": (lambda v: _real(v) and 0 <= v <= 1,
                       "must lie in [0, 1] (0: every run takes train.data.batch_size)"),
    "batch_ref_params": (lambda v: _real(v) and v > 0, "must be > 0 (the size that gets the base batch)"),
    "mode": (lambda v: v in MODES, "must be 'cosine' (independent runs), 'wsd' (cooldown branches "
             "from one trunk per size) or 'grid' (sizes x budgets, a trunk per size)"),
    "cooldown_frac": (lambda v: _real(v) and 0 < v < 1, "must lie in (0, 1): the fraction of each wsd "
                      "or grid run spent cooling down"),
    "flops": (lambda v: v in FLOPS, "must be 'exact' (Appendix F) or '6nd'"),
    "runner": (lambda v: v in RUNNERS, f"must be one of {', '.join(RUNNERS)}"),
    "workers": (lambda v: _integer(v) and v > 0, "must be a positive integer (parallel runs of the "
                "subprocess runner)"),
    "max_epochs": (lambda v: _real(v) and v >= 1, "must be >= 1: the most passes over the train split "
                   "a run may make"),
    "data_tokens": (lambda v: _integer(v) and v >= 0, "must be an integer >= 0: the train split's tokens "
                    "where its cache is not prepared here (0: read its manifest)"),
    "analysis.n": (lambda v: v in ("total", "non_embedding"), "must be 'total' or 'non_embedding'"),
    "analysis.bootstrap": (lambda v: _integer(v) and v >= 0, "must be an integer >= 0 (0: no intervals)"),
    "grid.shapes": (lambda v: isinstance(v, str), "must be a string of d_modelxn_layers sizes like "
                    "'16x1,24x2' ('': a generated ladder)"),
    "grid.spacing": (lambda v: _real(v) and v > 1, "must be > 1 (the largest ratio between neighbouring "
                     "budgets, so between a size's neighbouring token counts)"),
    "tune.n_budgets": (lambda v: _integer(v) and v > 0, "must be a positive integer: how many of the "
                       "sweep's smallest budgets the tuning stage trains at"),
    "tune.lr_factors": (lambda v: isinstance(v, tuple | list) and all(_real(x) and x > 0 for x in v)
                        and len(v) >= 3 and len(set(v)) == len(v),
                        "must be at least 3 distinct multipliers > 0 of the tune.lr_rule LR (a parabola "
                        "needs 3 points), e.g. (0.25, 0.5, 1, 2, 4)"),
    "tune.batch_sizes": (lambda v: isinstance(v, tuple | list) and all(_integer(x) and x > 0 for x in v)
                         and (not v or len(v) >= 3) and len(set(v)) == len(v),
                         "must be () (the sweep's batch rule) or at least 3 distinct batch sizes > 0"),
    "tune.lr_rule": (lambda v: v in ("constant", "inverse_width"), "must be 'constant' or "
                     "'inverse_width': the rule whose LR tune.lr_factors multiply"),
    "validate_factor": (lambda v: _real(v) and v > 1, "must be > 1 (--validate trains the predicted "
                        "optimum of this × the largest budget, beyond the sweep)"),
}


def _field(sweep: ml_collections.ConfigDict, name: str) -> Any:
    """sweep.<name> (dotted); a config without it says which field it lacks."""
    value = sweep
    for key in name.split("."):
        if not isinstance(value, ml_collections.ConfigDict) or key not in value:
            raise ConfigError(f"config.{name} is missing: start the sweep config from "
                              "configs/isoflop/tiny.py, which sets every field")
        value = value[key]
    return value


def _devices(shape: Any) -> int:
    """The fewest devices a mesh shape fits (its fixed axes): the count a run's config is checked on here,
    before the runner knows how many it gets."""
    fixed = [s for s in shape if _integer(s) and s > 0] if isinstance(shape, tuple | list) else []
    return math.prod(fixed) or 1


def validate_config(config: ml_collections.ConfigDict, where: str) -> None:
    """A run's config through lm.config.validate, its fields named as the sweep names them."""
    try:
        validate(config, _devices(config.mesh.shape))
    except ConfigError as e:
        text = str(e)
        raise ConfigError(where + ("config.train." + text.removeprefix("config.")
                                   if text.startswith("config.") else text)) from None


def validate_sweep(sweep: ml_collections.ConfigDict) -> None:
    """Every sweep field against what it means (the slurm section is launch's), before planning."""
    for name, (ok, allowed) in FIELDS.items():
        value = _field(sweep, name)
        if not ok(value):
            fail(name, value, allowed)
    budgets, shapes = _field(sweep, "budgets"), _field(sweep, "shapes")
    if not isinstance(budgets, tuple | list) or not budgets:
        fail("budgets", budgets, "list at least one FLOP budget, e.g. (1e12, 3e12)")
    if any(not (_real(b) and b > 0) for b in budgets):
        fail("budgets", tuple(budgets), "budgets must be positive FLOP counts")
    if len(set(budgets)) != len(budgets):
        fail("budgets", tuple(budgets), "has duplicates: every budget once")
    if not isinstance(shapes, tuple | list) or any(not isinstance(s, str) for s in shapes):
        fail("shapes", shapes, "must be a tuple of strings like '16x1,24x2' (empty: generated sizes)")
    if shapes and len(shapes) != len(budgets):
        fail("shapes", tuple(shapes), f"has {len(shapes)} entries for {len(budgets)} budgets: give one "
             "shape list per budget")
    if shapes and sweep.mode == "grid":
        fail("shapes", tuple(shapes), "must be () in grid mode: the grid's sizes are config.grid.shapes, "
             "and each budget's line holds those in its window")
    for i, spec in enumerate(shapes):
        parse_shapes(spec, f"shapes[{i}]")
    if sweep.seeds_budgets and sweep.mode == "grid":
        fail("seeds_budgets", sweep.seeds_budgets, "must be 0 in grid mode: every trunk serves every "
             "budget's line, so its replicates do too")
    validate_config(_field(sweep, "train"), "")


def _too_small(sweep: ml_collections.ConfigDict, budget: float, targets: list[float]) -> str:
    """Why generated sizes collapsed when the smallest target is below the smallest model the shape rules
    build ('' when it is not: then the sizes are only too close together)."""
    smallest = shape_for_params(1, aspect_ratio=sweep.aspect_ratio, head_dim=sweep.head_dim,
                                ffn_ratio=sweep.ffn_ratio, base=sweep.train.model)
    n_min = count_params(smallest).total
    if targets[0] >= n_min:
        return ""
    need = 6 * sweep.tokens_per_param * (n_min * math.sqrt(sweep.size_span)) ** 2
    return (f"budget {sci(budget)} is too small for generated sizes: the smallest would have "
            f"{targets[0]:.3g} params, but the smallest model the shape rules build "
            f"({smallest.d_model}x{smallest.n_layers}) has {n_min:,}; sizes that start there need a budget "
            f"of at least {need:.3g} FLOPs (tokens_per_param = {sweep.tokens_per_param:g}, size_span = "
            f"{sweep.size_span:g}), or give explicit config.shapes")


def grid_budgets(budgets: list[float] | tuple[float, ...], spacing: float) -> list[float]:
    """The budgets in order, with geometric fill between neighbours so none is more than `spacing`
    times the one below (the given budgets stay, exactly)."""
    ordered = sorted(budgets)
    out = ordered[:1]
    for lo, hi in zip(ordered, ordered[1:], strict=False):
        k = math.ceil(math.log(hi / lo) / math.log(spacing) - 1e-9)  # sqrt(2)**2 may round past 2
        out += [lo * (hi / lo) ** (j / k) for j in range(1, k)] + [hi]
    return out


def window(sweep: ml_collections.ConfigDict, budget: float) -> tuple[float, float]:
    """The sizes that belong on a budget's line: a factor size_span around N = sqrt(C / (6 r)), the
    range generated sizes span."""
    centre = math.sqrt(budget / (6 * sweep.tokens_per_param))
    return centre / math.sqrt(sweep.size_span), centre * math.sqrt(sweep.size_span)


def grid_models(sweep: ml_collections.ConfigDict, budgets: list[float]) -> list[ml_collections.ConfigDict]:
    """The grid's sizes: config.grid.shapes, or a ladder of generated sizes with sizes_per_budget
    rungs per factor size_span, over the windows of all budgets."""
    base = sweep.train.model
    if sweep.grid.shapes:
        shapes = parse_shapes(sweep.grid.shapes, "grid.shapes")
        if len(set(shapes)) != len(shapes):
            fail("grid.shapes", sweep.grid.shapes, "lists a size twice: every size once")
        return [model_for_shape(base, d, n_layers, head_dim=sweep.head_dim, ffn_ratio=sweep.ffn_ratio)
                for d, n_layers in shapes]
    (lo, _), (_, hi) = window(sweep, min(budgets)), window(sweep, max(budgets))
    rung = math.log(sweep.size_span) / sweep.sizes_per_budget
    models: dict[tuple[int, int], ml_collections.ConfigDict] = {}
    for k in range(math.ceil(math.log(lo) / rung), math.floor(math.log(hi) / rung) + 1):
        m = shape_for_params(math.exp(k * rung), aspect_ratio=sweep.aspect_ratio, head_dim=sweep.head_dim,
                             ffn_ratio=sweep.ffn_ratio, base=base)
        if lo <= count_params(m).total <= hi:  # a shape a few % off its rung may miss every window
            models.setdefault((m.d_model, m.n_layers), m)  # small rungs may collapse onto one shape
    return list(models.values())


def grid_lines(sweep: ml_collections.ConfigDict) -> list[tuple[float, list, list]]:
    """Grid mode's IsoFLOP lines: every filled budget with the grid sizes in its window, smallest
    first; a size on no line, or a line with fewer than 3 sizes (no parabola), is an error."""
    budgets = grid_budgets(sweep.budgets, sweep.grid.spacing)
    models = sorted(grid_models(sweep, budgets), key=lambda m: count_params(m).total)
    lines = []
    for budget in budgets:
        lo, hi = window(sweep, budget)
        on = [m.copy_and_resolve_references() for m in models if lo <= count_params(m).total <= hi]
        if len(on) < 3:
            raise ConfigError(
                f"grid: budget {sci(budget)} has {len(on)} size(s) in its window [{lo:.3g}, {hi:.3g}] "
                "params, and approach 2 needs at least 3: add sizes to config.grid.shapes, or widen "
                "config.size_span (config.tokens_per_param moves the window)")
        lines.append((budget, on, []))
    used = {(m.d_model, m.n_layers) for _, on, _ in lines for m in on}
    unused = [f"{m.d_model}x{m.n_layers} ({count_params(m).total:,} params)" for m in models
              if (m.d_model, m.n_layers) not in used]
    if unused:
        raise ConfigError(f"grid: {', '.join(unused)} on no budget's line (windows from "
                          f"{window(sweep, budgets[0])[0]:.3g} to {window(sweep, budgets[-1])[1]:.3g} "
                          "params): drop them from config.grid.shapes or move the windows "
                          "(config.tokens_per_param, config.size_span)")
    return lines


def lines(sweep: ml_collections.ConfigDict) -> list[tuple[float, list, list]]:
    """Every IsoFLOP line of the sweep: (budget, its model configs, their targets when generated)."""
    if sweep.mode == "grid":
        return grid_lines(sweep)
    return [(budget, *budget_models(sweep, i, budget)) for i, budget in enumerate(sweep.budgets)]


def plan(sweep: ml_collections.ConfigDict, sweep_dir: str | Path = "",
         data_parallel: int = 1) -> list[Run]:
    """All runs of the sweep, budgets in order, smallest model first within a budget, each followed by
    its seed replicates."""
    validate_sweep(sweep)
    runs: list[Run] = []
    for budget, models, targets in lines(sweep):
        sizes = [(m.d_model, m.n_layers) for m in models]
        if len(set(sizes)) != len(sizes):
            dup = sorted({s for s in sizes if sizes.count(s) > 1})
            too_small = _too_small(sweep, budget, targets) if targets else ""
            raise ConfigError(too_small or f"budget {sci(budget)} has duplicate model sizes {dup}: widen "
                              "config.size_span or give fewer sizes")
        for m in models:
            pc = count_params(m)
            c = ml_collections.ConfigDict(sweep.train.to_dict())
            c.mesh.shape = tuple(c.mesh.shape)
            c.model = m
            c.data.batch_size = _batch_size(sweep, pc.total, data_parallel)
            if c.optim.lr_rule == "fitted":  # the tuning stage's laws (experiments/tune.py)
                from experiments.tune import fitted

                lr, c.data.batch_size = fitted(sweep, sweep_dir, pc.total, c.data.batch_size, data_parallel)
                c.optim.lr_rule, c.optim.peak_lr, c.optim.max_lr = "constant", lr, max(lr, c.optim.max_lr)
            seq = c.data.seq_len
            fpt = flops_per_token(m, seq) if sweep.flops == "exact" else flops_per_token_6n(m)
            per_step = c.data.batch_size * seq * fpt
            steps = round(budget / per_step)
            if steps < 1:
                raise ConfigError(
                    f"budget {sci(budget)} is too small for model {m.d_model}x{m.n_layers} "
                    f"({pc.total:,} params): one batch of {c.data.batch_size}×{seq} tokens "
                    f"already costs {per_step:.3g} FLOPs")
            if abs(steps * per_step / budget - 1) > 0.01:
                raise ConfigError(
                    f"budget {sci(budget)}: model {m.d_model}x{m.n_layers} gets {steps} steps, "
                    f"{steps * per_step:.3g} FLOPs, more than 1 % off the budget; use a smaller "
                    "batch or a larger budget")
            c.train.steps, c.train.tokens = steps, steps * c.data.batch_size * seq
            tokens = steps * c.data.batch_size * seq
            name = f"C{sci(budget)}-N{sci(pc.total)}"
            runs.append(Run(
                name=name, budget=budget, config=c, steps=steps,
                n_params=pc.total, n_params_non_embedding=pc.non_embedding, tokens=tokens,
                flops=tokens * flops_per_token(m, seq), flops_6nd=tokens * flops_per_token_6n(m),
                workdir=str(run_dir(sweep_dir, name))))
    runs = [rep for r in runs for rep in replicas(r, seeds_at(sweep, r.budget), sweep_dir)]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"two runs share a name: {sorted({n for n in names if names.count(n) > 1})}")
    runs = wsd_branches(runs, sweep) if sweep.mode in ("wsd", "grid") else runs
    for r in runs:
        validate_config(r.config, f"run {r.name} as planned: ")
    return runs


def seeds_at(sweep: ml_collections.ConfigDict, budget: float) -> int:
    """Runs per point on a budget's line: config.seeds at the seeds_budgets smallest budgets (all: 0),
    else 1, so replicates go where runs are cheapest."""
    if not sweep.seeds_budgets:
        return sweep.seeds
    return sweep.seeds if budget in sorted(sweep.budgets)[:sweep.seeds_budgets] else 1


def replicas(r: Run, seeds: int, sweep_dir: str | Path) -> list[Run]:
    """`r` and its seeds - 1 replicates: replicate k is `<name>-s<k>`, its initialisation and data-order
    seeds r's plus k (replicate 0 is `r` itself, so a sweep that adds seeds keeps the runs it has)."""
    out = [r]
    for k in range(1, seeds):
        c, name = r.config.copy_and_resolve_references(), f"{r.name}-s{k}"
        c.seed, c.data.seed = r.config.seed + k, r.config.data.seed + k
        out.append(replace(r, name=name, config=c, seed=k, workdir=str(run_dir(sweep_dir, name))))
    return out


def wsd_branches(runs: list[Run], sweep: ml_collections.ConfigDict) -> list[Run]:
    """Turn the runs of each model size (and replicate) into one WSD trunk and cooldown branches from
    it; all share the warmup of the shortest (warmup_frac of its steps), so no run warms up for longer
    than that."""
    by_size: dict[tuple, list[Run]] = {}
    for r in runs:
        m = r.config.model
        by_size.setdefault((m.d_model, m.n_layers, r.config.data.batch_size, r.seed), []).append(r)
    out = {}
    for group in by_size.values():
        trunk = max(group, key=lambda r: r.steps)
        warmup = max(1, round(sweep.train.optim.warmup_frac * min(r.steps for r in group)))
        branch_steps = []
        for r in group:
            c = r.config
            c.optim.schedule, c.optim.cooldown_frac = "wsd", sweep.cooldown_frac
            c.optim.warmup_steps = warmup
            if r is trunk:
                continue
            start = r.steps - round(sweep.cooldown_frac * r.steps)
            if start < warmup:
                raise ConfigError(
                    f"{sweep.mode} mode: {r.name} would branch at step {start}, inside the trunk's warmup "
                    f"({warmup} steps of {trunk.name}); use budgets further apart or a shorter "
                    "warmup")
            c.train.init_from, c.train.init_step, c.train.init_mode = trunk.workdir, start, "state"
            branch_steps.append(start)
            out[r.name] = replace(r, after=trunk.name, branch_step=start)
        trunk.config.train.save_steps = tuple(sorted(set(branch_steps)))
        out[trunk.name] = trunk
    return [out[r.name] for r in runs]


def repeats(runs: list[Run], train_tokens: int, max_epochs: float, dataset: str) -> list[str]:
    """One warning per run that would see its train split more than once; a ConfigError naming
    the runs past `max_epochs` (repeated data is worth less than fresh: Muennighoff et al. 2023)."""
    over = [(r.name, r.tokens / train_tokens) for r in runs if r.tokens > train_tokens]
    past = [f"{name} ({e:.1f})" for name, e in over if e > max_epochs]
    if past:
        raise ConfigError(
            f"{len(past)} run(s) would make more than max_epochs = {max_epochs:g} passes over "
            f"{dataset}'s {train_tokens:,} train tokens: {', '.join(past[:6])}"
            f"{' ...' if len(past) > 6 else ''}; use a larger dataset or smaller budgets, or raise "
            "config.max_epochs")
    return [f"warning: {name} repeats its data: {e:.2f} epochs of {dataset}'s {train_tokens:,} "
            "train tokens" for name, e in over]


def trained_flops(r: Run) -> float:
    """FLOPs a run costs to train: a branch does not retrain the trunk it starts from."""
    return r.flops * (1 - r.branch_step / r.steps)


def training_order(runs: list[Run]) -> list[Run]:
    """The order a runner starts runs in: trunks before their branches (a sequential runner never
    waits on itself), the costliest first (so parallel workers finish together, none trailing),
    and among runs of one cost (to 2 significant figures) one of each program (shape and batch)
    before a second of any, so that parallel workers compile different programs and the repeats
    load them."""
    ranked = sorted(runs, key=lambda r: (r.after is not None, -trained_flops(r)))
    rounds: dict[tuple, int] = {}
    keys = []
    for r in ranked:
        cost = float(f"{trained_flops(r):.1e}")
        program = (r.after is not None, cost, r.shape, r.config.data.batch_size)
        rounds[program] = rounds.get(program, 0) + 1
        keys.append((r.after is not None, -cost, rounds[program]))
    return [r for _, r in sorted(zip(keys, ranked, strict=True), key=lambda kr: kr[0])]


def format_plan(runs: list[Run], seconds_per_flop: float | None = None) -> str:
    """The plan as a table; the time column uses a measured throughput when given."""
    w = max([18, *(len(r.name) for r in runs)])
    head = (f"{'run':<{w}} {'budget':>8} {'N':>10} {'N non-emb':>10} {'shape':>7} {'tokens':>11} "
            f"{'steps':>6} {'FLOPs':>9} {'6ND':>9} {'D/N':>6} {'est. time':>9}  branch")
    lines = [head, "-" * len(head)]
    for r in runs:
        est = "" if seconds_per_flop is None else f"{trained_flops(r) * seconds_per_flop:8.0f}s"
        branch = f"  of {r.after} at step {r.branch_step}" if r.after else ""
        lines.append(
            f"{r.name:<{w}} {r.budget:8.1e} {r.n_params:10,d} {r.n_params_non_embedding:10,d} "
            f"{r.shape:>7} {r.tokens:11,d} {r.steps:6d} {r.flops:9.3e} {r.flops_6nd:9.3e} "
            f"{r.tokens / r.n_params:6.1f} {est:>9}{branch}")
    cost = sum(trained_flops(r) for r in runs)
    lines.append(flops_line(runs) + ("" if seconds_per_flop is None else
                                     f", about {cost * seconds_per_flop / 60:.1f} min at the estimated "
                                     "throughput"))
    return "\n".join(lines)


def flops_line(runs: list[Run]) -> str:
    """FLOPs of results, which is what the same (N, D) points cost as independent cosine runs, against
    FLOPs of training (a branch does not retrain its trunk)."""
    total, cost = sum(r.flops for r in runs), sum(trained_flops(r) for r in runs)
    if cost >= total:
        return f"{len(runs)} runs, {total:.3e} FLOPs of results for {cost:.3e} FLOPs of training"
    trunks = sum(r.after is None for r in runs)
    return (f"{len(runs)} runs ({trunks} trunks, {len(runs) - trunks} branches), {total:.3e} FLOPs of "
            f"results (their cost as independent cosine runs) for {cost:.3e} FLOPs of training: results / "
            f"training = {total / cost:.2f}, {1 - cost / total:.0%} saved by WSD branches")
