"""Tokenizers: bytes round-trip any text and decode anything; SentencePiece trains once, then is reused."""

import random

import numpy as np
import pytest

import lm.data.dataset as dataset_lib
from configs.train import get_config
from lm.config import ConfigError
from lm.data import ByteTokenizer, DataError, get_tokenizer


def random_text(rng: random.Random, n: int) -> str:
    """Any Unicode scalar values: ASCII, controls, accents, CJK, emoji (no surrogates)."""
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


def test_bytes_round_trip_any_text():
    tok, rng = ByteTokenizer(), random.Random(0)
    for n in (0, 1, 17, 500):
        text = random_text(rng, n)
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and ids.max(initial=0) < 256
        assert tok.decode(ids) == text
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.encode("é").tolist() == [0xC3, 0xA9]
    assert tok.count_bytes(np.array([0xC3, 0xA9, tok.eos_id, 0x41])) == 3  # EOS stands for no text


def test_bytes_decode_is_total():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"  # invalid start byte
    assert tok.decode([0x41, 0xE2, 0x82]) == "A\ufffd"  # truncated sequence
    assert tok.decode([72, 256, 105]) == "Hi"  # EOS is dropped
    assert tok.decode([72, 300, -1, 105]) == "H\ufffd\ufffdi"  # out of range
    assert tok.decode(np.array([[72], [105]])) == "Hi"


@pytest.fixture
def sp_config(tmp_path):
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "lambda", "sigma", "omega"]
    folder = tmp_path / "text"
    folder.mkdir()
    for i in range(30):
        lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(40)]
        (folder / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    c = get_config()
    c.data.update(dataset="folder", text_dir=str(folder), data_dir=str(tmp_path / "data"),
                  tokenizer="sentencepiece", sp_vocab_size=320)
    return c.data


def test_sentencepiece_trains_round_trips_and_is_reused(sp_config, monkeypatch):
    tok = get_tokenizer(sp_config)
    assert tok.vocab_size == 320 and tok.eos_id == 1
    rng = random.Random(2)
    samples = ["alpha beta gamma\n", "  leading and  double  spaces\t\r\n", "Ünïcödé ✓ 漢字 🙂", "\x00",
               random_text(rng, 300)]
    for text in samples:
        assert tok.decode(tok.encode(text)) == text
        assert tok.count_bytes(np.append(tok.encode(text), tok.eos_id)) == len(text.encode("utf-8"))
    assert len(tok.encode("alpha beta gamma delta")) < len("alpha beta gamma delta") / 2
    assert tok.decode([*tok.encode("ab"), tok.eos_id, 5000]) == "ab\ufffd"

    def retrain(*args):
        raise AssertionError("the saved tokenizer should have been reused")

    monkeypatch.setattr(dataset_lib, "train_sentencepiece", retrain)
    again = get_tokenizer(sp_config)
    assert again.name == tok.name
    assert again.encode(samples[0]).tolist() == tok.encode(samples[0]).tolist()


def test_sentencepiece_vocab_too_large_for_corpus(sp_config):
    sp_config.sp_vocab_size = 50_000
    with pytest.raises(DataError, match=r"sp_vocab_size = 50000 does not work for lm_text_folder.*too high"):
        get_tokenizer(sp_config)


def test_tokenizer_path_reuses_a_trained_model_on_other_text(sp_config, tmp_path, monkeypatch):
    """Fine-tuning keeps the pretrained pieces: data.tokenizer_path is loaded, never retrained."""
    from lm.data.settings import validate_data_config

    trained = get_tokenizer(sp_config)
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("completely different text, with other words\n" * 50)
    monkeypatch.setattr(dataset_lib, "train_sentencepiece", lambda *a: pytest.fail("retrained"))
    sp_config.update(text_dir=str(other), tokenizer_path=str(trained.path))
    reused = get_tokenizer(sp_config)
    assert reused.name == trained.name
    sp_config.sp_vocab_size = 512
    with pytest.raises(ConfigError, match=r"data.sp_vocab_size = 512 .* 320 pieces of data.tokenizer_path"):
        get_tokenizer(sp_config)
    c = get_config()
    c.data.tokenizer_path = str(trained.path)
    with pytest.raises(ConfigError, match=r"data.tokenizer_path .* but data.tokenizer = 'bytes'"):
        validate_data_config(c, n_devices=1)
    c.data.update(tokenizer="sentencepiece", tokenizer_path=str(tmp_path / "missing.model"))
    with pytest.raises(ConfigError, match=r"must be an existing SentencePiece .model file"):
        validate_data_config(c, n_devices=1)


def test_sentencepiece_samples_the_whole_split(sp_config):
    """Its training text comes from all over the train split, not from its first documents."""
    from lm.data.sources import open_corpus

    corpus = open_corpus(sp_config)
    source = corpus.source("train")
    texts = corpus.texts(source, range(len(source)))
    sample = list(corpus.sample(sum(map(len, texts)) // 4))
    positions = sorted(texts.index(text.encode()) for text in sample)
    assert len(positions) < len(texts) // 2 and positions[-1] - positions[0] > len(texts) // 2
    assert positions != list(range(len(positions)))
