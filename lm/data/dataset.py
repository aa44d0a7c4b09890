"""A tokenized dataset ready for training: cached token streams, train batches by step, a fixed
validation set, and the sharded global batch.

Tokens are computed once per (dataset, split, tokenizer) and cached as shards under
`<data_dir>/lm_cache/<dataset>/<tokenizer>/<split>/` (see `lm.data.shards`), memory-mapped on
load; a sweep of many runs tokenizes once, and a large dataset is prepared beforehand by
`python -m lm.data.prepare` with many processes.

The token stream (documents joined by EOS) is cut into windows of seq_len + 1 tokens that
start every seq_len tokens, so consecutive windows share one token and every token after the
first is a target exactly once. Training visits all windows once per epoch in an order that
grain's index shuffle derives from (seed, epoch); nothing depends on iterator state, so a run
resumed at step k sees the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import grain
import jax
import ml_collections
import numpy as np

from lm.config import choice, fail
from lm.data import shards
from lm.data.settings import TOKENIZERS, DataError, writing
from lm.data.sources import TRAIN, Corpus, open_corpus, prepared_corpus
from lm.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, Tokenizer, train_sentencepiece
from lm.files import file_lock

SP_SAMPLE_BYTES = 8 << 20  # SentencePiece trains on this much train text, drawn from the whole split
RUN_TOKENIZER = "tokenizer.model"  # a SentencePiece run's own pieces, in its workdir
EVAL_SEED = 0  # the validation windows never depend on config.data.seed


def window_count(n_tokens: int, seq_len: int) -> int:
    return max(n_tokens - 1, 0) // seq_len


def grain_seed(seed: int, purpose: str) -> int:
    """A 32-bit seed for grain's shuffle, hashed so that different seeds do not share epochs.

    (grain reshuffles epoch e with seed + e: unhashed, seed 1 would replay seed 0's 2nd epoch.)
    """
    return int.from_bytes(hashlib.sha256(f"{purpose}:{seed}".encode()).digest()[:4], "big")


class WindowReader:
    """Window indices [n] -> int32 array [n, seq_len + 1], read from the token stream."""

    def __init__(self, tokens: shards.Stream, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        return self.tokens.windows(np.asarray(indices) * self.seq_len, self.seq_len + 1)


def train_order(n_windows: int, seed: int) -> grain.MapDataset:
    """Element i = index of the i-th window seen in training: epochs of fresh permutations."""
    return grain.MapDataset.range(n_windows).shuffle(seed=grain_seed(seed, "train")).repeat()


def eval_order(n_windows: int, count: int) -> grain.MapDataset:
    """The first `count` windows of one fixed permutation: spread over the whole split, and the
    set for a smaller count is a prefix of the set for a larger one."""
    return grain.MapDataset.range(n_windows).shuffle(seed=grain_seed(EVAL_SEED, "eval"))[:count]


def batches(order: grain.MapDataset, rows: int, reader: WindowReader) -> grain.MapDataset:
    """Element j = the rows [j·rows, (j+1)·rows) of `order`, read as windows.

    With rows = B / P, element k·P + p is process p's share of global batch k.
    """
    return order.batch(rows).map(reader)




def run_tokenizer(data_cfg: ml_collections.ConfigDict, run_dir: str | Path) -> str:
    """The SentencePiece model a run in `run_dir` carries (its tokenizer.model), as an absolute
    path, when `data_cfg` uses SentencePiece and the run has one; else ""."""
    path = Path(run_dir) / RUN_TOKENIZER
    return str(path.absolute()) if data_cfg.tokenizer == "sentencepiece" and path.is_file() else ""


def _tokenizer(data_cfg: ml_collections.ConfigDict, corpus: Corpus | None, init_from: str = "",
               train: bool = True) -> Tokenizer | None:
    """Bytes; else the SentencePiece model of data.tokenizer_path, else that of the run `init_from`
    (a fine-tuned model keeps its pieces), else the one trained on the dataset, once (None when it
    is not trained yet and `train` is False)."""
    choice(data_cfg, "data", "tokenizer", TOKENIZERS)
    if data_cfg.tokenizer == "bytes":
        return ByteTokenizer()
    model, source = data_cfg.get("tokenizer_path"), "data.tokenizer_path"
    if not model and init_from:
        model, source = run_tokenizer(data_cfg, init_from), f"the {RUN_TOKENIZER} of train.init_from"
    if model:
        tokenizer = SentencePieceTokenizer(Path(model))
        if tokenizer.vocab_size != data_cfg.sp_vocab_size:
            fail("data.sp_vocab_size", data_cfg.sp_vocab_size,
                 f"must equal the {tokenizer.vocab_size} pieces of {source} = {model!r}")
        return tokenizer
    corpus = corpus or open_corpus(data_cfg)
    path = corpus.cache_dir / f"sentencepiece-bpe-{data_cfg.sp_vocab_size}.model"
    if not path.exists() and not train:
        return None
    if not path.exists():
        with writing(f"the SentencePiece model of {corpus.name}", path), file_lock(path):
            if not path.exists():
                print(f"lm.data: training a {data_cfg.sp_vocab_size}-piece SentencePiece model on "
                      f"{corpus.name} -> {path}", flush=True)
                train_sentencepiece(corpus.sample(SP_SAMPLE_BYTES), data_cfg.sp_vocab_size, path,
                                    corpus.name)
    return SentencePieceTokenizer(path)


def get_tokenizer(data_cfg: ml_collections.ConfigDict) -> Tokenizer:
    """The configured tokenizer; SentencePiece is trained on the dataset's train split once, then reused."""
    return _tokenizer(data_cfg, None)


def dataset_tokenizer(config: ml_collections.ConfigDict, corpus: Corpus) -> Tokenizer:
    """The tokenizer a run of `config` reads `corpus` with: that of `train.init_from` when the run
    starts from another and data.tokenizer_path names none, else `get_tokenizer`'s."""
    return _tokenizer(config.data, corpus, config.get("train", {}).get("init_from", ""))


def token_cache(data_cfg: ml_collections.ConfigDict, corpus: Corpus, split: str, tokenizer: Tokenizer,
                ) -> tuple[shards.Stream, dict]:
    """The split's token stream (memory-mapped shards) and its sizes. A cache nobody started is
    tokenized here, once (other processes wait for it); a partly prepared one only when
    data.prepare asks, else one DataError says which shards are missing."""
    directory = shards.split_dir(corpus, split, tokenizer.name)
    manifest = shards.read_manifest(directory)
    what = f"the token cache of {corpus.name} {split}"
    if manifest is None:
        with writing(what, directory), file_lock(directory):
            manifest = shards.read_manifest(directory)
            if manifest is None:
                if not data_cfg.get("prepare", False):
                    shards.check_not_partial(directory, f"{what} with {tokenizer.name}")
                manifest = shards.prepare(data_cfg, corpus, split, tokenizer).manifest
    sizes = {k: manifest[k] for k in ("documents", "bytes", "tokens")}
    return shards.open_stream(directory, manifest), {**sizes, "shards": len(manifest["shards"])}


def split_tokens(data_cfg: ml_collections.ConfigDict, split: str = TRAIN) -> int | None:
    """The tokens of a prepared split, read from its manifest (nothing is built or tokenized), e.g.
    for a planner to see whether a budget's tokens fit the data; None when the dataset, its
    SentencePiece model or the split's token cache is not (fully) prepared."""
    corpus = prepared_corpus(data_cfg)
    if corpus is None:
        return None
    if split not in (TRAIN, corpus.eval_split):
        raise DataError(f"split = {split!r} is not one of the splits lm reads from {corpus.name}: "
                        f"{TRAIN!r} or {corpus.eval_split!r}")
    tokenizer = _tokenizer(data_cfg, corpus, train=False)
    if tokenizer is None:
        return None
    manifest = shards.read_manifest(shards.split_dir(corpus, split, tokenizer.name))
    return None if manifest is None else manifest["tokens"]


def _rows(batch_size: int, process_index: int, process_count: int) -> int:
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise DataError(f"process_index = {process_index} must lie in [0, process_count = {process_count})")
    if batch_size % process_count:
        fail("data.batch_size", batch_size, f"must be divisible by the {process_count} processes")
    return batch_size // process_count


class Dataset:
    """Windows of seq_len + 1 tokens: train batches addressed by step, a fixed validation set.

    Process p of P reads rows [p·B/P, (p+1)·B/P) of each global batch of B = data.batch_size.
    """

    def __init__(self, data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, train: shards.Stream,
                 held_out: shards.Stream, info: dict) -> None:
        seq_len, self.batch_size = data_cfg.seq_len, data_cfg.batch_size
        self.tokenizer, self.seq_len, self.info = tokenizer, seq_len, info
        self.num_train_windows = window_count(len(train), seq_len)
        available = window_count(len(held_out), seq_len)
        self.num_eval_batches = min(data_cfg.eval_batches, available // self.batch_size)
        self.num_eval_windows = self.num_eval_batches * self.batch_size
        self._check_sizes(len(train), available, data_cfg.eval_batches)
        info["train"]["windows"], info["eval"]["windows"] = self.num_train_windows, available
        self._train_order = train_order(self.num_train_windows, data_cfg.seed)
        self._eval_order = eval_order(available, self.num_eval_windows)
        self._train_reader = WindowReader(train, seq_len)
        self._eval_reader = WindowReader(held_out, seq_len)
        self._train_batches: dict[int, grain.MapDataset] = {}

    def _check_sizes(self, train_tokens: int, eval_windows: int, eval_batches: int) -> None:
        """DataError unless both splits hold a batch; a warning when validation is short of eval_batches."""
        name, split = f"{self.info['dataset']} with {self.tokenizer.name}", self.info["eval"]["split"]
        window = f"data.seq_len + 1 = {self.seq_len + 1}"
        if self.num_train_windows == 0:
            raise DataError(f"the train split of {name} has {train_tokens} tokens, not one window of "
                            f"{window}: lower data.seq_len or add text")
        if self.num_eval_batches == 0:
            raise DataError(f"the {split} split of {name} has {eval_windows} windows of {window} tokens, "
                            f"fewer than one batch of data.batch_size = {self.batch_size}: lower them or "
                            "add held-out text")
        if self.num_eval_batches < eval_batches:
            warnings.warn(f"the {split} split of {name} has {eval_windows} windows: evaluating "
                          f"{self.num_eval_batches} batches, not data.eval_batches = {eval_batches}",
                          stacklevel=3)

    def train_batch(self, step: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """This process's rows of global batch `step`: int32 [batch_size // process_count, seq_len + 1]."""
        if step < 0:
            raise DataError(f"step = {step} must be >= 0")
        rows = _rows(self.batch_size, process_index, process_count)
        if rows not in self._train_batches:
            self._train_batches[rows] = batches(self._train_order, rows, self._train_reader)
        return self._train_batches[rows][step * process_count + process_index]

    def eval_batches(self, process_index: int = 0, process_count: int = 1) -> Iterator[np.ndarray]:
        """This process's rows of each of the `num_eval_batches` validation batches, always the same."""
        rows = _rows(self.batch_size, process_index, process_count)
        evals = batches(self._eval_order, rows, self._eval_reader)
        for i in range(self.num_eval_batches):
            yield evals[i * process_count + process_index]


def build_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """Prepare, tokenize and cache `config.data`'s dataset as needed (a partly prepared cache only
    when data.prepare asks), then open it; a run started from another (`train.init_from`)
    tokenizes with that run's SentencePiece model."""
    d = config.data
    corpus = open_corpus(d)
    tokenizer = dataset_tokenizer(config, corpus)
    train, train_info = token_cache(d, corpus, TRAIN, tokenizer)
    held_out, eval_info = token_cache(d, corpus, corpus.eval_split, tokenizer)
    info = {"dataset": corpus.name, "tokenizer": tokenizer.name,
            "train": {"split": TRAIN, **train_info}, "eval": {"split": corpus.eval_split, **eval_info}}
    return Dataset(d, tokenizer, train, held_out, info)


def to_global(local_batch: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """The global batch from every process's rows, laid out by `sharding` (e.g. batch over
    ("data", "fsdp")); each process passes the rows it read with its own process index."""
    return jax.make_array_from_process_local_data(sharding, local_batch)

