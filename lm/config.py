"""The run config: every field with its default (`defaults`), and its validation, which rejects
every bad value before anything compiles."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NoReturn

import ml_collections

ACTIVATIONS = ("gelu", "swiglu")
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots")
ATTENTION = ("auto", "xla", "cudnn", "blockwise")
KERNELS = ("auto", "xla")
BYTE_VOCAB_SIZE = 257  # the byte tokenizer: 256 byte values + EOS
SCHEDULES = ("cosine", "wsd", "constant")
COOLDOWN_SHAPES = ("linear", "1-sqrt")
LR_RULES = ("constant", "inverse_width", "fitted")  # "fitted": a sweep's, resolved by its planner


def model_defaults() -> ml_collections.ConfigDict:
    """Transformer shape and numerics, every field with its default."""
    m = ml_collections.ConfigDict()
    m.vocab_size = BYTE_VOCAB_SIZE
    m.d_model = 64
    m.n_layers = 2
    m.n_heads = 4
    m.head_dim = 0  # 0 -> d_model // n_heads
    m.d_ff = 256
    m.activation = "gelu"  # "gelu" or "swiglu"
    m.tied_embeddings = False
    m.rope_theta = 10_000.0
    m.norm_eps = 1e-6
    m.init_std = 0.02
    m.qk_norm = False  # RMSNorm of each head's query and key before the rotary embedding
    m.dtype = "float32"  # compute dtype: "float32" or "bfloat16"; parameters stay float32
    m.remat = "none"  # "none", "full" (recompute each block) or "dots" (save matmul outputs)
    m.attention = "auto"  # "auto" (JAX's choice: XLA today), "xla", "cudnn" (bf16, GPUs), "blockwise"
    # "auto": the CPU kernels of lm.kernels when the backend is CPU; "xla": plain JAX everywhere
    m.kernels = "auto"
    # Layers run in a lax.scan (compile time flat in depth); unrolling compiles each layer
    # separately and, since the CPU attention/GELU changes, is no faster (docs/benchmarks.md).
    m.unroll_layers = False
    return m


def defaults() -> ml_collections.ConfigDict:
    """A whole run config: every field the code reads, with its default (configs/ override them)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = model_defaults()

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "stdlib"  # embedded corpus; "folder" (text_dir) or any tfds name
    c.data.text_dir = ""
    c.data.data_dir = ""  # "" -> $LM_DATA_DIR, else $LM_CACHE_DIR/data (~/.cache/lm/data)
    c.data.text_key = "text"
    c.data.tokenizer = "bytes"  # or "sentencepiece"
    c.data.sp_vocab_size = 4096
    c.data.tokenizer_path = ""  # an existing SentencePiece .model (e.g. a run's tokenizer.model)
    c.data.seq_len = 128
    c.data.batch_size = 16  # global, all processes
    c.data.seed = 0
    c.data.eval_batches = 8
    c.data.prepare = False  # True: tokenize a partly prepared token cache here instead of refusing

    c.optim = ml_collections.ConfigDict()
    c.optim.peak_lr = 3e-3
    c.optim.lr_rule = "constant"  # "constant" or "inverse_width": lr = peak_lr * base_width / d_model
    #   (an IsoFLOP sweep may say "fitted": its planner gives each run the tuning stage's LR)
    c.optim.base_width = 128
    c.optim.max_lr = 2e-2  # cap applied after the width rule
    c.optim.schedule = "cosine"  # "cosine", "wsd" or "constant"
    c.optim.warmup_frac = 0.05
    c.optim.warmup_steps = 0  # > 0 overrides warmup_frac (WSD branches share the trunk's warmup)
    c.optim.final_frac = 0.1  # cosine ends at final_frac * peak
    c.optim.cooldown_frac = 0.2  # wsd: fraction of steps spent cooling down to 0
    c.optim.cooldown_shape = "linear"  # wsd: "linear" or "1-sqrt"
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.decay_embeddings = False
    c.optim.clip_norm = 1.0
    c.optim.z_loss = 0.0  # coefficient of log(Z)^2 added to the loss

    c.train = ml_collections.ConfigDict()
    c.train.tokens = 1_000_000  # training horizon; steps = tokens // (batch_size * seq_len)
    c.train.steps = 0  # > 0 overrides tokens
    c.train.microbatches = 1  # gradient accumulation
    c.train.log_every = 25
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2
    c.train.save_steps = ()  # extra checkpoints kept for good (e.g. WSD branch points)
    c.train.init_from = ""  # start from this run directory's checkpoint ...
    c.train.init_step = -1  # ... at this step (-1: its latest) ...
    c.train.init_mode = "params"  # ... taking its "params" (fine-tune) or its whole "state"
    #   (params, optimizer state and step: a branch that continues that run, e.g. a WSD cooldown)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = the rest of the devices
    return c


class ConfigError(ValueError):
    """A config value is not allowed; the message names the field, the value and what is allowed."""


def fail(field: str, value: Any, allowed: str) -> NoReturn:
    raise ConfigError(f"config.{field} = {value!r} is not allowed: {allowed}")


def positive(section: ml_collections.ConfigDict, prefix: str, names: Iterable[str]) -> None:
    for name in names:
        value = section[name]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            fail(f"{prefix}.{name}", value, "must be a positive integer")


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def finite(section: ml_collections.ConfigDict, prefix: str, names: Iterable[str],
           zero: bool = False) -> None:
    """Each field a finite number > 0 (>= 0 with `zero`, where 0 disables what it controls)."""
    for name in names:
        value = section[name]
        if not (_real(value) and (value >= 0 if zero else value > 0)):
            fail(f"{prefix}.{name}", value,
                 "must be a finite number >= 0 (0 disables it)" if zero else "must be a finite number > 0")


def fraction(section: ml_collections.ConfigDict, prefix: str, names: Iterable[str],
             below_one: bool = False) -> None:
    """Each field in [0, 1] ([0, 1) with `below_one`)."""
    for name in names:
        value = section[name]
        if not (_real(value) and 0 <= value and (value < 1 if below_one else value <= 1)):
            fail(f"{prefix}.{name}", value, f"must lie in [0, 1{')' if below_one else ']'}")


def boolean(section: ml_collections.ConfigDict, prefix: str, names: Iterable[str]) -> None:
    for name in names:
        if not isinstance(section[name], bool):
            fail(f"{prefix}.{name}", section[name], "must be True or False")


def choice(section: ml_collections.ConfigDict, prefix: str, name: str, allowed: tuple) -> None:
    if section[name] not in allowed:
        fail(f"{prefix}.{name}", section[name], f"must be one of {', '.join(allowed)}")


def num_steps(config: ml_collections.ConfigDict) -> int:
    """Optimizer steps of the run: train.steps, else train.tokens / (batch · seq_len)."""
    if config.train.steps > 0:
        return config.train.steps
    per_step = config.data.batch_size * config.data.seq_len
    if config.train.tokens < per_step:
        fail("train.tokens", config.train.tokens, "must cover at least one batch of data.batch_size × "
             f"data.seq_len = {per_step} tokens (or set train.steps > 0)")
    return config.train.tokens // per_step


def head_dim(m: ml_collections.ConfigDict) -> int:
    """Per-head width: explicit `head_dim`, else d_model // n_heads."""
    return m.head_dim if m.head_dim > 0 else m.d_model // m.n_heads


def validate_model(m: ml_collections.ConfigDict) -> None:
    positive(m, "model", ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"))
    if m.head_dim < 0:
        fail("model.head_dim", m.head_dim, "must be 0 (= d_model // n_heads) or positive")
    if m.head_dim == 0 and m.d_model % m.n_heads:
        fail("model.d_model", m.d_model,
             f"must be divisible by model.n_heads = {m.n_heads} (or set model.head_dim)")
    if head_dim(m) % 2:
        fail("model.head_dim", head_dim(m), "must be even (rotary embeddings rotate pairs)")
    choice(m, "model", "activation", ACTIVATIONS)
    choice(m, "model", "dtype", DTYPES)
    choice(m, "model", "remat", REMAT)
    choice(m, "model", "attention", ATTENTION)
    choice(m, "model", "kernels", KERNELS)
    if m.attention == "cudnn" and (m.dtype != "bfloat16" or head_dim(m) % 8 or head_dim(m) > 128):
        fail("model.attention", m.attention, "cuDNN flash attention needs model.dtype='bfloat16' "
             f"and a head_dim that is a multiple of 8 up to 128 (it is {head_dim(m)})")
    boolean(m, "model", ("tied_embeddings", "unroll_layers", "qk_norm"))
    finite(m, "model", ("rope_theta", "norm_eps", "init_std"))
def mesh_shape(shape: Iterable[int], n_devices: int) -> tuple[int, int, int]:
    """Resolve a (data, fsdp, tensor) shape with at most one -1 against the device count."""
    shape = tuple(shape)
    if len(shape) != 3 or any(not isinstance(s, int) or s == 0 or s < -1 for s in shape):
        fail("mesh.shape", shape, "must be 3 integers (data, fsdp, tensor), each positive or -1")
    if shape.count(-1) > 1:
        fail("mesh.shape", shape, "at most one axis may be -1 (the rest of the devices)")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            fail("mesh.shape", shape, f"the fixed axes ({known}) must divide the {n_devices} devices")
        shape = tuple(n_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != n_devices:
        fail("mesh.shape", shape,
             f"its product must equal the number of devices ({n_devices}); use -1 for one axis")
    return shape  # type: ignore[return-value]


def validate_optim(o: ml_collections.ConfigDict) -> None:
    choice(o, "optim", "schedule", SCHEDULES)
    choice(o, "optim", "cooldown_shape", COOLDOWN_SHAPES)
    choice(o, "optim", "lr_rule", LR_RULES)
    finite(o, "optim", ("peak_lr", "max_lr", "eps"))
    if o.lr_rule == "constant" and o.peak_lr > o.max_lr:
        fail("optim.peak_lr", o.peak_lr, f"exceeds optim.max_lr = {o.max_lr}, the cap on the learning "
             "rate (raise optim.max_lr too)")
    fraction(o, "optim", ("warmup_frac", "final_frac", "cooldown_frac"))
    fraction(o, "optim", ("b1", "b2"), below_one=True)  # b2 = 1 never updates its second moment
    finite(o, "optim", ("weight_decay", "clip_norm", "z_loss"), zero=True)
    boolean(o, "optim", ("decay_embeddings",))
    positive(o, "optim", ("base_width",))
    if not isinstance(o.warmup_steps, int) or o.warmup_steps < 0:
        fail("optim.warmup_steps", o.warmup_steps, "must be >= 0 (0: use optim.warmup_frac)")


def validate_schedule(config: ml_collections.ConfigDict) -> None:
    """The warmup (and a WSD cooldown) fit in the run, so the learning rate reaches its peak."""
    o, steps = config.optim, num_steps(config)
    warmup = o.warmup_steps or round(o.warmup_frac * steps)
    name, value = ("optim.warmup_steps", o.warmup_steps) if o.warmup_steps else (
        "optim.warmup_frac", o.warmup_frac)
    if warmup and warmup >= steps:
        fail(name, value, f"gives {warmup} warmup steps: must be fewer than the run's {steps} steps, "
             "or the learning rate never reaches its peak")
    cooldown = round(o.cooldown_frac * steps) if o.schedule == "wsd" else 0
    if warmup + cooldown > steps:
        fail(name, value, f"gives {warmup} warmup steps, which with the {cooldown} of "
             f"optim.cooldown_frac = {o.cooldown_frac} exceed the run's {steps} steps")


def validate_train(config: ml_collections.ConfigDict) -> None:
    t = config.train
    if t.steps < 0:
        fail("train.steps", t.steps, "must be >= 0 (0: train for train.tokens)")
    if t.steps == 0 and t.tokens <= 0:
        fail("train.tokens", t.tokens, "must be > 0 (or set train.steps > 0)")
    positive(t, "train", ("microbatches", "log_every", "eval_every", "checkpoint_every",
                           "keep_checkpoints"))
    if config.data.batch_size % t.microbatches:
        fail("train.microbatches", t.microbatches,
             f"must divide data.batch_size = {config.data.batch_size}")
    steps = num_steps(config)
    if any(not isinstance(s, int) or isinstance(s, bool) or not 0 < s <= steps for s in t.save_steps):
        fail("train.save_steps", t.save_steps, f"must be step numbers from 1 to the run's {steps} steps")
    choice(t, "train", "init_mode", ("params", "state"))
    if not isinstance(t.init_step, int) or t.init_step < -1:
        fail("train.init_step", t.init_step, "must be a step number >= 0, or -1 (the latest checkpoint)")
    if t.init_step != -1 and not t.init_from:
        fail("train.init_step", t.init_step, "is only read with train.init_from (the run to start from)")


def validate(config: ml_collections.ConfigDict, n_devices: int | None = None) -> None:
    """Check a whole run config; raises ConfigError on the first bad value."""
    import jax

    from lm import data

    if not isinstance(config.seed, int) or isinstance(config.seed, bool) or not 0 <= config.seed < 2**63:
        fail("seed", config.seed, "must be an integer from 0 to 2**63 - 1 (it seeds the initialisation)")
    validate_model(config.model)
    validate_optim(config.optim)
    n_devices = n_devices or jax.device_count()
    mesh_shape(config.mesh.shape, n_devices)
    data.validate_data_config(config, n_devices)  # first: the train checks divide by batch sizes
    validate_train(config)
    validate_schedule(config)
