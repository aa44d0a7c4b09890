"""The accelerator smoke sweep: 2 budgets × 3 sizes on the embedded byte corpus, one process.

Sized for a few minutes on one GPU (`python -m lm.smoke` runs it); `:quick` shrinks it to
models and budgets a CPU trains in seconds, so CI can run the same command path:

    python -m experiments.isoflop --config=configs/isoflop/micro.py --sweep_dir=/tmp/micro
    python -m experiments.isoflop --config=configs/isoflop/micro.py:quick --sweep_dir=/tmp/q
"""

import ml_collections

from configs.isoflop import tiny


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """variant "" (accelerator) or "quick" (CPU-sized, for the CI run of `lm.smoke --quick`)."""
    if variant not in ("", "quick"):
        raise ValueError(f"configs/isoflop/micro.py:{variant}: expected no variant or 'quick'")
    c = tiny.get_config("untuned")
    c.name = "micro"
    c.sweep_dir = "sweeps/micro"
    c.runner = "local"  # one process: no worker start-up per run, one device
    c.workers = 1
    c.analysis.bootstrap = 100
    t = c.train
    t.model.dtype, t.model.attention, t.model.unroll_layers = "bfloat16", "auto", False
    t.data.seq_len, t.data.batch_size, t.data.eval_batches = 256, 64, 4
    # Evals every 250 steps give each run (370+ steps) a curve, which approach 1 needs.
    t.train.log_every, t.train.eval_every, t.train.checkpoint_every = 100, 250, 1000
    c.head_dim = 32
    c.budgets = (3e13, 1e14)
    c.shapes = ("64x2,96x2,128x3", "96x2,128x3,192x3")
    if variant == "quick":
        t.model.dtype, t.model.unroll_layers = "float32", True
        t.data.seq_len, t.data.batch_size, t.data.eval_batches = 64, 8, 2
        t.train.log_every, t.train.eval_every, t.train.checkpoint_every = 20, 40, 1000
        c.head_dim = 8
        c.budgets = (3e9, 6e9)
        c.shapes = ("8x1,16x1,24x1", "16x1,24x1,32x1")
        c.analysis.bootstrap = 0  # the CPU path: fits without their intervals
    return c
