"""Config validation: every field checked against what it means, before anything compiles."""

import os
import re
import subprocess
import sys

import pytest

from configs.train import get_config
from lm.config import (
    ConfigError,
    mesh_shape,
    validate,
    validate_model,
    validate_optim,
    validate_train,
)
from lm.files import config_from_json


@pytest.mark.parametrize("field, value, message", [
    ("d_model", 90, r"model.d_model = 90 .*divisible by model.n_heads = 4"),
    ("d_model", 100, r"model.head_dim = 25 .*even"),
    ("d_model", 0, r"model.d_model = 0 .*positive integer"),
    ("n_layers", -2, r"model.n_layers = -2 .*positive integer"),
    ("d_ff", -1, r"model.d_ff = -1 .*positive integer"),
    ("activation", "relu", r"model.activation = 'relu' .*gelu, swiglu"),
    ("dtype", "float16", r"model.dtype = 'float16' .*float32, bfloat16"),
    ("remat", "some", r"model.remat = 'some' .*none, full, dots"),
    ("head_dim", 7, r"model.head_dim = 7 .*even"),
    ("attention", "flash", r"model.attention = 'flash' .*auto, xla, cudnn, blockwise"),
    ("attention", "cudnn", r"model.attention = 'cudnn' .*bfloat16.*multiple of 8 up to 128 \(it is 16\)"),
    ("kernels", "cuda", r"model.kernels = 'cuda' .*auto, xla"),
])
def test_bad_model_values(field, value, message):
    config = get_config()
    config.model[field] = value
    with pytest.raises(ConfigError, match=message):
        validate_model(config.model)


def test_default_config_is_valid():
    config = get_config()
    validate_model(config.model)
    validate_optim(config.optim)
    validate_train(config)
    validate(config, n_devices=1)


def overridden(changes: dict):
    """The default config with `changes` ({"section.field": value}), as read back from JSON
    (config.json, plan.json), where a value may have any type."""
    raw = get_config().to_dict()
    for key, value in changes.items():
        *section, name = key.split(".")
        (raw[section[0]] if section else raw)[name] = value
    return config_from_json(raw)


# The default run has 1_000_000 // (16 × 128) = 488 steps.
@pytest.mark.parametrize("changes, message", [
    ({"seed": 2**63}, r"config.seed = 9223372036854775808 .*integer from 0"),
    ({"seed": -1}, r"config.seed = -1 .*integer from 0"),
    ({"model.rope_theta": float("inf")}, r"model.rope_theta = inf .*finite number > 0"),
    ({"model.norm_eps": 0.0}, r"model.norm_eps = 0.0 .*> 0"),
    ({"model.init_std": -0.02}, r"model.init_std = -0.02 .*> 0"),
    ({"model.tied_embeddings": 1}, r"model.tied_embeddings = 1 .*True or False"),
    ({"model.unroll_layers": "yes"}, r"model.unroll_layers = 'yes' .*True or False"),
    ({"optim.peak_lr": float("nan")}, r"optim.peak_lr = nan .*finite number > 0"),
    ({"optim.max_lr": 0.0}, r"optim.max_lr = 0.0 .*> 0"),
    ({"optim.eps": -1e-8}, r"optim.eps = -1e-08 .*> 0"),
    ({"optim.peak_lr": 0.05}, r"optim.peak_lr = 0.05 .*exceeds optim.max_lr = 0.02"),
    ({"optim.b1": 1.0}, r"optim.b1 = 1.0 .*\[0, 1\)"),
    ({"optim.b2": 1.0}, r"optim.b2 = 1.0 .*\[0, 1\)"),
    ({"optim.b2": -0.5}, r"optim.b2 = -0.5 .*\[0, 1\)"),
    ({"optim.final_frac": 1.5}, r"optim.final_frac = 1.5 .*\[0, 1\]"),
    ({"optim.cooldown_frac": -0.1}, r"optim.cooldown_frac = -0.1 .*\[0, 1\]"),
    ({"optim.weight_decay": float("inf")}, r"optim.weight_decay = inf .*finite number >= 0"),
    ({"optim.clip_norm": -1.0}, r"optim.clip_norm = -1.0 .*>= 0"),
    ({"optim.z_loss": float("nan")}, r"optim.z_loss = nan .*>= 0"),
    ({"optim.decay_embeddings": "no"}, r"optim.decay_embeddings = 'no' .*True or False"),
    ({"optim.base_width": 0}, r"optim.base_width = 0 .*positive integer"),
    ({"optim.warmup_steps": -1}, r"optim.warmup_steps = -1 .*>= 0"),
    ({"optim.warmup_steps": 488}, r"optim.warmup_steps = 488 .*fewer than the run's 488 steps"),
    ({"optim.warmup_steps": 5000}, r"optim.warmup_steps = 5000 .*fewer than the run's 488 steps"),
    ({"optim.warmup_frac": 1.0}, r"optim.warmup_frac = 1.0 .*488 warmup steps.*fewer than"),
    ({"optim.schedule": "wsd", "optim.warmup_steps": 400},
     r"optim.warmup_steps = 400 .*with the 98 of optim.cooldown_frac = 0.2 exceed the run's 488"),
    ({"train.steps": -1}, r"train.steps = -1 .*>= 0"),
    ({"train.tokens": 0}, r"train.tokens = 0 .*> 0"),
    ({"train.tokens": 1000}, r"train.tokens = 1000 .*at least one batch .* 2048 tokens"),
    ({"train.log_every": 0}, r"train.log_every = 0 .*positive integer"),
    ({"train.eval_every": -1}, r"train.eval_every = -1 .*positive integer"),
    ({"train.checkpoint_every": 0}, r"train.checkpoint_every = 0 .*positive integer"),
    ({"train.keep_checkpoints": 0}, r"train.keep_checkpoints = 0 .*positive integer"),
    ({"train.microbatches": 0}, r"train.microbatches = 0 .*positive integer"),
    ({"train.save_steps": (100, 600)}, r"train.save_steps = \(100, 600\) .*from 1 to the run's 488"),
    ({"train.save_steps": (0,)}, r"train.save_steps = \(0,\) .*from 1 to"),
    ({"train.init_mode": "weights"}, r"train.init_mode = 'weights' .*params, state"),
    ({"train.init_from": "/runs/a", "train.init_step": -2}, r"train.init_step = -2 .*-1"),
    ({"train.init_step": 5}, r"train.init_step = 5 .*only read with train.init_from"),
    ({"mesh.shape": (2, 1, 1)}, r"mesh.shape = \(2, 1, 1\) .*number of devices \(1\)"),
])
def test_every_bad_override_names_its_field(changes, message):
    """A bad value of any field, or one that contradicts another field, is one ConfigError
    naming it, before anything is built or compiled."""
    with pytest.raises(ConfigError, match=message):
        validate(overridden(changes), n_devices=1)


@pytest.mark.parametrize("flag, message", [
    ("--config.model.d_modell=64",
     r"""error: unknown config key 'd_modell' \(did you mean "d_model" instead of "d_modell"\?\)"""),
    ("--config.foo.bar=1", r"error: unknown config key 'foo'$"),  # no close match: no hint
    ("--config.mdel.x=1",
     r"""error: unknown config key 'mdel' \(did you mean "model" instead of "mdel"\?\)"""),
    ("--config=FINETUNE:no-such-run",
     r"error: no-such-run/config.json does not exist: RUN_DIR must be the workdir of a trained run"),
])
def test_a_bad_config_flag_is_one_line(tmp_path, flag, message):
    """Outside the repository (the packaged configs), a misspelt key (with its did-you-mean) or a
    config file refusing its argument is one line, exit status 1, and nothing created."""
    from lm.cli import config_file

    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lm.train", f"--workdir={workdir}",
         flag.replace("FINETUNE", config_file("finetune.py"))],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1, lines
    assert len(lines) == 1 and re.fullmatch(message, lines[0]), lines
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("shape, devices, message", [
    ((2, 2, 1), 8, r"product must equal the number of devices \(8\)"),
    ((-1, -1, 1), 8, "at most one axis may be -1"),
    ((3, -1, 1), 8, r"fixed axes \(3\) must divide the 8 devices"),
    ((2, 2), 4, "must be 3 integers"),
    ((0, 1, 1), 1, "must be 3 integers"),
])
def test_bad_mesh(shape, devices, message):
    with pytest.raises(ConfigError, match=message):
        mesh_shape(shape, devices)


def test_mesh_resolution():
    assert mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert mesh_shape((2, -1, 2), 8) == (2, 2, 2)


@pytest.mark.parametrize("field, value, message", [
    ("schedule", "linear", r"optim.schedule = 'linear' .*cosine, wsd, constant"),
    ("peak_lr", 0.0, r"optim.peak_lr = 0.0 .*> 0"),
    ("warmup_frac", 1.5, r"optim.warmup_frac = 1.5 .*\[0, 1\]"),
    ("weight_decay", -0.1, r"optim.weight_decay = -0.1"),
    ("cooldown_shape", "cubic", r"optim.cooldown_shape = 'cubic'"),
])
def test_bad_optim_values(field, value, message):
    config = get_config()
    config.optim[field] = value
    with pytest.raises(ConfigError, match=message):
        validate_optim(config.optim)


def test_bad_train_values():
    config = get_config()
    config.train.microbatches = 3
    with pytest.raises(ConfigError, match=r"train.microbatches = 3 .*divide data.batch_size = 16"):
        validate_train(config)
    config = get_config()
    config.train.tokens = 0
    with pytest.raises(ConfigError, match=r"train.tokens = 0"):
        validate_train(config)
