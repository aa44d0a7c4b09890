"""Validation of a run's ConfigDict: every bad value is rejected before anything compiles."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import ml_collections

ACTIVATIONS = ("gelu", "swiglu")
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots")
ATTENTION = ("auto", "kernel", "blockwise", "xla", "cudnn")
SCHEDULES = ("cosine", "wsd", "constant")
COOLDOWN_SHAPES = ("linear", "1-sqrt")
LR_RULES = ("constant", "inverse_width")


class ConfigError(ValueError):
    """A config value is not allowed; the message names the field, the value and what is allowed."""


def fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config.{field} = {value!r} is not allowed: {allowed}")


def _positive(section: ml_collections.ConfigDict, prefix: str, names: Iterable[str]) -> None:
    for name in names:
        value = section[name]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            fail(f"{prefix}.{name}", value, "must be a positive integer")


def _choice(section: ml_collections.ConfigDict, prefix: str, name: str, allowed: tuple) -> None:
    if section[name] not in allowed:
        fail(f"{prefix}.{name}", section[name], f"must be one of {', '.join(allowed)}")


def head_dim(m: ml_collections.ConfigDict) -> int:
    """Per-head width: explicit `head_dim`, else d_model // n_heads."""
    return m.head_dim if m.head_dim > 0 else m.d_model // m.n_heads


def validate_model(m: ml_collections.ConfigDict) -> None:
    _positive(m, "model", ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"))
    if m.head_dim < 0:
        fail("model.head_dim", m.head_dim, "must be 0 (= d_model // n_heads) or positive")
    if m.head_dim == 0 and m.d_model % m.n_heads:
        fail("model.d_model", m.d_model,
             f"must be divisible by model.n_heads = {m.n_heads} (or set model.head_dim)")
    if head_dim(m) % 2:
        fail("model.head_dim", head_dim(m), "must be even (rotary embeddings rotate pairs)")
    _choice(m, "model", "activation", ACTIVATIONS)
    _choice(m, "model", "dtype", DTYPES)
    _choice(m, "model", "remat", REMAT)
    _choice(m, "model", "attention", ATTENTION)
    if m.attention == "kernel" and m.dtype != "float32":
        fail("model.attention", m.attention, "the CPU kernel is float32 only: use model.dtype="
             "'float32' or model.attention='auto' or 'blockwise'")
    if not isinstance(m.unroll_layers, bool):
        fail("model.unroll_layers", m.unroll_layers, "must be True or False")
    for name in ("rope_theta", "norm_eps", "init_std"):
        if not m[name] > 0:
            fail(f"model.{name}", m[name], "must be > 0")


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
    _choice(o, "optim", "schedule", SCHEDULES)
    _choice(o, "optim", "cooldown_shape", COOLDOWN_SHAPES)
    _choice(o, "optim", "lr_rule", LR_RULES)
    for name in ("peak_lr", "max_lr", "eps"):
        if not o[name] > 0:
            fail(f"optim.{name}", o[name], "must be > 0")
    for name in ("warmup_frac", "final_frac", "cooldown_frac", "b1", "b2"):
        if not 0 <= o[name] <= 1:
            fail(f"optim.{name}", o[name], "must lie in [0, 1]")
    if o.warmup_frac + (o.cooldown_frac if o.schedule == "wsd" else 0) > 1:
        fail("optim.warmup_frac", o.warmup_frac, "warmup plus cooldown must not exceed the run")
    for name in ("weight_decay", "clip_norm", "z_loss"):
        if o[name] < 0:
            fail(f"optim.{name}", o[name], "must be >= 0 (0 disables it)")
    _positive(o, "optim", ("base_width",))
    if o.warmup_steps < 0:
        fail("optim.warmup_steps", o.warmup_steps, "must be >= 0 (0: use optim.warmup_frac)")


def validate_train(config: ml_collections.ConfigDict) -> None:
    t = config.train
    if t.steps < 0 or t.tokens < 0 or (t.steps == 0 and t.tokens <= 0):
        fail("train.tokens", t.tokens, "must be > 0 (or set train.steps > 0)")
    _positive(t, "train", ("microbatches", "log_every", "eval_every", "checkpoint_every",
                           "keep_checkpoints"))
    if t.init_mode not in ("params", "state"):
        fail("train.init_mode", t.init_mode, "must be 'params' (fine-tune) or 'state' (branch)")
    if any(not isinstance(s, int) or s <= 0 for s in t.save_steps):
        fail("train.save_steps", t.save_steps, "must be positive step numbers")
    if config.data.batch_size % t.microbatches:
        fail("train.microbatches", t.microbatches,
             f"must divide data.batch_size = {config.data.batch_size}")


def validate(config: ml_collections.ConfigDict, n_devices: int | None = None) -> None:
    """Check a whole run config; raises ConfigError (or the data module's error) on the first bad value."""
    import jax

    from lm import data

    validate_model(config.model)
    validate_optim(config.optim)
    validate_train(config)
    n_devices = n_devices or jax.device_count()
    mesh_shape(config.mesh.shape, n_devices)
    data.validate_data_config(config, n_devices)
