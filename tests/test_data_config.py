"""validate_data_config: every bad data setting fails up front (a ConfigError naming the field), without
building anything."""

import pytest

from configs.train import get_config
from lm.config import ConfigError
from lm.data import DataError, expected_vocab_size, validate_data_config


@pytest.fixture
def config(tmp_path):
    c = get_config()
    c.data.data_dir = str(tmp_path / "never-created")
    return c


def test_defaults_pass_without_touching_the_data_dir(config, tmp_path):
    validate_data_config(config, n_devices=1)
    assert not (tmp_path / "never-created").exists()


def test_data_errors_are_config_errors():
    assert issubclass(DataError, ConfigError) and issubclass(ConfigError, ValueError)


def test_expected_vocab_size_needs_no_build(config):
    assert expected_vocab_size(config.data) == 257
    config.data.tokenizer, config.data.sp_vocab_size = "sentencepiece", 1000
    assert expected_vocab_size(config.data) == 1000


@pytest.mark.parametrize("field, value, message", [
    ("tokenizer", "wordpiece", r"data.tokenizer = 'wordpiece' .*bytes, sentencepiece"),
    ("seq_len", 0, r"data.seq_len = 0 .*positive integer"),
    ("batch_size", -4, r"data.batch_size = -4 .*positive integer"),
    ("eval_batches", 0, r"data.eval_batches = 0 .*positive integer"),
    ("dataset", "", r"data.dataset = '' .*stdlib"),
    ("text_dir", "/some/dir", r"data.text_dir = '/some/dir' .*only read when data.dataset = 'folder'"),
    ("text_key", "", r"data.text_key = ''"),
    ("prepare", "yes", r"data.prepare = 'yes' .*must be True \(training tokenizes a partly prepared"),
])
def test_bad_data_fields(config, field, value, message):
    del config.data[field]  # untyped, as a config.json read back would be
    config.data[field] = value
    with pytest.raises(ConfigError, match=message):
        validate_data_config(config, n_devices=1)


def test_folder_needs_text_dir(config):
    config.data.dataset = "folder"
    with pytest.raises(ConfigError, match=r"data.text_dir = '' .*folder"):
        validate_data_config(config, n_devices=1)


def test_model_vocab_must_match_tokenizer(config):
    config.model.vocab_size = 256
    with pytest.raises(ConfigError, match=r"'bytes' has 257 ids; set model.vocab_size = 257"):
        validate_data_config(config, n_devices=1)
    config.data.tokenizer, config.data.sp_vocab_size = "sentencepiece", 2048
    with pytest.raises(ConfigError, match=r"model.vocab_size = 256 .*set model.vocab_size = 2048"):
        validate_data_config(config, n_devices=1)
    config.model.vocab_size = 2048
    validate_data_config(config, n_devices=1)


def test_sentencepiece_vocab_too_small(config):
    config.data.tokenizer, config.data.sp_vocab_size, config.model.vocab_size = "sentencepiece", 100, 100
    with pytest.raises(ConfigError, match=r"data.sp_vocab_size = 100 .*at least 259"):
        validate_data_config(config, n_devices=1)


@pytest.mark.parametrize("mesh, n_devices, batch, ok", [
    ((-1, 1, 1), 4, 6, False),  # data = 4
    ((-1, 1, 1), 4, 8, True),
    ((1, -1, 2), 8, 6, False),  # fsdp = 4
    ((2, 2, 1), 4, 12, True),
    ((1, 1, -1), 4, 6, True),  # tensor parallelism only: every device sees the whole batch
])
def test_batch_divisible_by_data_parallel_size(config, mesh, n_devices, batch, ok):
    config.mesh.shape, config.data.batch_size = mesh, batch
    if ok:
        validate_data_config(config, n_devices=n_devices)
    else:
        with pytest.raises(ConfigError, match=rf"data.batch_size = {batch} .*data-parallel size 4"):
            validate_data_config(config, n_devices=n_devices)


def test_default_device_count(config):
    import jax

    config.data.batch_size = jax.device_count() * 3
    validate_data_config(config)
