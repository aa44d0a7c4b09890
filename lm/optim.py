"""AdamW with decoupled weight decay, global-norm clipping and the learning-rate schedules.

Schedules are functions of the update index t = 0 … steps-1, so "the last step" is exact:
cosine reaches `final_frac`·peak on update steps-1 (a cycle longer than the run would bias
a scaling study), and WSD cools down to 0 over the last `cooldown_frac` of the run.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax

from lm.config import fail

NO_DECAY = ("attn_norm", "q_norm", "k_norm", "mlp_norm", "final_norm")  # norms (the model has no biases)
EMBEDDINGS = ("embed", "unembed")


def peak_lr(o: ml_collections.ConfigDict, d_model: int) -> float:
    """Peak learning rate after the width rule: `inverse_width` scales it by base_width/d_model;
    `fitted` is a sweep's rule, which its planner has replaced in every run it plans."""
    if o.lr_rule == "fitted":
        fail("optim.lr_rule", o.lr_rule, "a run takes 'constant' or 'inverse_width' ('fitted' is an "
             "IsoFLOP sweep's rule, which its planner resolves into each run's LR from "
             "`python -m experiments.tune`)")
    lr = o.peak_lr * (o.base_width / d_model if o.lr_rule == "inverse_width" else 1.0)
    return min(lr, o.max_lr)


def schedule_args(o: ml_collections.ConfigDict, peak: float, steps: int) -> dict[str, float]:
    """The numbers of a run's schedule: inputs of the compiled step, not constants in it, so
    runs that differ only in LR or length (a tuning grid, a sweep's budgets) share one program."""
    return {"peak": peak, "warmup": o.warmup_steps or round(o.warmup_frac * steps),
            "last": max(steps - 1, 1), "cooldown": steps - round(o.cooldown_frac * steps)}


def schedule(o: ml_collections.ConfigDict, args: dict) -> optax.Schedule:
    """Linear warmup from 0, then cosine, warmup-stable-decay or constant (`args`: schedule_args)."""
    warmup, last, start = args["warmup"], args["last"], args["cooldown"]

    def lr(t):
        t = jnp.asarray(t, jnp.float32)
        ramp = jnp.minimum(1.0, (t + 1) / jnp.maximum(warmup, 1))
        if o.schedule == "cosine":
            p = jnp.clip((t - warmup) / jnp.maximum(last - warmup, 1), 0.0, 1.0)
            shape = o.final_frac + (1 - o.final_frac) * 0.5 * (1 + jnp.cos(jnp.pi * p))
        elif o.schedule == "wsd":
            p = jnp.clip((t - start + 1) / jnp.maximum(last - start + 1, 1), 0.0, 1.0)
            shape = 1 - (jnp.sqrt(p) if o.cooldown_shape == "1-sqrt" else p)
        else:
            shape = 1.0
        return args["peak"] * jnp.where(t < warmup, ramp, shape)

    return lr


def decay_mask(params: dict, decay_embeddings: bool) -> dict:
    """True where weight decay applies: matrices, not norms (and embeddings only by choice)."""
    return {name: name not in NO_DECAY and (decay_embeddings or name not in EMBEDDINGS)
            for name in params}


def make_optimizer(o: ml_collections.ConfigDict, lr: optax.Schedule, params: dict,
                   ) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    parts.append(optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=decay_mask(params, o.decay_embeddings)))
    return optax.chain(*parts)
