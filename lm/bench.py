"""Benchmarks, one entry point: `python -m lm.bench [--what=step|data|fit] ...`.

step (default): train-step throughput and MFU, `--shape d,L,H,T,B` (repeatable). Times the
compiled, sharded train step (the one `lm.train` runs) on random tokens after warm-up:
median of N device-synchronised steps. Prints one `key=value` line per shape.
`page_faults` (median per timed step) tells a clean CPU measurement (0) from one where the
heap was still growing and the kernel was faulting memory in.

step --lower_only --platform=cuda|tpu --mesh d,f,t: the same train step, with the same
shardings on an abstract mesh of that size, lowered for that platform with `jax.export` on
this host (no device of the target needed), with plain-JAX kernels (`model.kernels="xla"`):
whether it lowers, its custom calls, which inputs are split and the bytes each device holds.
The exported module is annotated, not partitioned: collectives appear only when XLA's SPMD
partitioner compiles it on the target.

data: input-pipeline throughput; builds (or reuses) the dataset and its token cache, then
times `train_batch` alone (tokens_per_s counts the seq_len input tokens of each row). With
`--workers=1,2` it also times tokenizing the train split into a scratch cache with that many
worker processes (tokens/s in all and per worker, and the scaling from the first count to the last).

fit: approach-3 fit speed, the vectorised JAX fit beside a scipy L-BFGS-B loop with the exact
gradient over every start of the same grid, on a synthetic table shaped like Chinchilla's (240
points of its law, 1 % noise); `--scipy_starts=K` times K random starts and extrapolates.
"""

from __future__ import annotations

import functools
import json
import math
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import AbstractMesh, AxisType

from lm import sharding
from lm.config import ATTENTION, ConfigError, validate
from lm.config import defaults as get_config
from lm.metrics import device_peak_flops, utilization
from lm.process import setup
from lm.sizing import count_params, flops_per_token, flops_per_token_palm

DEFAULT_SHAPES = ("128,4,4,256,16", "256,6,8,256,16", "512,8,8,512,8")
PLATFORMS = ("cuda", "tpu")
WHAT = ("step", "data", "fit")


def shape_config(base: ml_collections.ConfigDict, shape: str) -> ml_collections.ConfigDict:
    """`d,L,H,T,B` -> a copy of base with that model width, depth, heads, context and batch."""
    try:
        d, n_layers, heads, seq_len, batch = (int(x) for x in shape.split(","))
    except ValueError:
        raise ConfigError(f"--shape={shape!r}: expected five integers d,L,H,T,B") from None
    c = ml_collections.ConfigDict(base.to_dict())
    c.mesh.shape = tuple(c.mesh.shape)
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff = d, n_layers, heads, 4 * d
    c.data.seq_len, c.data.batch_size = seq_len, batch
    c.train.steps = 1000
    return c


def _shape(config: ml_collections.ConfigDict) -> str:
    m = config.model
    return f"{m.d_model},{m.n_layers},{m.n_heads},{config.data.seq_len},{config.data.batch_size}"


def benchmark(config: ml_collections.ConfigDict, steps: int = 10, warmup: int = 5,
              ) -> dict[str, Any]:
    """Median step time of the compiled train step for `config` on all local devices."""
    from lm.train import Trainer

    validate(config)
    mesh = sharding.make_mesh(config.mesh.shape)
    trainer = Trainer(config, mesh)
    state = trainer.init_state()
    rng = np.random.default_rng(0)
    batch = jax.device_put(
        rng.integers(0, config.model.vocab_size,
                     (config.data.batch_size, config.data.seq_len + 1)).astype(np.int32),
        trainer.batch_sharding)
    times, faults = [], []
    for i in range(warmup + steps):
        f, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
    m, seq = config.model, config.data.seq_len
    step_s = statistics.median(times)
    tokens = config.data.batch_size * seq
    fpt, fpt_palm = flops_per_token(m, seq), flops_per_token_palm(m, seq)
    achieved, achieved_palm = tokens * fpt / step_s, tokens * fpt_palm / step_s
    mfu, mfu_palm = (utilization(r, jax.device_count()) for r in (achieved, achieved_palm))
    return {
        "shape": _shape(config),
        "n_params": count_params(m).total, "dtype": m.dtype, "devices": jax.device_count(),
        "device": jax.devices()[0].device_kind, "tokens_per_sec": tokens / step_s,
        "step_ms": 1e3 * step_s, "flops_per_token": fpt, "flops_per_token_palm": fpt_palm,
        "achieved_flops": achieved, "peak_flops": device_peak_flops() * jax.device_count(),
        "mfu": mfu, "mfu_palm": mfu_palm,
        "compile_s": trainer.compile_seconds, "page_faults": int(statistics.median(faults)),
    }


# --- lowering for a target platform, without its devices -------------------------------------

def abstract_mesh(shape: Iterable[int]) -> AbstractMesh:
    """A (data, fsdp, tensor) mesh of that many devices that need not exist (Auto axes, as
    `sharding.make_mesh`)."""
    return AbstractMesh(tuple(shape), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def shards(s: jax.sharding.NamedSharding) -> int:
    """Pieces a NamedSharding splits its array into (1: replicated)."""
    axes = [a for dim in s.spec if dim is not None for a in ((dim,) if isinstance(dim, str) else dim)]
    return math.prod(s.mesh.shape[a] for a in axes)


def bytes_per_device(abstract, shardings) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs under matching shardings."""
    return sum(x.size * x.dtype.itemsize // shards(s)
               for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True))


def custom_calls(module_text: str) -> list[str]:
    """Target names of the custom calls in a StableHLO module's text (pretty or generic form)."""
    return sorted(set(re.findall(r"stablehlo\.custom_call @([\w$.\-]+)", module_text))
                  | set(re.findall(r'call_target_name = "([^"]+)"', module_text)))


def abstract_trainer(config: ml_collections.ConfigDict):
    """The Trainer of `config` on an abstract mesh of config.mesh.shape (resolved, no -1),
    uncompiled, with `model.kernels="xla"`: the accelerator program, never the CPU kernels."""
    from lm.train import Trainer

    config = ml_collections.ConfigDict(config.to_dict())
    config.model.kernels = "xla"
    return Trainer(config, abstract_mesh(config.mesh.shape), compile=False)


def export_train_step(trainer, platform: str) -> jax.export.Exported:
    """`jax.export` of the trainer's train step (its shardings, donation) for `platform`."""
    with jax.sharding.use_abstract_mesh(trainer.mesh):
        return jax.export.export(trainer.jit_train_step, platforms=[platform])(
            *trainer.abstract_args)


def _lowered_custom_calls(trainer, platform: str) -> list[str] | None:
    """Custom calls of the step lowered without export's checks (what made an export fail)."""
    try:
        with jax.sharding.use_abstract_mesh(trainer.mesh):
            return custom_calls(trainer.jit_train_step.trace(*trainer.abstract_args).lower(
                    lowering_platforms=(platform,)).as_text())
    except Exception:  # noqa: BLE001 - then the error itself is all there is to report
        return None


def lower(config: ml_collections.ConfigDict, platform: str) -> dict[str, Any]:
    """Lower `config`'s train step for `platform` on an abstract mesh of `config.mesh.shape`
    (positive sizes), as `key=value` fields; a failure, validation included, is reported in
    `lowered` and `error` instead of raised."""
    m, mesh_shape = config.model, tuple(config.mesh.shape)
    r: dict[str, Any] = {"shape": _shape(config), "platform": platform,
                         "mesh": ",".join(map(str, mesh_shape)), "devices": math.prod(mesh_shape),
                         "dtype": m.dtype, "n_params": count_params(m).total}
    t = time.perf_counter()
    trainer = None
    try:
        validate(config, n_devices=r["devices"])
        trainer = abstract_trainer(config)
        r.update(param_bytes_per_device=bytes_per_device(trainer.abstract_state["params"],
                                                         trainer.state_shardings["params"]),
                 state_bytes_per_device=bytes_per_device(trainer.abstract_state,
                                                         trainer.state_shardings))
        exported = export_train_step(trainer, platform)
    except Exception as e:  # noqa: BLE001 - the report names any failure of the lowering
        message = str(e).strip().splitlines()
        calls = _lowered_custom_calls(trainer, platform) if trainer is not None else None
        r.update(lowered="error", custom_calls="?" if calls is None else ",".join(calls) or "none",
                 lower_s=time.perf_counter() - t,
                 error=f"{type(e).__name__}: {message[0] if message else ''}")
        return r
    leaves = exported.in_shardings_jax(trainer.mesh)  # the module's input annotations
    sizes = {k: r.pop(k) for k in ("param_bytes_per_device", "state_bytes_per_device")}
    r.update(lowered="ok", custom_calls=",".join(custom_calls(exported.mlir_module())) or "none",
             inputs=len(leaves), sharded_arrays=sum(s is not None and shards(s) > 1 for s in leaves),
             **sizes, lower_s=time.perf_counter() - t)
    return r


def program_key(config: ml_collections.ConfigDict) -> str:
    """What decides the lowered train step's structure: runs that share it lower once.
    (The schedule's step counts and learning rates are inputs of it.)"""
    o = config.optim
    return json.dumps({"model": config.model.to_dict(), "seq_len": config.data.seq_len,
                       "batch_size": config.data.batch_size,
                       "microbatches": config.train.microbatches, "mesh": list(config.mesh.shape),
                       "schedule": o.schedule, "clip": o.clip_norm > 0}, sort_keys=True)


def preflight(runs: list[tuple[str, ml_collections.ConfigDict]], platform: str, n_devices: int,
              out: Callable[[str], None] = print) -> list[str]:
    """Lower every run's train step for `platform` on `n_devices` abstract devices (each mesh's
    -1 resolved against them), once per distinct program; prints one line per program and a
    summary, and returns the failures (one line each)."""
    from lm.config import ConfigError, mesh_shape

    groups: dict[str, tuple[ml_collections.ConfigDict, list[str]]] = {}
    failures = []
    for name, config in runs:
        c = ml_collections.ConfigDict(config.to_dict())
        try:
            c.mesh.shape = mesh_shape(c.mesh.shape, n_devices)
        except ConfigError as e:
            failures.append(f"{name}: {e}")
            out(f"runs={name} lowered=error error={e}")
            continue
        groups.setdefault(program_key(c), (c, []))[1].append(name)
    ok = 0
    for c, names in groups.values():
        r = lower(c, platform)
        out(format_line({"runs": ",".join(names), **r}))
        if r["lowered"] == "ok":
            ok += 1
        else:
            failures.append(f"{','.join(names)} (shape {r['shape']}, mesh {r['mesh']}): {r['error']}")
    out(f"preflight: {ok} shapes ok, {len(failures)} failed"
        + "".join(f"\n  failed: {f}" for f in failures))
    return failures


# --- input pipeline and fit speed -------------------------------------------------------------

def data_benchmark(data_overrides: dict[str, Any], steps: int, workers: tuple[int, ...] = (),
                   ) -> dict[str, Any]:
    """Seconds to build the dataset, then the time per `train_batch` over `steps` batches; with
    `workers`, also the speed of tokenizing the train split with each of those worker counts."""
    from lm import data as data_lib

    config = get_config()
    config.data.update(data_overrides)
    config.model.vocab_size = data_lib.expected_vocab_size(config.data)
    data_lib.validate_data_config(config)
    start = time.perf_counter()
    ds = data_lib.build_dataset(config)
    build_s = time.perf_counter() - start
    ds.train_batch(0)  # first call builds grain's batch dataset
    start = time.perf_counter()
    for step in range(steps):
        ds.train_batch(step)
    elapsed = time.perf_counter() - start
    d = config.data
    r = {"dataset": ds.info["dataset"], "tokenizer": ds.tokenizer.name, "seq_len": d.seq_len,
         "batch_size": d.batch_size, "steps": steps, "build_s": round(build_s, 3),
         "batch_us": round(elapsed / steps * 1e6, 1),
         "tokens_per_s": round(steps * d.batch_size * d.seq_len / elapsed)}
    return {**r, **prepare_benchmark(d, workers)} if workers else r


PREPARE_SHARDS_PER_WORKER = 4  # shards per worker when timing preparation


def prepare_benchmark(data_cfg: ml_collections.ConfigDict, workers: tuple[int, ...]) -> dict[str, Any]:
    """Tokens/s tokenizing the train split into a scratch cache with each count of worker
    processes: in all (first shard's start to last one's end: process start-up left out) and per
    worker (over its own seconds, and its CPU seconds: what a worker does with a core to itself);
    `scaling` is the last count's speed over the first's; `load_avg` tells a busy host."""
    import os
    import tempfile
    from pathlib import Path

    from lm.data import get_tokenizer, shards
    from lm.data.sources import TRAIN, open_corpus

    corpus, tokenizer = open_corpus(data_cfg), get_tokenizer(data_cfg)
    documents = len(corpus.source(TRAIN))
    per_shard = max(math.ceil(documents / (PREPARE_SHARDS_PER_WORKER * max(workers))), 1)
    r: dict[str, Any] = {"prepare_shards": -(-documents // per_shard)}
    corpus.cache_dir.mkdir(parents=True, exist_ok=True)
    for n in workers:
        with tempfile.TemporaryDirectory(dir=corpus.cache_dir) as scratch:
            p = shards.prepare(data_cfg, corpus, TRAIN, tokenizer, directory=Path(scratch), workers=n,
                               shard_documents=per_shard, out=lambda line: None)
        r[f"prepare_tokens_per_s_{n}"] = round(p.tokens / p.wall_s)
        r[f"worker_tokens_per_s_{n}"] = round(p.tokens / p.busy_s)
        r[f"worker_tokens_per_cpu_s_{n}"] = round(p.tokens / p.cpu_s)
    if len(workers) > 1:
        first, last = (r[f"prepare_tokens_per_s_{n}"] for n in (workers[0], workers[-1]))
        r["scaling"] = round(last / first, 2)
    return {**r, "load_avg": round(os.getloadavg()[0], 2)}


def worker_counts(value: str | None) -> tuple[int, ...]:
    """`--workers=1,2` -> (1, 2); ConfigError unless every count is a positive integer."""
    try:
        counts = tuple(int(x) for x in value.split(",")) if value else ()
    except ValueError:
        counts = (0,)
    if any(n < 1 for n in counts):
        raise ConfigError(f"--workers={value!r} is not allowed: must be worker counts, e.g. 1,2")
    return counts


CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
# The shape of Chinchilla's approach-3 table (Epoch AI's extraction, 240 points): budgets and N, D ranges.
FIT_BUDGETS, FIT_N, FIT_D = (6e18, 1e22), (7e7, 1.6e10), (5e9, 5e11)


def fit_table(points: int = 240, budgets: int = 8, noise: float = 0.01, seed: int = 0):
    """Points of Chinchilla's law in IsoFLOP profiles shaped like its table: `budgets` budgets log-spaced
    over FIT_BUDGETS, sizes log-uniform where N and D stay in FIT_N and FIT_D, log-normal noise."""
    import pandas as pd

    from lm.analysis import approach3

    rng = np.random.default_rng(seed)
    C = np.repeat(np.geomspace(*FIT_BUDGETS, budgets),
                  np.diff(np.linspace(0, points, budgets + 1).round().astype(int)))
    lo = np.log(np.maximum(FIT_N[0], C / (6 * FIT_D[1])))
    hi = np.log(np.minimum(FIT_N[1], C / (6 * FIT_D[0])))
    N = np.exp(rng.uniform(lo, hi))
    loss = approach3.law(CHINCHILLA, N, C / (6 * N)) * np.exp(rng.normal(0, noise, points))
    return pd.DataFrame({"N": N, "D": C / (6 * N), "loss": loss})


def _scipy_objective(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray):
    """Approach 3's objective and its exact gradient for scipy (`jac=True`): the fit's own, in numpy."""
    from lm.analysis import approach3

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = approach3.value_and_grad(theta[None], log_n, log_d, log_l, 1.0, xp=np)
        return float(value[0]), grad[0]

    return f


def fit_benchmark(points: int = 240, scipy_starts: int | None = None, bootstrap: int = 1000,
                  repeats: int = 5) -> dict[str, Any]:
    """The approach-3 fit of `fit_table(points)` (wall seconds: first call with compilation, then the
    median of `repeats`), with `bootstrap` resamples, beside scipy's L-BFGS-B with the exact gradient
    from every start of the same grid (or `scipy_starts` random ones, extrapolated). The scipy loop runs
    in `repeats` blocks with a JAX fit after each, so a change of the machine's load hits both alike."""
    from scipy.optimize import minimize

    from lm import analysis
    from lm.analysis import approach3

    table = fit_table(points)
    df = analysis.from_table(table)
    t = time.perf_counter()
    analysis.fit_approach3(df)
    first = time.perf_counter() - t
    grid = approach3.default_grid()
    n = len(grid) if scipy_starts is None else min(scipy_starts, len(grid))
    subset = grid[np.sort(np.random.default_rng(0).permutation(len(grid))[:n])]
    f = _scipy_objective(*(np.log(table[c].to_numpy(np.float64)) for c in ("N", "D", "loss")))
    runs, scipy_s, times = [], 0.0, []
    for block in np.array_split(subset, repeats):
        t = time.perf_counter()
        runs += [minimize(f, x0, jac=True, method="L-BFGS-B") for x0 in block]
        scipy_s += time.perf_counter() - t
        t = time.perf_counter()
        fit = analysis.fit_approach3(df)
        times.append(time.perf_counter() - t)
    r: dict[str, Any] = {"points": points, "starts": fit["starts"], "jax_s": statistics.median(times),
                         "jax_first_s": first, "objective": fit["objective"],
                         "alpha": fit["alpha"], "beta": fit["beta"]}
    if runs:
        value = approach3.admissible(np.array([x.x for x in runs]), np.array([x.fun for x in runs]))
        best = approach3.unpack(runs[int(np.argmin(value))].x)
        full = scipy_s * len(grid) / n
        r.update(scipy_starts=n, scipy_s=scipy_s, scipy_all_s=full, scipy_objective=float(value.min()),
                 scipy_alpha=float(best["alpha"]), scipy_beta=float(best["beta"]), speedup=full / r["jax_s"])
    if bootstrap:
        t = time.perf_counter()
        boot = analysis.fit_approach3(df, bootstrap=bootstrap)
        r.update(bootstrap=bootstrap, bootstrap_s=time.perf_counter() - t,
                 a_lo=boot["ci"]["a"][0], a_hi=boot["ci"]["a"][1])
    return r


def format_line(r: dict[str, Any]) -> str:
    """`key=value` pairs; an `error` (last) keeps its spaces."""
    def fmt(k, v):
        if k == "error":
            return str(v)
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace(" ", "_")

    return " ".join(f"{k}={fmt(k, v)}" for k, v in r.items())


# Which options each mode reads ("lower" is step --lower_only); any other is a usage error.
OPTION_MODES = {
    "shape": {"step", "lower"}, "dtype": {"step", "lower"}, "remat": {"step", "lower"},
    "attention": {"step", "lower"}, "unroll_layers": {"step", "lower"}, "mesh": {"step", "lower"},
    "steps": {"step", "data"}, "warmup": {"step"}, "platform": {"lower"},
    "dataset": {"data"}, "text_dir": {"data"}, "data_dir": {"data"}, "tokenizer": {"data"},
    "sp_vocab_size": {"data"}, "seq_len": {"data"}, "batch_size": {"data"}, "seed": {"data"},
    "workers": {"data"},
    "points": {"fit"}, "scipy_starts": {"fit"}, "bootstrap": {"fit"},
}
DESCRIBE = {"step": "--what=step", "lower": "--lower_only", "data": "--what=data", "fit": "--what=fit"}


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """The flags of `python -m lm.bench`, on `fv` (tests parse their own)."""
    s, i, b = (functools.partial(define, flag_values=fv)
               for define in (flags.DEFINE_string, flags.DEFINE_integer, flags.DEFINE_bool))
    s("what", "step", "step: train-step throughput (default); data: input pipeline; "
      "fit: approach-3 fit speed")
    s("json", None, "also write the results to this file")
    flags.DEFINE_multi_string("shape", None, "--what=step: d,L,H,T,B (repeatable)", flag_values=fv)
    i("steps", None, "--what=step: timed steps (10); data: batches (200)")
    i("warmup", None, "--what=step: untimed steps first (5; on CPU the heap grows over the first few)")
    s("dtype", None, "--what=step: float32 or bfloat16")
    s("remat", None, "--what=step: none, full or dots")
    s("attention", None, f"--what=step: {', '.join(ATTENTION)}")
    b("unroll_layers", False, "--what=step: unroll the layer scan")
    s("mesh", None, "--what=step: data,fsdp,tensor (default: all data; --lower_only: 1,1,1)")
    b("lower_only", False, "lower for --platform with jax.export on an abstract mesh of --mesh; no "
      "device, nothing runs")
    s("platform", None, f"--lower_only: the target, {' or '.join(PLATFORMS)}")
    s("dataset", None, "--what=data: stdlib (default), folder or a tfds name")
    s("text_dir", None, "--what=data: the folder of dataset=folder")
    s("data_dir", None, "--what=data: where datasets and token caches live")
    s("tokenizer", None, "--what=data: bytes (default) or sentencepiece")
    i("sp_vocab_size", None, "--what=data: SentencePiece vocabulary")
    i("seq_len", None, "--what=data: (128)")
    i("batch_size", None, "--what=data: (16)")
    i("seed", None, "--what=data: order of the windows")
    s("workers", None, "--what=data: also time tokenizing the train split with these counts of worker "
      "processes, e.g. 1,2")
    i("points", None, "--what=fit: synthetic (N, D, loss) points (240)")
    i("scipy_starts", None, "--what=fit: starts the scipy loop runs (all 4,500; fewer: extrapolated; "
      "0 skips it)")
    i("bootstrap", None, "--what=fit: resamples (1000; 0 skips them)")


def mode_of(f: flags.FlagValues) -> str:
    """step, lower, data or fit: what the flags ask for; ConfigError naming a flag that does not
    belong to it or a value that means nothing."""
    if f.what not in WHAT:
        raise ConfigError(f"--what={f.what!r} is not allowed: must be one of {', '.join(WHAT)}")
    if f.lower_only and f.what != "step":
        raise ConfigError(f"--lower_only lowers the train step; it does not apply to --what={f.what}")
    if f.lower_only and f.platform not in PLATFORMS:
        raise ConfigError(f"--lower_only needs --platform, one of {', '.join(PLATFORMS)}"
                          + (f" (not {f.platform!r})" if f.platform else ""))
    mode = "lower" if f.lower_only else f.what
    for name, modes in OPTION_MODES.items():
        if f[name].present and mode not in modes:
            raise ConfigError(f"--{name} does not apply to {DESCRIBE[mode]}; it is read by "
                              + " and ".join(DESCRIBE[m] for m in sorted(modes)))
    for name in ("steps", "points", "sp_vocab_size", "seq_len", "batch_size"):
        if f[name].value is not None and f[name].value < 1:
            raise ConfigError(f"--{name}={f[name].value} is not allowed: must be a positive integer")
    for name in ("warmup", "scipy_starts", "bootstrap"):
        if f[name].value is not None and f[name].value < 0:
            raise ConfigError(f"--{name}={f[name].value} is not allowed: must be >= 0")
    return mode


def _parse_mesh(value: str | None, lower_only: bool) -> tuple[int, ...] | None:
    if value is None:
        return (1, 1, 1) if lower_only else None
    try:
        shape = tuple(int(x) for x in value.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or any(s == 0 or s < -1 for s in shape) or (
            lower_only and min(shape) < 1):
        raise ConfigError(f"--mesh={value!r}: expected data,fsdp,tensor, three "
                          + ("positive integers (the abstract mesh's size)" if lower_only
                             else "integers, each positive or -1 (the remaining devices)"))
    return shape


def run(f: flags.FlagValues) -> list[dict[str, Any]]:
    """The benchmark the parsed flags `f` ask for, one printed line per result; every flag is
    checked first (ConfigError)."""
    mode = mode_of(f)
    setup()  # before anything starts the backend (validation counts devices)
    configs = _step_configs(f) if mode in ("step", "lower") else []  # all checked before compiling
    if mode == "data":
        overrides = {k: f[k].value for k in OPTION_MODES if "data" in OPTION_MODES[k]
                     and k not in ("steps", "workers") and f[k].value is not None}
        results = [data_benchmark(overrides, f.steps or 200, worker_counts(f.workers))]
        print(format_line(results[0]), flush=True)
    elif mode == "fit":
        results = [fit_benchmark(f.points or 240, f.scipy_starts,
                                 1000 if f.bootstrap is None else f.bootstrap)]
        print(format_line(results[0]), flush=True)
    else:
        results = []
        for config in configs:
            r = lower(config, f.platform) if f.lower_only else benchmark(
                config, f.steps or 10, 5 if f.warmup is None else f.warmup)
            print(format_line(r), flush=True)
            results.append(r)
    if f.json:
        from lm.files import write_json_atomic

        write_json_atomic(f.json, results)
    return results


def _step_configs(f: flags.FlagValues) -> list[ml_collections.ConfigDict]:
    """The config of each --shape, validated (for --mesh's devices with --lower_only)."""
    base = get_config()
    for name in ("dtype", "remat", "attention"):
        if f[name].value:
            base.model[name] = f[name].value
    base.model.unroll_layers = f.unroll_layers
    mesh = _parse_mesh(f.mesh, f.lower_only)
    if mesh is not None:
        base.mesh.shape = mesh
    configs = [shape_config(base, shape) for shape in f.shape or DEFAULT_SHAPES]
    for c in configs:
        validate(c, n_devices=math.prod(mesh) if f.lower_only else None)
    return configs


def main(argv: list[str] | None = None) -> None:
    """`python -m lm.bench ARGV` (default: this process's arguments); once per process, as absl."""
    from lm import cli

    define_flags()

    def body() -> None:
        if any(r.get("lowered", "ok") != "ok" for r in run(flags.FLAGS)):
            sys.exit(1)

    cli.run(body, ["lm.bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
