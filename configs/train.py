"""One training run: a small byte-level model on the embedded corpus, about a minute on CPU.

Override any field from the command line, e.g.
`python -m lm.train --config=configs/train.py --workdir=/tmp/run --config.model.d_model=128`.
"""

import ml_collections


def model_config() -> ml_collections.ConfigDict:
    """Transformer shape and numerics; every field is validated by `lm.config.validate`."""
    m = ml_collections.ConfigDict()
    m.vocab_size = 257  # byte tokenizer: 256 bytes + EOS
    m.d_model = 64
    m.n_layers = 2
    m.n_heads = 4
    m.head_dim = 0  # 0 -> d_model // n_heads
    m.d_ff = 256
    m.activation = "gelu"  # "gelu" or "swiglu"
    m.tied_embeddings = False
    m.rope_theta = 10_000.0
    m.norm_eps = 1e-6
    m.init_std = 0.02
    m.dtype = "float32"  # compute dtype: "float32" or "bfloat16"; parameters stay float32
    m.remat = "none"  # "none", "full" (recompute each block) or "dots" (save matmul outputs)
    # "auto" (CPU: the C++ "kernel" for float32, else "blockwise"; GPU: JAX picks cuDNN),
    # "kernel", "blockwise", "xla", "cudnn"
    m.attention = "auto"
    # Layers run in a lax.scan (compile time flat in depth); unrolling compiles each layer
    # separately and, since the CPU attention/GELU changes, is no faster (docs/benchmarks.md).
    m.unroll_layers = False
    return m


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = model_config()

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "stdlib"  # embedded corpus; "folder" (text_dir) or any tfds name
    c.data.text_dir = ""
    c.data.data_dir = ""  # "" -> $LM_DATA_DIR, else ~/.cache/lm
    c.data.text_key = "text"
    c.data.tokenizer = "bytes"  # or "sentencepiece"
    c.data.sp_vocab_size = 4096
    c.data.tokenizer_path = ""  # an existing SentencePiece .model (e.g. a run's tokenizer.model)
    c.data.seq_len = 128
    c.data.batch_size = 16  # global, all processes
    c.data.seed = 0
    c.data.eval_batches = 8

    c.optim = ml_collections.ConfigDict()
    c.optim.peak_lr = 3e-3
    c.optim.lr_rule = "constant"  # "constant" or "inverse_width": lr = peak_lr * base_width / d_model
    c.optim.base_width = 128
    c.optim.max_lr = 2e-2  # cap applied after the width rule
    c.optim.schedule = "cosine"  # "cosine", "wsd" or "constant"
    c.optim.warmup_frac = 0.05
    c.optim.warmup_steps = 0  # > 0 overrides warmup_frac (WSD branches share the trunk's warmup)
    c.optim.final_frac = 0.1  # cosine ends at final_frac * peak
    c.optim.cooldown_frac = 0.2  # wsd: fraction of steps spent cooling down to 0
    c.optim.cooldown_shape = "linear"  # wsd: "linear" or "1-sqrt"
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.decay_embeddings = False
    c.optim.clip_norm = 1.0
    c.optim.z_loss = 0.0  # coefficient of log(Z)^2 added to the loss

    c.train = ml_collections.ConfigDict()
    c.train.tokens = 1_000_000  # training horizon; steps = tokens // (batch_size * seq_len)
    c.train.steps = 0  # > 0 overrides tokens
    c.train.microbatches = 1  # gradient accumulation
    c.train.log_every = 25
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2
    c.train.save_steps = ()  # extra checkpoints kept for good (e.g. WSD branch points)
    c.train.init_from = ""  # start from this run directory's checkpoint ...
    c.train.init_step = -1  # ... at this step (-1: its latest) ...
    c.train.init_mode = "params"  # ... taking its "params" (fine-tune) or its whole "state"
    #   (params, optimizer state and step: a branch that continues that run, e.g. a WSD cooldown)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = the rest of the devices
    return c
