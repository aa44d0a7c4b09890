import pytest

from configs.train import get_config
from lm.config import ConfigError, mesh_shape, validate_model, validate_optim, validate_train


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
