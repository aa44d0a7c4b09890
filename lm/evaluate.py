"""Held-out evaluation of a checkpoint: `python -m lm.evaluate --workdir=DIR`.

Reports the token-weighted mean loss with its standard error (over windows), perplexity and
bits per byte, and writes eval.json. The training loop uses the same eval step, so the
final eval loss of a run is reproduced exactly.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm import model as model_lib
from lm.config import ConfigError


def make_eval_step(graphdef):
    """params, batch [B, T+1] -> summed next-token loss per window [B] (float32)."""

    def step(params, batch):
        logits = model_lib.apply(graphdef, params, batch[:, :-1])
        return jnp.sum(model_lib.token_nll(logits, batch[:, 1:])[0], axis=-1)

    return step


def summarize(window_losses: np.ndarray, tokens_per_window: int, n_bytes: int) -> dict[str, Any]:
    """Token-weighted mean loss, its standard error across windows, perplexity, bits per byte."""
    per_window = window_losses / tokens_per_window
    loss = float(window_losses.sum() / (len(window_losses) * tokens_per_window))
    se = float(per_window.std(ddof=1) / math.sqrt(len(per_window))) if len(per_window) > 1 else (
        float("nan"))
    return {"loss": loss, "loss_stderr": se, "perplexity": math.exp(loss),
            "bits_per_byte": float(window_losses.sum() / math.log(2) / max(n_bytes, 1)),
            "windows": len(window_losses), "tokens": len(window_losses) * tokens_per_window,
            "bytes": n_bytes}


SPLITS = ("validation", "train")


def check_arguments(step: int | None, dataset: str | None, max_batches: int, split: str,
                    text_dir: str | None) -> None:
    """ConfigError naming the first argument that means nothing, before anything is loaded."""
    if step is not None and step < 0:
        raise ConfigError(f"step = {step} is not allowed: must be >= 0 (or unset: the latest)")
    if max_batches < 0:
        raise ConfigError(f"max_batches = {max_batches} is not allowed: must be >= 0 "
                          "(0: the run's data.eval_batches)")
    if split not in SPLITS:
        raise ConfigError(f"split = {split!r} is not allowed: must be one of {', '.join(SPLITS)}")
    if dataset and text_dir:
        raise ConfigError(f"dataset = {dataset!r} and text_dir = {text_dir!r}: give one of them "
                          "(text_dir is dataset 'folder')")


def evaluate(workdir: str | Path, step: int | None = None, dataset: str | None = None,
             max_batches: int = 0, split: str = "validation", text_dir: str | None = None,
             ) -> dict[str, Any]:
    """Loss of a run's checkpoint on its own (or another) dataset; also written to eval.json."""
    from lm import data as data_lib
    from lm.checkpoint import load_run
    from lm.files import write_json_atomic

    check_arguments(step, dataset, max_batches, split, text_dir)
    workdir = Path(workdir)
    config, graphdef, params, step, _ = load_run(workdir, step)
    if dataset:
        config.data.dataset, config.data.text_dir = dataset, ""
    if text_dir:
        config.data.dataset, config.data.text_dir = "folder", text_dir
    if max_batches:
        config.data.eval_batches = max_batches
    ds = data_lib.build_dataset(config)
    eval_step = jax.jit(make_eval_step(graphdef))
    losses, n_bytes = [], 0
    batches = ds.eval_batches() if split == "validation" else (
        ds.train_batch(k) for k in range(config.data.eval_batches))
    for batch in batches:
        losses.append(np.asarray(eval_step(params, jnp.asarray(batch))))
        n_bytes += sum(ds.tokenizer.count_bytes(row) for row in batch[:, 1:])
    result = summarize(np.concatenate(losses), config.data.seq_len, n_bytes)
    result.update(step=step, dataset=config.data.dataset, split=split)
    write_json_atomic(workdir / "eval.json", result)
    return result


def main(argv: list[str]) -> None:
    from absl import flags

    from lm import cli

    flags.DEFINE_string("workdir", "", "run directory")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
    flags.DEFINE_string("dataset", None, "dataset to evaluate on (default: the run's)")
    flags.DEFINE_string("text_dir", None, "evaluate on this folder of .txt/.jsonl files instead")
    flags.DEFINE_string("split", "validation", "validation or train")
    flags.DEFINE_integer("max_batches", 0, "batches to evaluate (default: the run's eval_batches)")

    def body() -> None:
        from lm.process import setup

        f = flags.FLAGS
        if not f.workdir:
            raise ConfigError("--workdir is required: the run directory to evaluate")
        setup()
        r = evaluate(f.workdir, f.step, f.dataset, f.max_batches, f.split, f.text_dir)
        print(f"step {r['step']} on {r['dataset']}/{r['split']}: loss {r['loss']:.4f} "
              f"± {r['loss_stderr']:.4f} | perplexity {r['perplexity']:.3f} | "
              f"{r['bits_per_byte']:.4f} bits/byte | {r['tokens']:,} tokens "
              f"-> {Path(f.workdir) / 'eval.json'}")

    cli.run(body, argv)


if __name__ == "__main__":
    main(sys.argv)
