"""Prepare data before training, once.

`python -m lm.data.prepare --config=configs/train.py [--workers=N]` tokenizes `config.data`'s
dataset (its train and held-out splits) into the sharded token cache that training reads, with N
worker processes on this host; processes on several hosts (`--num_processes`/`--process_id`, or
the tasks of a SLURM array) each take their share of the shards. It is resumable: run it again
after a kill and only the unfinished shards are tokenized.

`python -m lm.data.prepare --dataset=lm1b` downloads a tfds dataset and writes it as ArrayRecord
into the data dir (`--data_dir`, else $LM_DATA_DIR, else $LM_CACHE_DIR/data), where training
reads it by index without TensorFlow; tfds's builders need TensorFlow for this step:
`pip install -e ".[prepare]"`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from lm.config import ConfigError

SHARE_FLAGS = ("workers", "num_processes", "process_id", "shard_documents")


def _array_task(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """(index, count) of this SLURM array task (ids from SLURM_ARRAY_TASK_MIN by its step)."""
    if "SLURM_ARRAY_TASK_ID" not in environ or "SLURM_ARRAY_TASK_COUNT" not in environ:
        return None
    first, step = int(environ.get("SLURM_ARRAY_TASK_MIN", 0)), int(environ.get("SLURM_ARRAY_TASK_STEP", 1))
    return (int(environ["SLURM_ARRAY_TASK_ID"]) - first) // step, int(environ["SLURM_ARRAY_TASK_COUNT"])


def process_share(num_processes: int | None, process_id: int | None,
                  environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(this process, processes) preparing one dataset: the flags, else the SLURM array task, else
    (0, 1); ConfigError for a share that names no process."""
    if num_processes is None and process_id is None:
        return _array_task(environ) or (0, 1)
    if num_processes is None or process_id is None:
        raise ConfigError("--num_processes and --process_id go together: give both (this process's index "
                          "among the processes that share the shards) or neither")
    if num_processes < 1:
        raise ConfigError(f"--num_processes={num_processes} is not allowed: must be a positive integer")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"--process_id={process_id} is not allowed: must lie in [0, --num_processes = "
                          f"{num_processes})")
    return process_id, num_processes


def available_cpus() -> int:
    """The CPUs this process may run on (a SLURM allocation's, not the whole host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _tokenize(f) -> None:
    from lm.data import shards
    from lm.data.dataset import dataset_tokenizer
    from lm.data.settings import validate_source_config
    from lm.data.sources import TRAIN, open_corpus

    config = f.config
    if f.data_dir:
        config.data.data_dir = f.data_dir
    for name in ("workers", "shard_documents"):
        if f[name].value is not None and f[name].value < 1:
            raise ConfigError(f"--{name}={f[name].value} is not allowed: must be a positive integer")
    share = process_share(f.num_processes, f.process_id)
    validate_source_config(config.data)
    corpus = open_corpus(config.data)
    tokenizer = dataset_tokenizer(config, corpus)
    for split in (TRAIN, corpus.eval_split):
        done = shards.prepare(config.data, corpus, split, tokenizer, workers=f.workers or available_cpus(),
                              share=share, shard_documents=f.shard_documents)
        directory = shards.split_dir(corpus, split, tokenizer.name)
        if done.manifest:
            print(f"prepared {corpus.name} {split} with {tokenizer.name}: {done.manifest['tokens']:,} tokens "
                  f"in {shards.plural(len(done.manifest['shards']), 'shard')} -> {directory}", flush=True)
        else:
            left = shards.missing_shards(directory, shards.read_plan(directory))
            print(f"process {share[0]} of {share[1]} is done with {corpus.name} {split}; "
                  f"{shards.plural(len(left), 'shard')} left to the other processes", flush=True)


def _download(f) -> None:
    from lm.config import defaults
    from lm.data.settings import data_root
    from lm.data.sources import prepare

    data = defaults().data
    data.data_dir = f.data_dir
    builder = prepare(f.dataset, data_root(data))
    print(f"prepared {builder.info.full_name} in {builder.data_dir}: use "
          f"--config.data.dataset={f.dataset} --config.data.data_dir={data_root(data)}, then tokenize it "
          f"with python -m lm.data.prepare --config=... --config.data.dataset={f.dataset}")


def main(argv: list[str]) -> None:
    from absl import flags

    from lm import cli

    cli.define_config("train.py", "the run config whose config.data is tokenized")
    flags.DEFINE_string("dataset", "", "download and prepare this tfds dataset (e.g. lm1b or c4/en:3.1.0) "
                        "instead of tokenizing --config's data")
    flags.DEFINE_string("data_dir", "", "where datasets and token caches live (default: "
                        "config.data.data_dir, else $LM_DATA_DIR, else $LM_CACHE_DIR/data)")
    flags.DEFINE_integer("workers", None, "tokenizing processes on this host (default: the CPUs it may use)")
    flags.DEFINE_integer("num_processes", None, "processes (hosts) sharing the shards (default: the tasks "
                         "of a SLURM array, else 1)")
    flags.DEFINE_integer("process_id", None, "this process's index among them, from 0 (default: the "
                         "SLURM array task's)")
    flags.DEFINE_integer("shard_documents", None, "documents per shard (default: about 64 MiB of text "
                         "each, at most 4096 shards; a started cache keeps its own)")

    def body() -> None:
        from lm.process import quiet_library_logs

        quiet_library_logs()
        f = flags.FLAGS
        if f.dataset:
            given = [name for name in SHARE_FLAGS if f[name].present]
            if given:
                raise ConfigError(f"--{given[0]} applies to tokenizing, not to --dataset (downloading): run "
                                  "them one after the other")
            _download(f)
        else:
            _tokenize(f)

    cli.run(body, argv)


if __name__ == "__main__":
    main(sys.argv)
