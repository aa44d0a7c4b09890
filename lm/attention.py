"""Causal self-attention of rotated q, k and v [batch, length, heads, head_dim], one function
for every implementation: `xla` (and `auto`: JAX's choice, today XLA's), `cudnn` (cuDNN's
fused flash attention on NVIDIA GPUs, bf16) and `blockwise` (plain JAX that never computes a
fully masked block). The C++ CPU kernel takes their place through `lm.kernels`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# Query block of the blockwise attention: each block's scores stay in cache, and its products
# are not dominated by overhead (docs/benchmarks.md).
BLOCK = 64


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "auto") -> jax.Array:
    """softmax(q kᵀ / √d, causal) v with the implementation `impl` (see the module docstring)."""
    if impl == "blockwise":
        return blockwise_causal_attention(q, k, v, BLOCK)
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
