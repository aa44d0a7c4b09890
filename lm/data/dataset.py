"""A tokenized dataset ready for training: cached token streams, train batches by step, a fixed
validation set, and the sharded global batch.

Tokens are computed once per (dataset, split, tokenizer) and cached under
`<data_dir>/lm_cache/<dataset>/<tokenizer>/<split>.npy` (uint16 when the vocabulary fits,
else int32), memory-mapped on load; a sweep of many runs tokenizes once.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import grain
import jax
import ml_collections
import numpy as np

from lm.config import choice, fail
from lm.data import pipeline
from lm.data.settings import TOKENIZERS, DataError, writing
from lm.data.sources import TRAIN, Corpus, open_corpus
from lm.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, Tokenizer, train_sentencepiece
from lm.files import file_lock, load_array, write_array_atomic, write_json_atomic

SP_SAMPLE_BYTES = 8 << 20  # SentencePiece trains on this much train text
READ_CHUNK = 512  # documents read and tokenized together
RUN_TOKENIZER = "tokenizer.model"  # a SentencePiece run's own pieces, in its workdir


def run_tokenizer(data_cfg: ml_collections.ConfigDict, run_dir: str | Path) -> str:
    """The SentencePiece model a run in `run_dir` carries (its tokenizer.model), as an absolute
    path, when `data_cfg` uses SentencePiece and the run has one; else ""."""
    path = Path(run_dir) / RUN_TOKENIZER
    return str(path.absolute()) if data_cfg.tokenizer == "sentencepiece" and path.is_file() else ""


def _tokenizer(data_cfg: ml_collections.ConfigDict, corpus: Corpus | None, init_from: str = "",
               ) -> Tokenizer:
    """Bytes; else the SentencePiece model of data.tokenizer_path, else that of the run `init_from`
    (a fine-tuned model keeps its pieces), else the one trained on the dataset, once."""
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


def _encoded(corpus: Corpus, split: str, tokenizer: Tokenizer, stats: dict) -> Iterator[np.ndarray]:
    """The split's documents in order, tokenized, each followed by EOS; counts docs and bytes."""
    source = corpus.source(split)
    eos = np.array([tokenizer.eos_id], dtype=np.int32)

    def encode(indices: np.ndarray) -> tuple[np.ndarray, int, int]:
        texts = corpus.texts(source, indices.tolist())
        ids = tokenizer.encode_batch([t.decode("utf-8", errors="replace") for t in texts])
        return np.concatenate([part for doc in ids for part in (doc, eos)]), len(texts), sum(map(len, texts))

    chunks = grain.MapDataset.range(len(source)).batch(READ_CHUNK).map(encode)
    read_ahead = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    for tokens, docs, n_bytes in chunks.to_iter_dataset(read_ahead):
        stats["documents"] += docs
        stats["bytes"] += n_bytes
        yield tokens


def token_cache(corpus: Corpus, split: str, tokenizer: Tokenizer) -> tuple[np.ndarray, dict]:
    """The split's token stream (memory-mapped) and its sizes, tokenizing it on first use."""
    path = corpus.cache_dir / tokenizer.name / f"{split}.npy"
    meta = path.with_suffix(".json")
    if not meta.exists():
        with writing(f"the token cache of {corpus.name} {split}", path), file_lock(path):
            if not meta.exists():
                print(f"lm.data: tokenizing {corpus.name} {split} with {tokenizer.name} -> {path}",
                      flush=True)
                start = time.perf_counter()
                stats = {"documents": 0, "bytes": 0}
                dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
                stats["tokens"] = write_array_atomic(path, _encoded(corpus, split, tokenizer, stats), dtype)
                write_json_atomic(meta, stats)
                print(f"lm.data: {stats['tokens']:,} tokens from {stats['documents']:,} documents in "
                      f"{time.perf_counter() - start:.1f}s", flush=True)
    return load_array(path), json.loads(meta.read_text())


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

    def __init__(self, data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, train: np.ndarray,
                 held_out: np.ndarray, info: dict) -> None:
        seq_len, self.batch_size = data_cfg.seq_len, data_cfg.batch_size
        self.tokenizer, self.seq_len, self.info = tokenizer, seq_len, info
        self.num_train_windows = pipeline.window_count(len(train), seq_len)
        available = pipeline.window_count(len(held_out), seq_len)
        self.num_eval_batches = min(data_cfg.eval_batches, available // self.batch_size)
        self.num_eval_windows = self.num_eval_batches * self.batch_size
        self._check_sizes(len(train), available, data_cfg.eval_batches)
        info["train"]["windows"], info["eval"]["windows"] = self.num_train_windows, available
        self._train_order = pipeline.train_order(self.num_train_windows, data_cfg.seed)
        self._eval_order = pipeline.eval_order(available, self.num_eval_windows)
        self._train_reader = pipeline.WindowReader(train, seq_len)
        self._eval_reader = pipeline.WindowReader(held_out, seq_len)
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
            self._train_batches[rows] = pipeline.batches(self._train_order, rows, self._train_reader)
        return self._train_batches[rows][step * process_count + process_index]

    def eval_batches(self, process_index: int = 0, process_count: int = 1) -> Iterator[np.ndarray]:
        """This process's rows of each of the `num_eval_batches` validation batches, always the same."""
        rows = _rows(self.batch_size, process_index, process_count)
        batches = pipeline.batches(self._eval_order, rows, self._eval_reader)
        for i in range(self.num_eval_batches):
            yield batches[i * process_count + process_index]


def build_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """Prepare, tokenize and cache `config.data`'s dataset as needed, then open it; a run started
    from another (`train.init_from`) tokenizes with that run's SentencePiece model."""
    d = config.data
    corpus = open_corpus(d)
    tokenizer = _tokenizer(d, corpus, config.get("train", {}).get("init_from", ""))
    train, train_info = token_cache(corpus, TRAIN, tokenizer)
    held_out, eval_info = token_cache(corpus, corpus.eval_split, tokenizer)
    info = {"dataset": corpus.name, "tokenizer": tokenizer.name,
            "train": {"split": TRAIN, **train_info}, "eval": {"split": corpus.eval_split, **eval_info}}
    return Dataset(d, tokenizer, train, held_out, info)


def to_global(local_batch: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """The global batch from every process's rows, laid out by `sharding` (e.g. batch over
    ("data", "fsdp")); each process passes the rows it read with its own process index."""
    return jax.make_array_from_process_local_data(sharding, local_batch)

