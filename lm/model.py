"""Decoder-only transformer in Flax NNX with logical axis names on every parameter.

Pre-norm RMSNorm blocks, rotary positions, causal attention (blockwise on CPU, else through
`jax.nn.dot_product_attention`), GELU or SwiGLU MLP, optional tied embeddings. The layers'
parameters are stacked on a leading `layers` axis and applied with `jax.lax.scan`, so
compile time does not grow with depth. Parameters are float32; compute uses `model.dtype`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lm import cpu_kernels
from lm.config import head_dim
from lm.sharding import constrain

Params = dict[str, Any]

# Query block of the blockwise causal attention: small enough that each block's scores stay in
# cache, large enough that the per-block matmuls are not dominated by overhead (64 measured best
# on CPU for T = 256 and 512, see docs/benchmarks.md).
ATTENTION_BLOCK = 64


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
        names = ("attn_norm", "wqkv", "wo", "mlp_norm", "w_in", "w_out")
        return {name: getattr(self, name)[...] for name in names}

    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        x = constrain(x, ("batch", "length", "embed"))
        positions = jnp.arange(tokens.shape[1])
        sin, cos = rope_tables(positions, head_dim(cfg), cfg.rope_theta)

        def body(x, p):
            return block(cfg, p, x, sin, cos), None

        if cfg.remat != "none":
            policy = None if cfg.remat == "full" else jax.checkpoint_policies.checkpoint_dots
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        x, _ = jax.lax.scan(body, x, self.layer_params(), unroll=cfg.unroll_layers)
        x = rms_norm(x, self.final_norm[...], cfg.norm_eps)
        w = self.embed[...].T if self.unembed is None else self.unembed[...]
        logits = jnp.einsum("btd,dv->btv", x, w.astype(dtype), preferred_element_type=jnp.float32)
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
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        x = jnp.take(self.embed[...], tokens[:, None], axis=0).astype(dtype)
        sin, cos = rope_tables(t[None], head_dim(cfg), cfg.rope_theta)
        length = cache["k"].shape[2]
        visible = (jnp.arange(length) <= t)[None, None, :]

        def body(x, layer):
            p, k_cache, v_cache = layer
            q, k, v = split_rope(qkv_proj(cfg, p, x), sin, cos)
            k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), t, 1)
            v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), t, 1)
            scores = jnp.einsum("bhk,bshk->bhs", q[:, 0], k_cache,
                                preferred_element_type=jnp.float32) / jnp.sqrt(q.shape[-1])
            probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
            o = jnp.einsum("bhs,bshk->bhk", probs.astype(dtype), v_cache)[:, None]
            x = x + dense(o, p["wo"].astype(dtype), axes=2)
            return x + mlp(cfg, p, x), (k_cache, v_cache)

        x, (k_new, v_new) = jax.lax.scan(body, x, (self.layer_params(), cache["k"], cache["v"]))
        x = rms_norm(x, self.final_norm[...], cfg.norm_eps)
        w = self.embed[...].T if self.unembed is None else self.unembed[...]
        logits = jnp.einsum("btd,dv->btv", x, w.astype(dtype), preferred_element_type=jnp.float32)
        return logits[:, 0], {"k": k_new, "v": v_new}


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


def causal_attention(cfg, qkv: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Causal self-attention [batch, length, heads, head_dim] of the fused projection qkv
    [batch, length, 3, heads, head_dim], with rotary positions from the tables sin, cos.

    'auto' is, on CPU, the C++ flash-attention kernel (`lm.cpu_kernels`, which also applies
    the rotary embedding) for float32 when it could be built, else the blockwise attention
    below; elsewhere it lets JAX choose (cuDNN flash attention on GPUs when it applies).
    'kernel', 'blockwise', 'xla' and 'cudnn' force one.
    """
    impl = cfg.attention
    if impl == "auto" and jax.default_backend() == "cpu":
        impl = "kernel" if cpu_kernels.supports_attention(qkv) and cpu_kernels.available() else (
            "blockwise")
    if impl == "kernel":
        return cpu_kernels.causal_attention(qkv, sin, cos)
    q, k, v = split_rope(qkv, sin, cos)
    q = constrain(q, ("batch", "length", "heads", "kv"))
    if impl == "blockwise":
        return blockwise_causal_attention(q, k, v, ATTENTION_BLOCK)
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=None if impl == "auto" else impl)


def blockwise_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int,
                               ) -> jax.Array:
    """Exact causal attention that never computes a fully masked block, flash-style.

    Query block [s, e) attends to keys [0, e) only, so the work is (n + 1) / 2n of the full
    T×T product for n blocks, and each softmax is a cache-sized [block, e] slab. The backward
    pass recomputes each block's probabilities from the saved log-sum-exp (FlashAttention's
    trade: one more QKᵀ per block) instead of keeping them, so the layer scan stacks only q, k,
    v, the output and the log-sum-exp per layer. Heads are moved ahead of positions once, so
    every block's keys are a contiguous slice. Scores and softmax are float32.
    """
    return _blockwise(block, q, k, v)


def _heads_major(x: jax.Array) -> jax.Array:
    return x.transpose(0, 2, 1, 3)  # [batch, length, heads, dim] <-> [batch, heads, length, dim]


def _visible(start: int, end: int) -> np.ndarray:
    """[query, key] mask of queries [start, end) over keys [0, end)."""
    return np.arange(end)[None, :] <= np.arange(start, end)[:, None]


def _blockwise_fwd(block: int, q: jax.Array, k: jax.Array, v: jax.Array):
    qh = _heads_major(q * jnp.asarray(1 / math.sqrt(q.shape[-1]), q.dtype))
    kh, vh = _heads_major(k), _heads_major(v)
    outs, lses = [], []
    for start in range(0, q.shape[1], block):
        end = min(start + block, q.shape[1])
        s = jnp.einsum("bhqd,bhsd->bhqs", qh[:, :, start:end], kh[:, :, :end],
                       preferred_element_type=jnp.float32)
        s = jnp.where(_visible(start, end), s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        total = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bhqs,bhsd->bhqd", p.astype(v.dtype), vh[:, :, :end],
                       preferred_element_type=jnp.float32) / total
        outs.append(o.astype(v.dtype))
        lses.append((m + jnp.log(total))[..., 0])
    oh = jnp.concatenate(outs, axis=2)
    return _heads_major(oh), (qh, kh, vh, oh, jnp.concatenate(lses, axis=2))


def _blockwise_bwd(block: int, res, g: jax.Array):
    """Per query block, in key-major [key, query] orientation so that dk and dv are plain
    row-major matmuls; only dq needs the transposed block (XLA:CPU ran the transposed-operand
    products through a slow fallback, ~10 GFLOP/s)."""
    qh, kh, vh, oh, lse = res
    length, scale = qh.shape[2], 1 / math.sqrt(qh.shape[-1])
    gh = _heads_major(g)
    delta = jnp.sum(gh.astype(jnp.float32) * oh.astype(jnp.float32), axis=-1)
    starts = range(0, length, block)
    dq, dk_parts, dv_parts = [], [[] for _ in starts], [[] for _ in starts]
    for i, start in enumerate(starts):
        end = min(start + block, length)
        q_i, g_i, k_e, v_e = qh[:, :, start:end], gh[:, :, start:end], kh[:, :, :end], vh[:, :, :end]
        s_t = jnp.einsum("bhsd,bhqd->bhsq", k_e, q_i, preferred_element_type=jnp.float32)
        p_t = jnp.where(_visible(start, end).T, jnp.exp(s_t - lse[:, :, None, start:end]), 0.0)
        dp_t = jnp.einsum("bhsd,bhqd->bhsq", v_e, g_i, preferred_element_type=jnp.float32)
        ds_t = (p_t * (dp_t - delta[:, :, None, start:end])).astype(qh.dtype)
        ds = jax.lax.optimization_barrier(ds_t.swapaxes(2, 3))
        dq.append(jnp.einsum("bhqs,bhsd->bhqd", ds, k_e) * jnp.asarray(scale, qh.dtype))
        dk = jnp.einsum("bhsq,bhqd->bhsd", ds_t, q_i)
        dv = jnp.einsum("bhsq,bhqd->bhsd", p_t.astype(g.dtype), g_i)
        for j in range(i + 1):  # key block j of this query block's contribution
            dk_parts[j].append(dk[:, :, j * block:(j + 1) * block])
            dv_parts[j].append(dv[:, :, j * block:(j + 1) * block])
    total = lambda parts: _heads_major(jnp.concatenate([sum(x) for x in parts], axis=2))  # noqa: E731
    return _heads_major(jnp.concatenate(dq, axis=2)), total(dk_parts), total(dv_parts)


_blockwise = jax.custom_vjp(lambda block, q, k, v: _blockwise_fwd(block, q, k, v)[0],
                            nondiff_argnums=(0,))
_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


_GELU_C, _GELU_A = math.sqrt(2 / math.pi), 0.044715


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """tanh-approximate GELU (the value of `jax.nn.gelu`) whose backward pass keeps only x.

    Autodiff through tanh saves five [tokens, d_ff] intermediates per layer, which the layer
    scan stacks for every layer; recomputing tanh in the backward pass is cheaper than that.
    """
    return 0.5 * x * (1 + jnp.tanh(_GELU_C * (x + _GELU_A * x**3)))


def _gelu_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    t = jnp.tanh(_GELU_C * (x + _GELU_A * x**3))
    return (g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_A * x * x)),)


gelu.defvjp(lambda x: (gelu(x), x), _gelu_bwd)


def dense(x: jax.Array, w: jax.Array, axes: int = 1) -> jax.Array:
    """Contract the last `axes` dims of x with the first `axes` dims of w (`jnp.tensordot`).

    On CPU this is one row-major 2-D matmul whose weight gradient transposes explicitly:
    autodiff writes dw = xᵀ·g, and XLA:CPU then either materialised gᵀ in a strided copy
    fused with g's producer or picked a transposed output layout that the next elementwise op
    read with a large stride; both cost more than the matmul. The gradient transposes the
    narrower of x and g: xᵀ·g, or (gᵀ·x)ᵀ with only the small [d_out, d_in] product
    transposed after it (w_out's [tokens, d_ff] input took 85 ms per layer at d=512 as xᵀ·g,
    53 ms this way), through `cpu_kernels.transpose`, which XLA can neither fuse into a slow
    loop nor fold back into the dot. Other backends take the plain `tensordot`, which keeps
    every named axis for sharding.
    """
    if jax.default_backend() != "cpu":
        return jnp.tensordot(x, w, axes)
    lead, contracted, out = x.shape[:-axes], w.shape[:axes], w.shape[axes:]
    y = _dense_cpu(x.reshape(-1, math.prod(contracted)), w.reshape(math.prod(contracted), -1))
    return y.reshape(*lead, *out)


@jax.custom_vjp
def _dense_cpu(x: jax.Array, w: jax.Array) -> jax.Array:
    return x @ w


def _dense_cpu_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    t = cpu_kernels.transpose
    dw = t(t(g) @ x) if x.shape[1] > g.shape[1] else t(x) @ g  # transpose the narrower
    return g @ w.T, dw


_dense_cpu.defvjp(lambda x, w: (_dense_cpu(x, w), (x, w)), _dense_cpu_bwd)


def qkv_proj(cfg, p: Params, x: jax.Array) -> jax.Array:
    """Normed input -> the fused projection qkv [batch, length, 3, heads, head_dim]."""
    h = rms_norm(x, p["attn_norm"], cfg.norm_eps)
    return dense(h, p["wqkv"].astype(x.dtype))


def split_rope(qkv: jax.Array, sin: jax.Array, cos: jax.Array):
    """qkv -> rotated q, k and v [batch, length, heads, head_dim]."""
    # split, not indexing: its gradient is one concatenate (indexing's is three padded adds)
    q, k, v = (t[:, :, 0] for t in jnp.split(qkv, 3, axis=2))
    return apply_rope(q, sin, cos), apply_rope(k, sin, cos), v


def mlp(cfg, p: Params, x: jax.Array) -> jax.Array:
    h = rms_norm(x, p["mlp_norm"], cfg.norm_eps)
    if cfg.activation == "swiglu":
        gu = dense(h, p["w_in"].astype(x.dtype))  # [batch, length, 2, d_ff]
        u = jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]
    else:
        u = gelu(dense(h, p["w_in"].astype(x.dtype)))
    u = constrain(u, ("batch", "length", "mlp"))
    return dense(u, p["w_out"].astype(x.dtype))


def block(cfg, p: Params, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """One pre-norm transformer block over a full (causal) sequence."""
    o = causal_attention(cfg, qkv_proj(cfg, p, x), sin, cos)
    x = x + dense(o, p["wo"].astype(x.dtype), axes=2)
    x = constrain(x, ("batch", "length", "embed"))
    x = x + mlp(cfg, p, x)
    return constrain(x, ("batch", "length", "embed"))


def cross_entropy(logits: jax.Array, targets: jax.Array, z_loss: float = 0.0,
                  ) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy in float32, and the same plus z_loss·mean(log Z²)."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = jnp.mean(log_z - target_logit)
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


def init_params(cfg: ml_collections.ConfigDict, seed: int, shardings=None) -> Params:
    """Initialise the pure parameter dict, directly into `shardings` when given (no host copy)."""

    def make() -> Params:
        return nnx.to_pure_dict(nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))[1])

    return jax.jit(make, out_shardings=shardings)()


def apply(graphdef: nnx.GraphDef, params: Params, tokens: jax.Array) -> jax.Array:
    """Pure forward pass: merge happens at trace time, so jitted callers pay nothing per step."""
    return nnx.merge(graphdef, params)(tokens)
