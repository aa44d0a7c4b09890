"""Using a trained run: held-out evaluation and fine-tuning from its checkpoint."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from lm.config import ConfigError

from .conftest import make_config

SP_VOCAB = 320
TEXT = ("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 3


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A user's own text: a few .txt files and a .jsonl file."""
    root = tmp_path_factory.mktemp("text")
    for i in range(12):
        (root / f"doc{i}.txt").write_text(f"Document {i}. " + TEXT[i:] + TEXT[:i])
    (root / "more.jsonl").write_text("\n".join(json.dumps({"text": f"{i} " + TEXT}) for i in range(4)))
    return root


def test_evaluate_reproduces_the_final_eval_loss(reference):
    from lm.evaluate import evaluate

    workdir, result = reference
    r = evaluate(workdir)
    assert r["step"] == result["steps"]
    assert r["loss"] == pytest.approx(result["eval_loss"], rel=1e-6)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert 0 < r["loss_stderr"] < 0.2 * r["loss"]
    # Byte tokenizer: one token per byte except EOS, so bits/byte is loss/ln2 × tokens/bytes.
    assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2) * r["tokens"] / r["bytes"])
    assert r["bytes"] <= r["tokens"]
    assert json.loads((workdir / "eval.json").read_text())["loss"] == r["loss"]


def test_fine_tune_starts_from_the_pretrained_loss(config, reference, text_dir, tmp_path):
    from lm.evaluate import evaluate
    from lm.train import train

    ref_dir, _ = reference
    pretrained = evaluate(ref_dir, split="train", max_batches=1, text_dir=str(text_dir))["loss"]
    config.data.dataset, config.data.text_dir = "folder", str(text_dir)
    config.train.steps, config.train.log_every, config.train.eval_every = 20, 1, 20
    config.optim.peak_lr = 1e-3
    scratch = train(config, tmp_path / "scratch")
    config.train.init_from = str(ref_dir)
    tuned = train(config, tmp_path / "tuned")
    first = [json.loads(x) for x in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()]
    first_scratch = json.loads((tmp_path / "scratch" / "metrics.jsonl").read_text().splitlines()[0])
    # The first step's loss is the pretrained model's loss on the first batch of the new data.
    assert first[0]["step"] == 1 and first[0]["loss"] == pytest.approx(pretrained, rel=1e-5)
    assert first[0]["loss"] < first_scratch["loss"] - 1.0  # a fresh model starts near ln 257
    assert tuned["eval_loss"] < scratch["eval_loss"]
    assert tuned["steps"] == 20  # its own schedule and step count, not the checkpoint's


@pytest.mark.parametrize("field, value, message", [
    ("d_model", 48, r"model.d_model is 32 there and 48 here"),
    ("activation", "swiglu", r"model.activation is 'gelu' there and 'swiglu' here"),
])
def test_fine_tune_from_a_different_model_fails_clearly(config, reference, tmp_path, field, value,
                                                        message):
    from lm.train import train

    config.model[field] = value
    config.train.init_from = str(reference[0])
    with pytest.raises(ConfigError, match=message):
        train(config, tmp_path / "run")


def test_fine_tune_from_a_missing_step_fails_clearly(config, reference, tmp_path):
    from lm.train import train

    config.train.init_from, config.train.init_step = str(reference[0]), 7
    with pytest.raises(ConfigError, match=r"init_step = 7: .* has checkpoints at steps"):
        train(config, tmp_path / "run")


def test_evaluate_refuses_arguments_that_mean_nothing(reference):
    from lm.evaluate import evaluate

    for kwargs, message in (({"max_batches": -1}, r"max_batches = -1 is not allowed: must be >= 0"),
                            ({"split": "test"}, r"split = 'test' is not allowed: must be one of"),
                            ({"step": -3}, r"step = -3 is not allowed"),
                            ({"dataset": "stdlib", "text_dir": "x"}, r"give one of them")):
        with pytest.raises(ConfigError, match=message):
            evaluate(reference[0], **kwargs)


def test_a_config_json_that_does_not_fit_its_checkpoint_is_one_error(reference, tmp_path):
    """Before: a changed n_heads gave hundreds of lines of Orbax shape errors."""
    from lm.checkpoint import load_run
    from lm.files import FileError

    run = tmp_path / "run"
    shutil.copytree(reference[0] / "checkpoints", run / "checkpoints")
    saved = json.loads((reference[0] / "config.json").read_text())
    saved["model"]["n_heads"] = 4  # d_model 32: head_dim 8 instead of 16
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(FileError, match=r"config.json does not fit its checkpoint .*checkpoints/300: "
                                        r"parameter wo is of shape \(2, 2, 16, 32\) there and "
                                        r"of shape \(2, 4, 8, 32\) by config.json"):
        load_run(run)
    saved["model"]["n_heads"] = 3
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(FileError, match=r"config.json: config.model.d_model = 32 is not allowed"):
        load_run(run)
    (run / "config.json").write_text("[]")
    with pytest.raises(FileError, match=r"config.json: expected a JSON dict"):
        load_run(run)


@pytest.fixture(scope="module")
def sp_run(tmp_path_factory, text_dir):
    """A SentencePiece run on a text folder (10 steps), then left alone: its folder of text and its
    data_dir (where its tokenizer was trained) are deleted, as on another machine."""
    from lm.train import train

    root = tmp_path_factory.mktemp("sp")
    shutil.copytree(text_dir, root / "text")
    c = make_config(root / "data")
    c.data.update(dataset="folder", text_dir=str(root / "text"), tokenizer="sentencepiece",
                  sp_vocab_size=SP_VOCAB)
    c.model.vocab_size = SP_VOCAB
    c.train.steps = c.train.eval_every = c.train.checkpoint_every = 10
    train(c, root / "run")
    shutil.rmtree(root / "data")
    shutil.rmtree(root / "text")
    return root / "run"


@pytest.fixture
def no_sentencepiece_training(monkeypatch):
    """A SentencePiece model trained again (on whatever data is at hand) is a test failure."""
    import lm.data.dataset as dataset_lib

    def refuse(*args, **kwargs):
        raise AssertionError("a SentencePiece model was trained instead of reusing the run's")

    monkeypatch.setattr(dataset_lib, "train_sentencepiece", refuse)


def test_a_sentencepiece_run_directory_alone_is_enough(sp_run, text_dir, no_sentencepiece_training):
    """Before: lm.generate and lm.evaluate looked for the tokenizer in the dataset's data_dir."""
    from lm.checkpoint import load_run
    from lm.evaluate import evaluate

    config, _, params, step, tokenizer = load_run(sp_run)
    assert step == 10 and tokenizer.path == sp_run / "tokenizer.model" and "embed" in params
    assert tokenizer.vocab_size == SP_VOCAB and tokenizer.decode(tokenizer.encode("The fox")) == "The fox"
    r = evaluate(sp_run, text_dir=str(text_dir), max_batches=1)  # other text, the run's own pieces
    assert r["step"] == 10 and math.isfinite(r["loss"]) and r["bytes"] > r["tokens"]
    with pytest.raises(ConfigError, match=r"text_dir = .* is not a folder"):  # its own text is gone
        evaluate(sp_run)
    proc = subprocess.run([sys.executable, "-m", "lm.generate", f"--workdir={sp_run}", "--prompt=The",
                           "--max_new_tokens=4", "--temperature=0"], cwd=sp_run.parent,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The") and "--- sample" not in proc.stdout, proc.stdout  # streamed


def test_fine_tuning_a_sentencepiece_run_keeps_its_pieces(config, sp_run, text_dir,
                                                          no_sentencepiece_training):
    """Before: `train.init_from` with a SentencePiece config trained new pieces on the new data
    (the trainer tokenizes with, and copies into its workdir, the dataset's tokenizer)."""
    from lm.data import build_dataset

    config.data.update(dataset="folder", text_dir=str(text_dir), tokenizer="sentencepiece",
                       sp_vocab_size=SP_VOCAB)
    config.model.vocab_size = SP_VOCAB
    config.train.init_from = str(sp_run)
    assert build_dataset(config).tokenizer.path == sp_run / "tokenizer.model"
    other = sp_run.parent / "other"
    other.mkdir(exist_ok=True)
    (other / "tokenizer.model").write_bytes((sp_run / "tokenizer.model").read_bytes())
    config.data.tokenizer_path = str(other / "tokenizer.model")  # named explicitly: that one
    assert build_dataset(config).tokenizer.path == other / "tokenizer.model"
