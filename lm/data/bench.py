"""Input-pipeline throughput: `python -m lm.data.bench --dataset stdlib --seq_len 128 --steps 200`.

Builds (or reuses) the dataset and its token cache first, then times `train_batch` alone and
prints key=value pairs; tokens_per_s counts the seq_len input tokens of each row.
"""

from __future__ import annotations

import argparse
import time

from lm.config import defaults as get_config
from lm.data.dataset import build_dataset


def bench(data_overrides: dict, steps: int) -> dict:
    config = get_config()
    config.data.update(data_overrides)
    start = time.perf_counter()
    ds = build_dataset(config)
    build_s = time.perf_counter() - start
    ds.train_batch(0)  # first call builds grain's batch dataset
    start = time.perf_counter()
    for step in range(steps):
        ds.train_batch(step)
    elapsed = time.perf_counter() - start
    d = config.data
    return {"dataset": ds.info["dataset"], "tokenizer": ds.tokenizer.name, "seq_len": d.seq_len,
            "batch_size": d.batch_size, "steps": steps, "build_s": round(build_s, 3),
            "batch_us": round(elapsed / steps * 1e6, 1),
            "tokens_per_s": round(steps * d.batch_size * d.seq_len / elapsed)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="stdlib")
    p.add_argument("--text_dir", default="")
    p.add_argument("--data_dir", default="")
    p.add_argument("--tokenizer", default="bytes")
    p.add_argument("--sp_vocab_size", type=int, default=4096)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=200)
    args = vars(p.parse_args(argv))
    steps = args.pop("steps")
    print(" ".join(f"{k}={v}" for k, v in bench(args, steps).items()))


if __name__ == "__main__":
    main()
