"""Tokenizers behind one small interface: UTF-8 bytes, or SentencePiece BPE trained on the corpus.

Decoding is total: the EOS id is dropped (documents are joined with it, so it marks a document
boundary, not text), an id outside the vocabulary becomes U+FFFD, and bytes that do not form
valid UTF-8 decode with errors="replace" (each bad sequence becomes U+FFFD).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import sentencepiece as spm

from lm.config import BYTE_VOCAB_SIZE
from lm.data.settings import DataError
from lm.files import write_bytes_atomic

REPLACEMENT = "\ufffd"
SP_MAX_CHARS = 4096  # SentencePiece skips longer training sentences, so documents are cut at lines


class Tokenizer(Protocol):
    name: str  # identifies the tokenizer in cache paths
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of `text`, without EOS."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of each text; may use several threads."""

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of `ids`: EOS dropped, out-of-range ids as U+FFFD."""

    def count_bytes(self, ids: np.ndarray) -> int:
        """UTF-8 bytes of the text one sequence of ids stands for (the denominator of bits per byte)."""


def _decode_runs(ids: Iterable[int] | np.ndarray, eos_id: int, vocab_size: int,
                 decode_valid: Callable[[np.ndarray], str]) -> str:
    """Drop EOS, decode maximal runs of in-range ids with `decode_valid`, U+FFFD for the rest."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids = ids[ids != eos_id]
    parts, start = [], 0
    for i in np.flatnonzero((ids < 0) | (ids >= vocab_size)):
        parts += [decode_valid(ids[start:i]), REPLACEMENT]
        start = i + 1
    parts.append(decode_valid(ids[start:]))
    return "".join(parts)


class ByteTokenizer:
    """ids 0..255 are the UTF-8 bytes of the text, 256 is EOS: any text round-trips exactly."""

    name = "bytes"
    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_VOCAB_SIZE - 1  # the id after the 256 byte values

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return _decode_runs(ids, self.eos_id, self.vocab_size,
                            lambda run: run.astype(np.uint8).tobytes().decode("utf-8", errors="replace"))

    def count_bytes(self, ids: np.ndarray) -> int:
        """Exact: every id below EOS is one byte."""
        ids = np.asarray(ids)
        return int(np.count_nonzero((ids >= 0) & (ids < self.eos_id)))


class SentencePieceTokenizer:
    """A trained SentencePiece model: identity normalization and byte fallback, so text round-trips.

    `encode_batch` uses `threads` threads (default: one per CPU; a one-CPU worker process, 1).
    """

    def __init__(self, model_path: Path, threads: int | None = None) -> None:
        self.path, self.threads = Path(model_path), threads or os.cpu_count() or 1
        proto = self.path.read_bytes()
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = self._sp.vocab_size()
        self.eos_id = self._sp.eos_id()
        self.name = f"sp{self.vocab_size}-{hashlib.sha256(proto).hexdigest()[:12]}"

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        ids = self._sp.encode(list(texts), num_threads=self.threads)
        return [np.asarray(x, dtype=np.int32) for x in ids]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return _decode_runs(ids, self.eos_id, self.vocab_size, lambda run: self._sp.decode(run.tolist()))

    def count_bytes(self, ids: np.ndarray) -> int:
        """The length of the decoded text in UTF-8."""
        return len(self.decode(ids).encode("utf-8"))


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    """Texts cut at line ends into pieces of at most SP_MAX_CHARS characters."""
    for text in texts:
        piece = ""
        for line in text.splitlines(keepends=True):
            if piece and len(piece) + len(line) > SP_MAX_CHARS:
                yield piece
                piece = ""
            piece += line[:SP_MAX_CHARS]
        if piece:
            yield piece


def train_sentencepiece(texts: Iterable[str], vocab_size: int, path: Path, corpus: str) -> None:
    """Train a BPE model with `vocab_size` pieces (<unk> = 0, </s> = 1, 256 byte pieces) at `path`.

    Single-threaded so that every host that trains it gets the same model.
    """
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            split_digits=True, unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
            max_sentence_length=4 * SP_MAX_CHARS, num_threads=1, minloglevel=2)
    except RuntimeError as e:
        reason = str(e).split("] ")[-1]
        raise DataError(f"config.data.sp_vocab_size = {vocab_size} does not work for {corpus}: "
                        f"SentencePiece says {reason!r}") from None
    write_bytes_atomic(path, model.getvalue())
