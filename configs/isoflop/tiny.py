"""The embedded default IsoFLOP sweep: byte-level stdlib corpus, CPU, 3 budgets × 5 sizes.

Shapes climb one rung of a width×depth ladder per budget so every budget brackets its
optimum. The default is the one-command demo: the tuning stage fits each size's learning rate
first, and the cheapest budget gets two seeds per point. `:untuned` is the same sweep under the
inverse-width LR rule the tuning grid centres on, one seed per point (see docs/experiments.md
for how these were chosen and what the sweeps measured).

    python -m experiments.isoflop                                        # tune, sweep, analyse
    python -m experiments.isoflop --config=configs/isoflop/tiny.py:untuned --sweep_dir=sweeps/untuned
"""

import ml_collections

from configs import train


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """variant "" (tuned, replicated: the demo) or "untuned" (the inverse-width rule, one seed)."""
    if variant not in ("", "untuned"):
        raise ValueError(f"configs/isoflop/tiny.py:{variant}: expected no variant or 'untuned'")
    c = ml_collections.ConfigDict()
    c.name = "tiny"
    c.sweep_dir = "sweeps/tiny"

    t = train.get_config()
    t.data.seq_len, t.data.batch_size, t.data.eval_batches = 128, 16, 8
    t.model.unroll_layers = True  # 1-3 layers: 2-7 % faster single-threaded, compile cost nil
    t.model.qk_norm = True  # with z-loss and a 10 % warmup: runs that rounding does not derail
    t.model.init_std = 0.1  # 0.02 (GPT-2's, for d_model 768) is a near-zero start at widths 16-80
    t.optim.lr_rule, t.optim.peak_lr, t.optim.base_width, t.optim.max_lr = (
        "fitted" if not variant else "inverse_width", 6e-3, 128, 0.2)
    t.optim.warmup_frac, t.optim.final_frac, t.optim.z_loss = 0.1, 0.1, 1e-4
    t.train.log_every, t.train.eval_every, t.train.checkpoint_every = 50, 250, 1000
    c.train = t

    c.budgets = (3e11, 1e12, 3e12)
    c.validate_factor = 3.0  # --validate: train the predicted optimum of this × the largest budget
    # Per budget, explicit d_model×n_layers shapes (empty: generate sizes around the optimum).
    c.shapes = (
        "16x1,16x2,24x2,32x2,48x2",
        "16x2,24x2,32x2,48x2,64x2",
        "24x2,32x2,48x2,64x2,80x3",
    )
    c.head_dim = 16
    c.ffn_ratio = 4.0
    # Generated sizes (used when `shapes` is empty): log-spaced around N = sqrt(C / (6 r)).
    c.sizes_per_budget = 7
    c.size_span = 16.0  # largest / smallest size in a budget
    c.tokens_per_param = 20.0  # r: where the centre of each budget's sizes sits
    c.aspect_ratio = 64.0
    # Runs per planned point: replicate k >= 1 (`<name>-s<k>`) moves the init and data seeds by k.
    c.seeds = 1 if variant else 2
    c.seeds_budgets = 0 if variant else 1  # replicates at this many smallest budgets (0: at all)
    # Batch rule: batch_size × (N / batch_ref_params) ** batch_exponent, a power of two.
    c.batch_exponent = 0.0
    c.batch_ref_params = 1e6
    # "cosine": independent runs; "wsd": cooldown branches from one trunk per size; "grid":
    # sizes × budgets, one trunk per size with a branch on every budget's line (tiny_grid.py).
    c.mode = "cosine"
    c.cooldown_frac = 0.2  # wsd and grid modes: each run's cooldown, as a fraction of its steps
    # Runs may repeat their data up to max_epochs passes (warned at each, refused past it);
    # data_tokens: the train split's size where its cache is not prepared here (0: its manifest).
    c.max_epochs = 4.0
    c.data_tokens = 0
    c.grid = ml_collections.ConfigDict()
    c.grid.shapes = ""  # grid mode: d_modelxn_layers sizes ('': a generated ladder)
    c.grid.spacing = 2**0.5  # grid mode: the largest ratio between neighbouring budgets
    c.flops = "exact"  # "exact" (Hoffmann et al. App. F) or "6nd": which count meets the budget

    c.runner = "subprocess"  # "local" (this process), "subprocess" or "slurm"
    c.workers = 2  # subprocess runner: parallel runs (CPU: single-threaded each; GPU: one each)
    c.slurm = ml_collections.ConfigDict()
    c.slurm.partition = ""
    c.slurm.account = ""  # "" = the cluster's default for each of these four
    c.slurm.qos = ""
    c.slurm.mem = ""  # per node, sbatch's --mem, e.g. "64G"
    c.slurm.constraint = ""  # node features, e.g. "h100"
    c.slurm.time_min = 240  # per job; at the limit a run checkpoints and is requeued
    c.slurm.gpus_per_node = 1
    c.slurm.nodes = 1  # per run
    c.slurm.tasks_per_node = 0  # processes per node; 0: one per GPU on several nodes, else 1
    c.slurm.cpus_per_task = 8
    c.slurm.setup = ()  # shell lines run before the task, e.g. ("module load cuda/12.4",)
    c.slurm.additional_parameters = ()  # any other sbatch option: ("reservation=big", "exclusive")
    c.slurm.array = True  # one job array for the sweep (False: one job per run)
    c.slurm.array_parallelism = 16

    c.analysis = ml_collections.ConfigDict()
    c.analysis.n = "total"  # "total" or "non_embedding" parameters
    c.analysis.bootstrap = 1000

    # Tuning stage (python -m experiments.tune): the sweep's runs at its n_budgets smallest budgets,
    # each at lr_factors × its lr_rule LR (and each of batch_sizes; (): the sweep's batch rule);
    # train.optim.lr_rule = "fitted" then plans every run with the fitted laws in N.
    c.tune = ml_collections.ConfigDict()
    c.tune.n_budgets = 1
    c.tune.lr_factors = (0.5, 1.0, 2.0)
    c.tune.batch_sizes = ()
    c.tune.lr_rule = "inverse_width"
    return c
