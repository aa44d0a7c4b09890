"""C++ kernels for XLA:CPU as XLA FFI custom calls (`cpu_kernels.cc`): causal flash
attention with rotary positions, and a 2-D transpose, both float32.

XLA:CPU runs the attention's batched small products single-threaded (40-60 GFLOP/s on a
core that does ~100 on 2-D products) and each softmax step as its own pass over memory; the
kernel parallelises over (batch, head) pairs on XLA's intra-op thread pool and keeps each
64-row block's scores and softmax in cache. It reads q, k and v from the fused
projection and rotates them itself, which saves XLA's split, rotary, residual and
concatenate passes over memory. XLA:CPU also fuses transposes into slow
elementwise loops (0.5-4 GB/s); the dense layers' weight gradients each need one.
docs/benchmarks.md has the figures.

The library is compiled once per host and source version with the system C++ compiler
(`$CXX`, else `c++`, `-O3 -march=native`) into the cache directory, then registered with
XLA. Where no compiler works, `available()` is False (with a warning saying why) and the
model falls back to pure XLA: the blockwise attention and barrier-guarded transposes.
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
from jax.sharding import PartitionSpec as P

from lm.files import cache_root as cache_dir
from lm.files import temporary_path
from lm.sharding import logical_to_spec

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
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
    path = Path(directory) / f"cpu_kernels-{key}.so"
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
        lib = ctypes.cdll.LoadLibrary(str(build(cache_dir() / "kernels")))
    except (OSError, RuntimeError) as e:
        warnings.warn(f"CPU kernels not available, using pure XLA instead: {e}", stacklevel=3)
        return None
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    return lib


def available() -> bool:
    """Whether the kernels are built and registered (they build on the first call)."""
    return jax.default_backend() == "cpu" and _library() is not None


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


def supports_attention(qkv: jax.Array) -> bool:
    """The attention kernel takes a float32 [batch, length, 3, heads, head_dim] qkv on CPU."""
    return (jax.default_backend() == "cpu" and qkv.ndim == 5 and qkv.shape[2] == 3
            and qkv.shape[-1] % 2 == 0 and qkv.dtype == jnp.float32)


def causal_attention(qkv: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Exact causal softmax attention [batch, length, heads, head_dim] of the fused
    projection qkv [batch, length, 3, heads, head_dim], float32, with q and k rotated by the
    rotary tables sin, cos [length, head_dim // 2] (`lm.model.apply_rope`) on the way in.

    Under a mesh each device runs the kernel on its own batch and head shard (shard_map);
    attention never mixes batch rows or heads, so no communication is needed.
    """
    if not supports_attention(qkv):
        raise ValueError(f"model.attention='kernel' takes a float32 [batch, length, 3, heads, "
                         f"head_dim] qkv (head_dim even) on CPU; got {qkv.dtype}{list(qkv.shape)} "
                         f"on {jax.default_backend()}")
    tables = (qkv.shape[1], qkv.shape[-1] // 2)
    if sin.shape != tables or cos.shape != tables:
        raise ValueError(f"rotary tables must be [length, head_dim // 2] = {list(tables)}; "
                         f"got sin{list(sin.shape)}, cos{list(cos.shape)}")
    if not available():
        raise RuntimeError("the CPU kernels could not be built (see the warning above); "
                           "use model.attention='blockwise'")
    sin, cos = sin.astype(jnp.float32), cos.astype(jnp.float32)
    if _single_device():
        return _attention(qkv, sin, cos)
    mesh = jax.sharding.get_abstract_mesh()
    spec = logical_to_spec(("batch", "length", "qkv", "heads", "kv"), qkv.shape, mesh)
    out_spec = P(*spec[:2], *spec[3:])  # the output has no qkv axis
    # check_vma off: the custom call's outputs are per shard, exactly as out_specs says
    return jax.shard_map(_attention, mesh=mesh, in_specs=(spec, P(), P()), out_specs=out_spec,
                         check_vma=False)(qkv, sin, cos)


def _forward(qkv, sin, cos):
    b, t, _, h, d = qkv.shape
    o, lse = jax.ffi.ffi_call("lm_attention_forward", (
        jax.ShapeDtypeStruct((b, t, h, d), jnp.float32),
        jax.ShapeDtypeStruct((b, h, t), jnp.float32)))(qkv, sin, cos)
    return o, (qkv, sin, cos, o, lse)


def _backward(res, g):
    qkv, sin, cos = res[:3]
    dqkv = jax.ffi.ffi_call("lm_attention_backward", jax.ShapeDtypeStruct(qkv.shape, jnp.float32))(
        *res, g)
    return dqkv, jnp.zeros_like(sin), jnp.zeros_like(cos)  # the tables are constants


_attention = jax.custom_vjp(lambda qkv, sin, cos: _forward(qkv, sin, cos)[0])
_attention.defvjp(_forward, _backward)
