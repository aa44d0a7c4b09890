"""Train-step throughput and MFU: `python -m lm.bench --shape 128,4,4,256,16 ...`.

Times the compiled, sharded train step (the one `lm.train` runs) on random tokens after
warm-up: median of N device-synchronised steps. Prints one `key=value` line per shape.
`page_faults` (median per timed step) tells a clean CPU measurement (0) from one where the
heap was still growing and the kernel was faulting memory in.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from lm import sharding
from lm.config import ATTENTION, validate
from lm.config import defaults as get_config
from lm.host import setup_process
from lm.metrics import device_peak_flops
from lm.sizing import count_params, flops_per_token, flops_per_token_palm

DEFAULT_SHAPES = ("128,4,4,256,16", "256,6,8,256,16", "512,8,8,512,8")


def shape_config(base: ml_collections.ConfigDict, shape: str) -> ml_collections.ConfigDict:
    """`d,L,H,T,B` -> a copy of base with that model width, depth, heads, context and batch."""
    try:
        d, n_layers, heads, seq_len, batch = (int(x) for x in shape.split(","))
    except ValueError:
        raise ValueError(f"--shape={shape!r}: expected five integers d,L,H,T,B") from None
    c = ml_collections.ConfigDict(base.to_dict())
    c.mesh.shape = tuple(c.mesh.shape)
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff = d, n_layers, heads, 4 * d
    c.data.seq_len, c.data.batch_size = seq_len, batch
    c.train.steps = 1000
    return c


def benchmark(config: ml_collections.ConfigDict, steps: int = 10, warmup: int = 5,
              ) -> dict[str, Any]:
    """Median step time of the compiled train step for `config` on all local devices."""
    from lm.train import Trainer

    validate(config)
    mesh = sharding.make_mesh(config.mesh.shape)
    trainer = Trainer(config, mesh)
    state = trainer.init_state()
    rng = np.random.default_rng(0)
    batch = jax.device_put(
        rng.integers(0, config.model.vocab_size,
                     (config.data.batch_size, config.data.seq_len + 1)).astype(np.int32),
        trainer.batch_sharding)
    times, faults = [], []
    for i in range(warmup + steps):
        f, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
    m, seq = config.model, config.data.seq_len
    step_s = statistics.median(times)
    tokens = config.data.batch_size * seq
    fpt, fpt_palm = flops_per_token(m, seq), flops_per_token_palm(m, seq)
    peak = device_peak_flops() * jax.device_count()
    return {
        "shape": f"{m.d_model},{m.n_layers},{m.n_heads},{seq},{config.data.batch_size}",
        "n_params": count_params(m).total, "dtype": m.dtype, "devices": jax.device_count(),
        "device": jax.devices()[0].device_kind, "tokens_per_sec": tokens / step_s,
        "step_ms": 1e3 * step_s, "flops_per_token": fpt, "flops_per_token_palm": fpt_palm,
        "achieved_flops": tokens * fpt / step_s, "peak_flops": peak,
        "mfu": tokens * fpt / step_s / peak, "mfu_palm": tokens * fpt_palm / step_s / peak,
        "compile_s": trainer.compile_seconds, "page_faults": int(statistics.median(faults)),
    }


def format_line(r: dict[str, Any]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace(" ", "_")

    return " ".join(f"{k}={fmt(v)}" for k, v in r.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", action="append", help="d,L,H,T,B (repeatable)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first (on CPU the heap grows over the first few)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--remat", choices=("none", "full", "dots"), default=None)
    parser.add_argument("--attention", choices=ATTENTION, default=None)
    parser.add_argument("--unroll_layers", action="store_true", help="unroll the layer scan")
    parser.add_argument("--mesh", default=None, help="data,fsdp,tensor (default: all data)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    setup_process()
    base = get_config()
    for name in ("dtype", "remat", "attention"):
        if getattr(args, name):
            base.model[name] = getattr(args, name)
    base.model.unroll_layers = args.unroll_layers
    if args.mesh:
        base.mesh.shape = tuple(int(x) for x in args.mesh.split(","))
    try:  # every shape checked before the first compilation
        configs = [shape_config(base, shape) for shape in args.shape or DEFAULT_SHAPES]
        for c in configs:
            validate(c)
    except ValueError as e:
        parser.error(str(e))
    results = []
    for config in configs:
        r = benchmark(config, args.steps, args.warmup)
        print(format_line(r), flush=True)
        results.append(r)
    if args.json:
        from lm.files import write_json_atomic

        write_json_atomic(args.json, results)


if __name__ == "__main__":
    main()
