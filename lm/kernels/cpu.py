"""The CPU forms of the model's primitives: C++ XLA FFI kernels (`cpu.cc`) for causal
attention and a 2-D transpose, the dense layer whose weight gradient uses that transpose, and
a GELU whose backward pass keeps only its input.

XLA:CPU runs the attention's batched small products single-threaded and every softmax step
as its own pass over memory, and it fuses transposes into slow elementwise loops; the
kernels parallelise over (batch, head) pairs on XLA's intra-op pool (docs/benchmarks.md has
the figures). The library is compiled once per host and source version with the system C++
compiler (`$CXX`, else `c++`) into the cache root; where that fails, `available()` is False
with a warning and `lm.kernels` uses the plain-JAX forms instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shlex
import subprocess
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from lm.files import cache_root, temporary_path
from lm.sharding import logical_to_spec

SOURCE = Path(__file__).with_name("cpu.cc")
_TARGETS = {"lm_attention_forward": "LmAttentionForward",
            "lm_attention_backward": "LmAttentionBackward", "lm_transpose": "LmTranspose"}


def _host_cpu() -> str:
    """The CPU's model and features: a library built with -march=native is only for these."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _compile_command(out: Path) -> list[str]:
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    return [*compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
            f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]


def build(directory: Path) -> Path:
    """The kernel library for this host in `directory`, compiled there unless already built.

    Raises RuntimeError with the compiler's command and message when compilation fails.
    """
    key = hashlib.sha256(b"\0".join([
        SOURCE.read_bytes(), jax.__version__.encode(), _host_cpu().encode(),
        " ".join(_compile_command(Path("out"))).encode()])).hexdigest()[:16]
    path = Path(directory) / f"cpu-{key}.so"
    if path.exists():
        return path
    tmp = temporary_path(path, ".so")
    command = _compile_command(tmp)
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
        raise RuntimeError(f"{shlex.join(command)}: {e}") from None
    try:
        if result.returncode:
            raise RuntimeError(f"{shlex.join(command)} failed:\n{result.stderr.strip()[-2000:]}")
        os.replace(tmp, path)  # atomic: concurrent builders (test workers, ranks) all succeed
    finally:
        tmp.unlink(missing_ok=True)
    return path


@functools.cache
def _library() -> ctypes.CDLL | None:
    """Build (or find in the cache), load and register the kernels; None with a warning."""
    try:  # a failed compile, an unwritable cache or a library that does not load
        lib = ctypes.cdll.LoadLibrary(str(build(cache_root() / "kernels")))
    except (OSError, RuntimeError) as e:
        warnings.warn(f"CPU kernels not available, using pure XLA instead: {e}", stacklevel=3)
        return None
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    return lib


def available() -> bool:
    """Whether the kernels are built and registered (they build on the first call)."""
    return _library() is not None


def _single_device() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or math.prod(mesh.shape.values()) == 1


def transpose(x: jax.Array) -> jax.Array:
    """xᵀ of a 2-D array that XLA can neither fuse nor fold into the next dot.

    The C++ copy on one CPU device; otherwise (no kernels, or a multi-device mesh, whose
    partitioner must see the transpose to keep shards local) an XLA transpose behind
    optimization barriers.
    """
    if x.dtype == jnp.float32 and _single_device() and available():
        return jax.ffi.ffi_call("lm_transpose", jax.ShapeDtypeStruct(x.shape[::-1], x.dtype))(x)
    return jax.lax.optimization_barrier(jax.lax.optimization_barrier(x).T)


def supports_attention(q: jax.Array) -> bool:
    """The attention kernel takes float32 [batch, length, heads, head_dim] q, k and v."""
    return q.ndim == 4 and q.dtype == jnp.float32


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Exact causal softmax attention [batch, length, heads, head_dim] of float32 q, k, v of
    that shape (q and k already rotated), as `lm.attention.causal_attention` computes it.

    Under a mesh each device runs the kernel on its own batch and head shard (shard_map);
    attention never mixes batch rows or heads, so no communication is needed.
    """
    if not (supports_attention(q) and q.shape == k.shape == v.shape
            and k.dtype == v.dtype == jnp.float32):
        raise ValueError(f"the CPU attention kernel takes float32 [batch, length, heads, head_dim]"
                         f" q, k, v of one shape; got {q.dtype}{list(q.shape)}, "
                         f"{k.dtype}{list(k.shape)}, {v.dtype}{list(v.shape)}")
    if not available():
        raise RuntimeError("the CPU kernels could not be built (see the warning above); "
                           "use model.kernels='xla'")
    if _single_device():
        return _attention(q, k, v)
    mesh = jax.sharding.get_abstract_mesh()
    spec = logical_to_spec(("batch", "length", "heads", "kv"), q.shape, mesh)
    # check_vma off: the custom call's outputs are per shard, exactly as out_specs says
    return jax.shard_map(_attention, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                         check_vma=False)(q, k, v)


def _forward(q, k, v):
    b, t, h, _ = q.shape
    o, lse = jax.ffi.ffi_call("lm_attention_forward", (
        jax.ShapeDtypeStruct(q.shape, jnp.float32),
        jax.ShapeDtypeStruct((b, h, t), jnp.float32)))(q, k, v)
    return o, (q, k, v, o, lse)


def _backward(res, g):
    shape = jax.ShapeDtypeStruct(res[0].shape, jnp.float32)
    return tuple(jax.ffi.ffi_call("lm_attention_backward", (shape,) * 3)(*res, g))


_attention = jax.custom_vjp(lambda q, k, v: _forward(q, k, v)[0])
_attention.defvjp(_forward, _backward)


def dense(x: jax.Array, w: jax.Array, axes: int = 1) -> jax.Array:
    """`jnp.tensordot(x, w, axes)` as one row-major 2-D matmul whose weight gradient transposes
    explicitly, the narrower of x and g: xᵀ·g, or (gᵀ·x)ᵀ.

    Autodiff's dw = xᵀ·g made XLA:CPU either materialise gᵀ in a strided copy fused with g's
    producer or pick a transposed layout that the next op read with a large stride.
    """
    lead, contracted, out = x.shape[:-axes], w.shape[:axes], w.shape[axes:]
    y = _dense(x.reshape(-1, math.prod(contracted)), w.reshape(math.prod(contracted), -1))
    return y.reshape(*lead, *out)


@jax.custom_vjp
def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
    return x @ w


def _dense_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    dw = transpose(transpose(g) @ x) if x.shape[1] > g.shape[1] else transpose(x) @ g
    return g @ w.T, dw


_dense.defvjp(lambda x, w: (_dense(x, w), (x, w)), _dense_bwd)

_GELU_C, _GELU_A = math.sqrt(2 / math.pi), 0.044715


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """tanh-approximate GELU (`jax.nn.gelu`'s value) whose backward pass keeps only x: autodiff
    through tanh saves five [tokens, d_ff] intermediates per layer, which the scan stacks."""
    return 0.5 * x * (1 + jnp.tanh(_GELU_C * (x + _GELU_A * x**3)))


def _gelu_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    t = jnp.tanh(_GELU_C * (x + _GELU_A * x**3))
    return (g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_A * x * x)),)


gelu.defvjp(lambda x: (gelu(x), x), _gelu_bwd)
