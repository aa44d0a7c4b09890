"""Fine-tune a trained run: `--config=configs/finetune.py:RUN_DIR` (RUN_DIR holds config.json).

Takes the run's model (shape, vocabulary, numerics) and tokenizer, starts from its latest
checkpoint's parameters (`train.init_step` picks another) with a fresh optimizer and its
own schedule, on your text by default:

    python -m lm.train --config=configs/finetune.py:sweeps/tiny/runs/C3e12-N8e4 \
        --workdir=runs/tuned --config.data.text_dir=my_texts/
"""

from pathlib import Path

import ml_collections

from configs import train
from lm.config import ConfigError
from lm.files import FileError, read_json


def get_config(run_dir: str = "") -> ml_collections.ConfigDict:
    if not run_dir:
        raise ConfigError("use --config=configs/finetune.py:RUN_DIR, RUN_DIR being the workdir of "
                          "the run to start from")
    saved = Path(run_dir) / "config.json"
    if not saved.exists():
        raise FileError(f"{saved} does not exist: RUN_DIR must be the workdir of a trained run")
    pretrained = read_json(saved, keys=("model", "data"))
    if not all(isinstance(pretrained[k], dict) for k in ("model", "data")):
        raise FileError(f"{saved}: 'model' and 'data' must be JSON objects")
    c = train.get_config()
    c.model.update(pretrained["model"])
    for key in ("tokenizer", "sp_vocab_size", "data_dir", "seq_len", "batch_size"):
        c.data[key] = pretrained["data"][key]
    if (Path(run_dir) / "tokenizer.model").exists():  # SentencePiece: the run's own pieces
        c.data.tokenizer_path = str((Path(run_dir) / "tokenizer.model").absolute())
    c.data.dataset = "folder"
    c.data.eval_batches = 4
    c.train.init_from, c.train.init_mode = str(Path(run_dir).absolute()), "params"
    c.train.tokens = 500_000
    c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 20, 100, 100
    c.optim.peak_lr, c.optim.warmup_frac, c.optim.final_frac = 1e-3, 0.1, 0.1
    return c
