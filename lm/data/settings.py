"""The `config.data` fields: allowed values, where data lives, and cheap up-front validation.

Nothing here builds or reads a dataset, so `validate_data_config` can run before compilation.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections

from lm.config import BYTE_VOCAB_SIZE, ConfigError, choice, fail, positive
from lm.files import cache_root
from lm.sharding import data_parallel_size

TOKENIZERS = ("bytes", "sentencepiece")
EMBEDDED = "stdlib"  # the corpus made from the interpreter's standard library
FOLDER = "folder"  # the user's own .txt / .jsonl files in data.text_dir
MIN_SP_VOCAB_SIZE = 259  # 256 byte-fallback pieces, <unk>, </s> and at least one character


class DataError(ConfigError):
    """A data setting, file or dataset is unusable; the message names it, the bad value and the fix."""


def data_root(data_cfg: ml_collections.ConfigDict) -> Path:
    """Where datasets, tokenizers and token caches live: data.data_dir, $LM_DATA_DIR, else
    $LM_CACHE_DIR/data."""
    root = data_cfg.data_dir or os.environ.get("LM_DATA_DIR") or cache_root() / "data"
    return Path(root).expanduser().absolute()


@contextlib.contextmanager
def writing(what: str, path: Path) -> Iterator[None]:
    """A write under the data dir that the OS refused (read-only folder, full disk) becomes one
    DataError naming the path, the reason and what was being written."""
    try:
        yield
    except DataError:  # already one line (a nested write), and a ValueError itself
        raise
    except OSError as e:
        raise DataError(f"{e.filename or path}: {e.strerror or e} ({_must_be_writable(what)})") from None
    except (RuntimeError, ValueError) as e:  # array_record (tfds's writer) reports ENOSPC as these
        reason = next((r for r in _WRITE_REFUSALS if r in str(e)), None)
        if reason is None:
            raise
        raise DataError(f"{path}: {reason} ({_must_be_writable(what)})") from None


_WRITE_REFUSALS = ("No space left on device", "Read-only file system")


def _must_be_writable(what: str) -> str:
    return f"writing {what}; data.data_dir, else $LM_DATA_DIR, must be a writable folder with free space"


def expected_vocab_size(data_cfg: ml_collections.ConfigDict) -> int:
    """The tokenizer's vocabulary size, known from the config alone (nothing is built)."""
    choice(data_cfg, "data", "tokenizer", TOKENIZERS)
    return BYTE_VOCAB_SIZE if data_cfg.tokenizer == "bytes" else data_cfg.sp_vocab_size


def _validate_source(d: ml_collections.ConfigDict) -> None:
    if not d.dataset:
        fail("data.dataset", d.dataset,
             f"must be {EMBEDDED!r}, {FOLDER!r} or the name of a prepared tfds dataset")
    if d.dataset == FOLDER and not d.text_dir:
        fail("data.text_dir", d.text_dir, "data.dataset = 'folder' needs the folder of .txt/.jsonl files")
    if d.dataset != FOLDER and d.text_dir:
        fail("data.text_dir", d.text_dir,
             f"is only read when data.dataset = 'folder' (it is {d.dataset!r}); set one or clear the other")
    if not d.text_key:
        fail("data.text_key", d.text_key, "must name the feature (or JSON field) holding the text")
    if not isinstance(d.get("prepare", False), bool):
        fail("data.prepare", d.prepare, "must be True (training tokenizes a partly prepared token cache) "
             "or False")


def _validate_tokenizer(d: ml_collections.ConfigDict) -> None:
    vocab = expected_vocab_size(d)
    if d.get("tokenizer_path"):
        if d.tokenizer != "sentencepiece":
            fail("data.tokenizer_path", d.tokenizer_path,
                 f"is a SentencePiece model, but data.tokenizer = {d.tokenizer!r}")
        if not Path(d.tokenizer_path).is_file():
            fail("data.tokenizer_path", d.tokenizer_path, "must be an existing SentencePiece .model file")
    if d.tokenizer == "sentencepiece" and vocab < MIN_SP_VOCAB_SIZE:
        fail("data.sp_vocab_size", vocab,
             f"must be at least {MIN_SP_VOCAB_SIZE} (256 byte pieces, <unk>, </s> and the characters)")


def validate_source_config(d: ml_collections.ConfigDict) -> None:
    """Reject a bad dataset or tokenizer in `config.data` (what `python -m lm.data.prepare` reads),
    without building anything."""
    _validate_source(d)
    positive(d, "data", ("sp_vocab_size",))
    _validate_tokenizer(d)


def validate_data_config(config: ml_collections.ConfigDict, n_devices: int | None = None) -> None:
    """Reject a bad `config.data` (ConfigError naming the field) without building anything; whether
    a named dataset exists and is prepared is checked when it is built."""
    d = config.data
    positive(d, "data", ("seq_len", "batch_size", "eval_batches"))
    validate_source_config(d)
    vocab = expected_vocab_size(d)
    if config.model.vocab_size != vocab:
        fail("model.vocab_size", config.model.vocab_size,
             f"data.tokenizer = {d.tokenizer!r} has {vocab} ids; set model.vocab_size = {vocab}")
    n_devices = jax.device_count() if n_devices is None else n_devices
    dp = data_parallel_size(config.mesh.shape, n_devices)
    if d.batch_size % dp:
        fail("data.batch_size", d.batch_size,
             f"must be divisible by the data-parallel size {dp} (mesh data × fsdp axes of "
             f"mesh.shape = {tuple(config.mesh.shape)} on {n_devices} devices)")
