"""The model's swappable primitives behind one switch, `model.kernels`.

`REFERENCE` is plain JAX: what GPUs and TPUs run, what `model.kernels="xla"` runs everywhere,
and what the tests hold the CPU forms to. With `"auto"` on a CPU backend, `select` swaps in
the CPU forms of `lm.kernels.cpu` (C++ attention, dense layers with explicit transposes, a
leaner GELU backward); `configure_host` keeps freed memory mapped for CPU steps
(`lm.kernels.memory`). Nothing else in lm asks which backend it runs on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lm import attention


def _tensordot(x: jax.Array, w: jax.Array, axes: int = 1) -> jax.Array:
    """Contract the last `axes` dims of x with the first `axes` of w, keeping the named axes."""
    return jnp.tensordot(x, w, axes)


class Ops(NamedTuple):
    """dense(x, w, axes), gelu(x) and attention(q, k, v, impl), as the model calls them."""

    dense: Callable[..., jax.Array] = _tensordot
    gelu: Callable[[jax.Array], jax.Array] = functools.partial(jax.nn.gelu, approximate=True)
    attention: Callable[..., jax.Array] = attention.causal_attention


REFERENCE = Ops()


def _cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "auto") -> jax.Array:
    """The C++ kernel in place of `auto` where it takes the inputs, else blockwise attention;
    an explicitly chosen implementation is kept."""
    from lm.kernels import cpu

    if impl != "auto":
        return attention.causal_attention(q, k, v, impl)
    if cpu.supports_attention(q) and cpu.available():
        return cpu.causal_attention(q, k, v)
    return attention.causal_attention(q, k, v, "blockwise")


@functools.cache
def _cpu_ops() -> Ops:
    from lm.kernels import cpu

    return Ops(dense=cpu.dense, gelu=cpu.gelu, attention=_cpu_attention)


def use_cpu_kernels(kernels: str) -> bool:
    """Whether `model.kernels = kernels` means the CPU forms in this process."""
    return kernels == "auto" and jax.default_backend() == "cpu"


def select(cfg) -> Ops:
    """The primitives a model config runs with (`cfg` is `config.model`)."""
    return _cpu_ops() if use_cpu_kernels(cfg.kernels) else REFERENCE


def cpu_only() -> bool:
    """Whether this process can only run JAX on the CPU, known without starting a backend:
    JAX_PLATFORMS says so, or no accelerator plugin (CUDA, ROCm, TPU) is installed."""
    from importlib import metadata, util

    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0] == "cpu"
    return not (metadata.entry_points(group="jax_plugins") or util.find_spec("jax_plugins")
                or util.find_spec("libtpu"))


def configure_host() -> None:
    """Per-process CPU tuning (freed memory kept mapped, within a bound); nothing elsewhere.

    It must run before the backend starts: the runtime's threads would otherwise have taken
    their own malloc arenas already, and the retention would not reach them."""
    if cpu_only():
        from lm.kernels import memory

        memory.retain_within_bound()
