"""Sample text from a checkpoint: `python -m lm.generate --workdir=DIR --prompt=TEXT`.

Decoding uses a fixed-size key/value cache, so one compiled step serves every position.
Prompts of different lengths share a batch: at position t a sequence still reading its
prompt is fed its prompt token, the others their last sample. Temperature 0 is greedy.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.config import ConfigError


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """ConfigError naming the first sampling setting that means nothing (a negative temperature,
    top_p = 0, ...), before anything is loaded or compiled."""
    rules = (("max_new_tokens", max_new_tokens, max_new_tokens >= 1, "must be a positive integer"),
             ("temperature", temperature, 0 <= temperature < math.inf,
              "must be a finite number >= 0 (0 is greedy)"),
             ("top_k", top_k, top_k >= 0, "must be >= 0 (0 keeps every token)"),
             ("top_p", top_p, 0 < top_p <= 1, "must lie in (0, 1] (1 keeps every token)"))
    for name, value, ok, rule in rules:
        if not ok:
            raise ConfigError(f"{name} = {value!r} is not allowed: {rule}")


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Scaled logits with everything outside the top-k / nucleus (top-p) set to -inf."""
    logits = logits.astype(jnp.float32) / temperature
    order = jnp.sort(logits, axis=-1)[..., ::-1]
    if top_k > 0:
        kth = order[..., min(top_k, logits.shape[-1]) - 1, None]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
        order = jnp.where(order < kth, -jnp.inf, order)
    if top_p < 1.0:
        probs = jax.nn.softmax(order, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        cutoff = jnp.min(jnp.where(before < top_p, order, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample(key: jax.Array, logits: jax.Array, temperature: float, top_k: int, top_p: float,
           ) -> jax.Array:
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p), axis=-1)


def make_decoder(graphdef, temperature: float, top_k: int, top_p: float):
    """One jitted step: (params, cache, token, t, key) -> (next token, logits, cache)."""

    @jax.jit
    def step(params, cache, tokens, t, key):
        logits, cache = nnx.merge(graphdef, params).decode(tokens, cache, t)
        return sample(key, logits, temperature, top_k, top_p), logits, cache

    return step


def generate(graphdef, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             context: int, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, eos_id: int | None = None,
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens (stopping at `eos_id`)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    lengths = [len(p) for p in prompts]
    if not lengths or min(lengths) < 1:
        raise ConfigError(f"prompts: {len(prompts)} given, and every one needs at least one token")
    if max(lengths) + max_new_tokens > context:
        raise ConfigError(
            f"prompt of {max(lengths)} tokens + max_new_tokens={max_new_tokens} exceeds the "
            f"model's context of {context} tokens")
    batch = np.zeros((len(prompts), max(lengths)), np.int32)
    for i, p in enumerate(prompts):
        batch[i, : len(p)] = p
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(len(prompts), context)
    step = make_decoder(graphdef, temperature, top_k, top_p)
    key = jax.random.key(seed)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    token = jnp.asarray(batch[:, 0])
    for t in range(max(lengths) + max_new_tokens - 1):
        key, sub = jax.random.split(key)
        nxt, _, cache = step(params, cache, token, jnp.int32(t), sub)
        nxt = np.asarray(nxt)
        feed = np.empty_like(nxt)
        for i, n in enumerate(lengths):
            if t + 1 < n:
                feed[i] = batch[i, t + 1]  # still reading the prompt
            else:
                feed[i] = nxt[i]
                if not done[i] and len(outputs[i]) < max_new_tokens:
                    outputs[i].append(int(nxt[i]))
                    done[i] = nxt[i] == eos_id or len(outputs[i]) == max_new_tokens
                    if on_token:
                        on_token(i, int(nxt[i]))
        if done.all():
            break
        token = jnp.asarray(feed)
    return outputs


class Streamer:
    """Prints the decoded text of sequence 0 as it grows (whole characters only)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, index: int, token: int) -> None:
        if index:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd") and text.startswith(self.shown):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text


def main(argv: list[str]) -> None:
    from absl import flags

    from lm import cli

    flags.DEFINE_string("workdir", "", "run directory")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
    flags.DEFINE_multi_string("prompt", [], "prompt text (repeat the flag for a batch)")
    flags.DEFINE_integer("max_new_tokens", 200, "tokens to generate per sample")
    flags.DEFINE_float("temperature", 0.8, "0 = greedy")
    flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0 = all)")
    flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1 = off)")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_integer("num_samples", 1, "samples per prompt")

    def body() -> None:
        from lm.checkpoint import load_run
        from lm.process import setup

        f = flags.FLAGS
        if not f.workdir or not f.prompt:
            raise ConfigError("--workdir (a run directory) and --prompt (repeatable) are required")
        if f.num_samples < 1:
            raise ConfigError(f"num_samples = {f.num_samples} is not allowed: must be a positive integer")
        check_sampling(f.max_new_tokens, f.temperature, f.top_k, f.top_p)
        setup()
        config, graphdef, params, step, tokenizer = load_run(f.workdir, f.step)
        context = config.data.seq_len
        prompts = [tokenizer.encode(p).tolist() for p in f.prompt for _ in range(f.num_samples)]
        for text, ids in zip(f.prompt, prompts[:: f.num_samples], strict=True):
            if not 0 < len(ids) <= context:
                raise ConfigError(f"--prompt={text[:40]!r} is {len(ids)} tokens: a prompt needs 1 to "
                                  f"the model's context of {context} tokens")
        stream = len(prompts) == 1
        if stream:
            print(f.prompt[0], end="", flush=True)
        outs = generate(graphdef, params, prompts, f.max_new_tokens, context,
                        temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
                        seed=f.seed, eos_id=tokenizer.eos_id,
                        on_token=Streamer(tokenizer) if stream else None)
        if stream:
            print()
            return
        for i, out in enumerate(outs):
            print(f"--- sample {i} (prompt {i // f.num_samples}, step {step})")
            print(f.prompt[i // f.num_samples] + tokenizer.decode(out))

    cli.run(body, argv)


if __name__ == "__main__":
    main(sys.argv)
