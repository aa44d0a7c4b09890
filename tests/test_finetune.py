"""Using a trained run: held-out evaluation and fine-tuning from its checkpoint."""

import json
import math

import pytest

from lm.config import ConfigError

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
