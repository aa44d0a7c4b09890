"""Planning an IsoFLOP sweep: a pure function from a sweep config to its named runs, each with the
step count that meets its FLOP budget (and, in `wsd` mode, its trunk); see docs/experiments.md."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import ml_collections

from lm.config import ConfigError
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
    after: str | None = None  # wsd mode: the trunk run this one branches from
    branch_step: int = 0  # ... at this step (the steps before it are shared, not retrained)

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
    """Model configs of budget i: the explicit shapes, or sizes generated around the optimum."""
    base = sweep.train.model
    if sweep.shapes:
        return [model_for_shape(base, d, n_layers, head_dim=sweep.head_dim, ffn_ratio=sweep.ffn_ratio)
                for d, n_layers in parse_shapes(sweep.shapes[i], f"shapes[{i}]")]
    centre = math.sqrt(budget / (6 * sweep.tokens_per_param))
    k = sweep.sizes_per_budget
    targets = [centre * sweep.size_span ** (j / (k - 1) - 0.5) for j in range(k)] if k > 1 else [
        centre]
    return [shape_for_params(target, aspect_ratio=sweep.aspect_ratio, head_dim=sweep.head_dim,
                             ffn_ratio=sweep.ffn_ratio, base=base) for target in targets]


def _batch_size(sweep, n_params: int, data_parallel: int) -> int:
    base = sweep.train.data.batch_size
    if sweep.batch_exponent == 0:
        return base
    scaled = base * (n_params / sweep.batch_ref_params) ** sweep.batch_exponent
    return max(data_parallel, 2 ** round(math.log2(max(scaled, 1))))


def validate_sweep(sweep: ml_collections.ConfigDict) -> None:
    if not sweep.budgets:
        raise ConfigError("config.budgets = () is not allowed: list at least one FLOP budget")
    if any(not b > 0 for b in sweep.budgets):
        raise ConfigError(f"config.budgets = {tuple(sweep.budgets)} is not allowed: budgets "
                          "must be positive FLOP counts")
    if len(set(sweep.budgets)) != len(sweep.budgets):
        raise ConfigError(f"config.budgets = {tuple(sweep.budgets)} has duplicates")
    if sweep.shapes and len(sweep.shapes) != len(sweep.budgets):
        raise ConfigError(f"config.shapes has {len(sweep.shapes)} entries for "
                          f"{len(sweep.budgets)} budgets: give one shape list per budget")
    if not sweep.shapes and (sweep.sizes_per_budget < 1 or not sweep.size_span >= 1):
        raise ConfigError(f"config.sizes_per_budget = {sweep.sizes_per_budget}, config.size_span"
                          f" = {sweep.size_span}: need at least 1 size and a span >= 1")
    if sweep.flops not in ("exact", "6nd"):
        raise ConfigError(f"config.flops = {sweep.flops!r} is not allowed: 'exact' or '6nd'")
    if sweep.mode not in ("cosine", "wsd"):
        raise ConfigError(f"config.mode = {sweep.mode!r} is not allowed: 'cosine' (independent "
                          "runs) or 'wsd' (cooldown branches from one trunk per size)")


def plan(sweep: ml_collections.ConfigDict, sweep_dir: str | Path = "",
         data_parallel: int = 1) -> list[Run]:
    """All runs of the sweep, budgets in order, smallest model first within a budget."""
    validate_sweep(sweep)
    runs: list[Run] = []
    for i, budget in enumerate(sweep.budgets):
        models = budget_models(sweep, i, budget)
        sizes = [(m.d_model, m.n_layers) for m in models]
        if len(set(sizes)) != len(sizes):
            dup = sorted({s for s in sizes if sizes.count(s) > 1})
            raise ConfigError(f"budget {sci(budget)} has duplicate model sizes {dup}: widen "
                              "config.size_span or give fewer sizes")
        for m in models:
            pc = count_params(m)
            c = ml_collections.ConfigDict(sweep.train.to_dict())
            c.mesh.shape = tuple(c.mesh.shape)
            c.model = m
            c.data.batch_size = _batch_size(sweep, pc.total, data_parallel)
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
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"two runs share a name: {sorted({n for n in names if names.count(n) > 1})}")
    return wsd_branches(runs, sweep) if sweep.mode == "wsd" else runs


def wsd_branches(runs: list[Run], sweep: ml_collections.ConfigDict) -> list[Run]:
    """Turn the runs of each model size into one WSD trunk and cooldown branches from it."""
    by_size: dict[tuple, list[Run]] = {}
    for r in runs:
        m = r.config.model
        by_size.setdefault((m.d_model, m.n_layers, r.config.data.batch_size), []).append(r)
    out = {}
    for group in by_size.values():
        trunk = max(group, key=lambda r: r.steps)
        warmup = max(1, round(sweep.train.optim.warmup_frac * trunk.steps))
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
                    f"wsd mode: {r.name} would branch at step {start}, inside the trunk's warmup "
                    f"({warmup} steps of {trunk.name}); use budgets further apart or a shorter "
                    "warmup")
            c.train.init_from, c.train.init_step, c.train.init_mode = trunk.workdir, start, "state"
            branch_steps.append(start)
            out[r.name] = replace(r, after=trunk.name, branch_step=start)
        trunk.config.train.save_steps = tuple(sorted(set(branch_steps)))
        out[trunk.name] = trunk
    return [out[r.name] for r in runs]


def trained_flops(r: Run) -> float:
    """FLOPs a run costs to train: a branch does not retrain the trunk it starts from."""
    return r.flops * (1 - r.branch_step / r.steps)


def format_plan(runs: list[Run], seconds_per_flop: float | None = None) -> str:
    """The plan as a table; the time column uses a measured throughput when given."""
    head = (f"{'run':<18} {'budget':>8} {'N':>10} {'N non-emb':>10} {'shape':>7} {'tokens':>11} "
            f"{'steps':>6} {'FLOPs':>9} {'6ND':>9} {'D/N':>6} {'est. time':>9}  branch")
    lines = [head, "-" * len(head)]
    for r in runs:
        est = "" if seconds_per_flop is None else f"{trained_flops(r) * seconds_per_flop:8.0f}s"
        branch = f"  of {r.after} at step {r.branch_step}" if r.after else ""
        lines.append(
            f"{r.name:<18} {r.budget:8.1e} {r.n_params:10,d} {r.n_params_non_embedding:10,d} "
            f"{r.shape:>7} {r.tokens:11,d} {r.steps:6d} {r.flops:9.3e} {r.flops_6nd:9.3e} "
            f"{r.tokens / r.n_params:6.1f} {est:>9}{branch}")
    total, cost = sum(r.flops for r in runs), sum(trained_flops(r) for r in runs)
    lines.append(f"{len(runs)} runs, {total:.3e} FLOPs of results for {cost:.3e} FLOPs of training"
                 + (f" ({1 - cost / total:.0%} saved by WSD branches)" if cost < total else "")
                 + ("" if seconds_per_flop is None else
                    f", about {cost * seconds_per_flop / 60:.1f} min at the estimated throughput"))
    return "\n".join(lines)
