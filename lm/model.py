"""Decoder-only transformer in Flax NNX with logical axis names on every parameter.

Pre-norm RMSNorm blocks, rotary positions, causal attention (`lm.attention`; optionally
QK-norm), GELU or SwiGLU MLP, optional tied embeddings. The layers' parameters are stacked
on a leading `layers` axis and applied with `jax.lax.scan`, so compile time does not grow
with depth. Parameters are float32; compute uses `model.dtype`. The projections, GELU and
attention are the primitives of `lm.kernels.select(cfg)`: plain JAX unless `model.kernels`
swaps in the CPU forms.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lm import kernels
from lm.config import head_dim
from lm.sharding import constrain

Params = dict[str, Any]

def _param(key: jax.Array, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float,
           ) -> nnx.Param:
    """A float32 parameter with its logical axis names stored as `axes` metadata."""
    value = std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) if std else (
        jnp.ones(shape, jnp.float32))
    return nnx.Param(value, axes=axes)


class Transformer(nnx.Module):
    """Token ids [batch, length] -> float32 logits [batch, length, vocab]."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: graphdefs are jit static args
        self.cfg = cfg
        d, n_layers, v, f = cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.d_ff
        h, k = cfg.n_heads, head_dim(cfg)
        std, out_std = cfg.init_std, cfg.init_std / (2 * n_layers) ** 0.5
        ff_in = (n_layers, d, 2, f) if cfg.activation == "swiglu" else (n_layers, d, f)
        ff_axes = ("layers", "embed", "gate", "mlp") if cfg.activation == "swiglu" else (
            "layers", "embed", "mlp")
        self.embed = _param(rngs.params(), (v, d), ("vocab", "embed"), std)
        self.attn_norm = _param(None, (n_layers, d), ("layers", "norm"), 0)
        if cfg.qk_norm:
            self.q_norm = _param(None, (n_layers, k), ("layers", "norm"), 0)
            self.k_norm = _param(None, (n_layers, k), ("layers", "norm"), 0)
        self.wqkv = _param(rngs.params(), (n_layers, d, 3, h, k),
                           ("layers", "embed", "qkv", "heads", "kv"), std)
        self.wo = _param(rngs.params(), (n_layers, h, k, d), ("layers", "heads", "kv", "embed"),
                         out_std)
        self.mlp_norm = _param(None, (n_layers, d), ("layers", "norm"), 0)
        self.w_in = _param(rngs.params(), ff_in, ff_axes, std)
        self.w_out = _param(rngs.params(), (n_layers, f, d), ("layers", "mlp", "embed"), out_std)
        self.final_norm = _param(None, (d,), ("norm",), 0)
        self.unembed = None if cfg.tied_embeddings else _param(
            rngs.params(), (d, v), ("embed", "vocab"), std)

    def layer_params(self) -> Params:
        """The stacked per-layer parameters, as a dict the scan slices along axis 0."""
        names = ("attn_norm", "wqkv", "wo", "mlp_norm", "w_in", "w_out") + (
            ("q_norm", "k_norm") if self.cfg.qk_norm else ())
        return {name: getattr(self, name)[...] for name in names}

    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg, ops = self.cfg, kernels.select(self.cfg)
        x = self.embed_tokens(tokens)
        sin, cos = rope_tables(jnp.arange(tokens.shape[1]), head_dim(cfg), cfg.rope_theta)

        def body(x, p):
            return block(cfg, ops, p, x, sin, cos), None

        if cfg.remat != "none":
            policy = None if cfg.remat == "full" else jax.checkpoint_policies.checkpoint_dots
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        x, _ = jax.lax.scan(body, x, self.layer_params(), unroll=cfg.unroll_layers)
        return self.logits(x)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Token ids [batch, length] -> activations [batch, length, d_model] in the compute dtype."""
        x = jnp.take(self.embed[...], tokens, axis=0).astype(jnp.dtype(self.cfg.dtype))
        return constrain(x, ("batch", "length", "embed"))

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and output head: [batch, length, d_model] -> float32 logits."""
        x = rms_norm(x, self.final_norm[...], self.cfg.norm_eps)
        w = self.embed[...].T if self.unembed is None else self.unembed[...]
        logits = jnp.einsum("btd,dv->btv", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))

    def init_cache(self, batch: int, length: int) -> dict[str, jax.Array]:
        """Empty key/value cache [layers, batch, length, heads, head_dim] in the compute dtype."""
        cfg = self.cfg
        shape = (cfg.n_layers, batch, length, cfg.n_heads, head_dim(cfg))
        return {"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}

    def decode(self, tokens: jax.Array, cache: dict[str, jax.Array], t: jax.Array,
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """One decoding step: tokens [batch] at position t -> logits [batch, vocab], new cache.

        The cache has a fixed length, so this compiles once for any t; keys after t are masked.
        """
        cfg, ops = self.cfg, kernels.select(self.cfg)
        x = self.embed_tokens(tokens[:, None])
        sin, cos = rope_tables(t[None], head_dim(cfg), cfg.rope_theta)
        length = cache["k"].shape[2]
        visible = (jnp.arange(length) <= t)[None, None, :]

        def body(x, layer):
            p, k_cache, v_cache = layer
            q, k, v = split_rope(cfg, p, qkv_proj(cfg, ops, p, x), sin, cos)
            k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), t, 1)
            v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), t, 1)
            scores = jnp.einsum("bhk,bshk->bhs", q[:, 0], k_cache,
                                preferred_element_type=jnp.float32) / jnp.sqrt(q.shape[-1])
            probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
            o = jnp.einsum("bhs,bshk->bhk", probs.astype(x.dtype), v_cache)[:, None]
            x = x + ops.dense(o, p["wo"].astype(x.dtype), 2)
            return x + mlp(cfg, ops, p, x), (k_cache, v_cache)

        x, (k_new, v_new) = jax.lax.scan(body, x, (self.layer_params(), cache["k"], cache["v"]))
        return self.logits(x)[:, 0], {"k": k_new, "v": v_new}


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps) * scale
    return y.astype(x.dtype)


def rope_tables(positions: jax.Array, dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """sin/cos tables [length, dim // 2] for rotary embeddings at the given positions."""
    freqs = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate (first half, second half) pairs of x [batch, length, heads, dim]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin[:, None, :], cos[:, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def qkv_proj(cfg, ops: kernels.Ops, p: Params, x: jax.Array) -> jax.Array:
    """Normed input -> the fused projection qkv [batch, length, 3, heads, head_dim]."""
    h = rms_norm(x, p["attn_norm"], cfg.norm_eps)
    return ops.dense(h, p["wqkv"].astype(x.dtype))


def split_rope(cfg, p: Params, qkv: jax.Array, sin: jax.Array, cos: jax.Array):
    """qkv -> rotated q, k (each head's normed first with `qk_norm`) and v [batch, length, heads,
    head_dim]. The norm bounds the attention logits, which otherwise grow at high learning rates
    (Dehghani et al. 2023; Wortsman et al. 2023)."""
    # split, not indexing: its gradient is one concatenate (indexing's is three padded adds)
    q, k, v = (t[:, :, 0] for t in jnp.split(qkv, 3, axis=2))
    if cfg.qk_norm:
        q, k = rms_norm(q, p["q_norm"], cfg.norm_eps), rms_norm(k, p["k_norm"], cfg.norm_eps)
    return apply_rope(q, sin, cos), apply_rope(k, sin, cos), v


def mlp(cfg, ops: kernels.Ops, p: Params, x: jax.Array) -> jax.Array:
    """The feed-forward half of a block: norm, GELU or SwiGLU, projection back to d_model."""
    h = rms_norm(x, p["mlp_norm"], cfg.norm_eps)
    if cfg.activation == "swiglu":
        gu = ops.dense(h, p["w_in"].astype(x.dtype))  # [batch, length, 2, d_ff]
        u = jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]
    else:
        u = ops.gelu(ops.dense(h, p["w_in"].astype(x.dtype)))
    u = constrain(u, ("batch", "length", "mlp"))
    return ops.dense(u, p["w_out"].astype(x.dtype))


def block(cfg, ops: kernels.Ops, p: Params, x: jax.Array, sin: jax.Array, cos: jax.Array,
          ) -> jax.Array:
    """One pre-norm transformer block over a full (causal) sequence."""
    q, k, v = split_rope(cfg, p, qkv_proj(cfg, ops, p, x), sin, cos)
    q = constrain(q, ("batch", "length", "heads", "kv"))
    o = ops.attention(q, k, v, cfg.attention)
    x = x + ops.dense(o, p["wo"].astype(x.dtype), 2)
    x = constrain(x, ("batch", "length", "embed"))
    x = x + mlp(cfg, ops, p, x)
    return constrain(x, ("batch", "length", "embed"))


def token_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood of `targets` and log Z, both float32 [batch, length]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    return log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], log_z


def cross_entropy(logits: jax.Array, targets: jax.Array, z_loss: float = 0.0,
                  ) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy, and the same plus z_loss·mean(log Z²)."""
    nll, log_z = token_nll(logits, targets)
    ce = jnp.mean(nll)
    return ce, ce + z_loss * jnp.mean(log_z**2)


def logical_axes(state: nnx.State):
    """Tree of logical axis tuples matching the (pure) parameter tree of `state`."""
    return nnx.to_pure_dict(jax.tree.map(
        lambda v: v.get_metadata()["axes"], state, is_leaf=lambda v: isinstance(v, nnx.Variable)))


def abstract_model(cfg: ml_collections.ConfigDict, seed: int = 0):
    """(graphdef, abstract pure param dict, logical axes) without allocating anything."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state), logical_axes(state)


def init_params(cfg: ml_collections.ConfigDict, seed: int | jax.Array, shardings=None) -> Params:
    """Initialise the pure parameter dict, directly into `shardings` when given (no host copy).
    The seed is an input of the program, not a constant in it: every seed of a shape is one
    program (and the same parameters as `nnx.Rngs(seed)`)."""

    def make(seed: jax.Array) -> Params:
        return nnx.to_pure_dict(nnx.split(Transformer(cfg, rngs=nnx.Rngs(jax.random.key(seed))))[1])

    return jax.jit(make, out_shardings=shardings)(jnp.asarray(seed, jnp.int32))


def apply(graphdef: nnx.GraphDef, params: Params, tokens: jax.Array) -> jax.Array:
    """Pure forward pass: merge happens at trace time, so jitted callers pay nothing per step."""
    return nnx.merge(graphdef, params)(tokens)
