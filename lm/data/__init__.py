"""The input pipeline: datasets (embedded corpus, a folder of text, tfds), tokenizers, token
caches and deterministic, process-sharded batches. See docs/data.md."""

from lm.data.dataset import Dataset, build_dataset, get_tokenizer, run_tokenizer, split_tokens, to_global
from lm.data.settings import DataError, expected_vocab_size, validate_data_config
from lm.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, Tokenizer

__all__ = [
    "ByteTokenizer",
    "DataError",
    "Dataset",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_dataset",
    "expected_vocab_size",
    "get_tokenizer",
    "run_tokenizer",
    "split_tokens",
    "to_global",
    "validate_data_config",
]
