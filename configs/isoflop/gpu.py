"""A real IsoFLOP study for one GPU: 5 budgets 1e16 … 1e18 FLOPs × 7 sizes (~2M–300M parameters).

Data: lm1b with an 8k SentencePiece vocabulary (prepare it once with
`tfds build lm1b --data_dir=$LM_DATA_DIR`, or set `train.data.dataset` to any prepared
tfds dataset). bf16 compute with float32 parameters and XLA attention;
`--config.train.model.attention=cudnn` takes cuDNN's (preflight cannot lower it without a GPU).
About 1.0e19 FLOPs in all: roughly 8 hours on one H100 at 35 % MFU (docs/experiments.md).

    python -m experiments.isoflop --config=configs/isoflop/gpu.py --dry_run
    python -m experiments.isoflop --config=configs/isoflop/gpu.py
"""

import ml_collections

from configs.isoflop import tiny


def get_config() -> ml_collections.ConfigDict:
    c = tiny.get_config("untuned")
    c.name = "gpu"
    c.sweep_dir = "sweeps/gpu"

    t = c.train
    t.data.dataset, t.data.tokenizer, t.data.sp_vocab_size = "lm1b", "sentencepiece", 8192
    t.model.vocab_size = 8192
    t.data.seq_len, t.data.batch_size, t.data.eval_batches = 512, 256, 40
    t.model.dtype, t.model.attention, t.model.tied_embeddings = "bfloat16", "auto", True
    t.model.activation = "swiglu"
    t.optim.lr_rule, t.optim.peak_lr, t.optim.base_width, t.optim.max_lr = (
        "inverse_width", 3e-3, 256, 6e-3)
    t.optim.warmup_frac, t.optim.final_frac, t.optim.z_loss = 0.02, 0.1, 1e-4
    t.train.log_every, t.train.eval_every, t.train.checkpoint_every = 100, 1000, 1000

    c.budgets = (1e16, 3e16, 1e17, 3e17, 1e18)
    c.shapes = ()  # sizes generated around N = sqrt(C / (6 r)), r = tokens_per_param
    c.sizes_per_budget = 7
    c.size_span = 16.0
    c.tokens_per_param = 20.0
    c.head_dim = 64
    c.ffn_ratio = 8 / 3  # SwiGLU: three d×f matrices cost what two d×4d ones do
    c.aspect_ratio = 64.0
    # Larger models take larger batches: 256 sequences at 1e7 parameters, × (N/1e7)^0.25.
    c.batch_exponent = 0.25
    c.batch_ref_params = 1e7

    c.runner = "subprocess"  # one run per visible GPU; "slurm" for a cluster
    c.workers = 1
    c.slurm.gpus_per_node = 1
    c.slurm.cpus_per_task = 8
    c.slurm.time_min = 12 * 60
    # Tuning stage: the sizes of the smallest budget × 5 peak LRs (cost: docs/experiments.md);
    # then --config.train.optim.lr_rule=fitted.
    c.tune.n_budgets = 1
    c.tune.lr_factors = (0.25, 0.5, 1.0, 2.0, 4.0)
    return c
