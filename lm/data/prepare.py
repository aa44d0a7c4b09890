"""Prepare a tfds dataset for `config.data.dataset`, once: `python -m lm.data.prepare --dataset=lm1b`.

Downloads it and writes it as ArrayRecord into the data dir (`--data_dir`, else $LM_DATA_DIR,
else $LM_CACHE_DIR/data), where training and evaluation read it by index without TensorFlow.
tfds's builders need TensorFlow for the preparation itself: `pip install -e ".[prepare]"`.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    from absl import flags

    from lm import cli
    from lm.config import ConfigError, defaults

    flags.DEFINE_string("dataset", "", "tfds name, e.g. lm1b or c4/en:3.1.0")
    flags.DEFINE_string("data_dir", "", "where to write it (default: $LM_DATA_DIR, else $LM_CACHE_DIR/data)")

    def body() -> None:
        from lm.data.settings import data_root
        from lm.data.sources import prepare

        f = flags.FLAGS
        if not f.dataset:
            raise ConfigError("--dataset is required: a tfds name such as lm1b or c4/en:3.1.0")
        data = defaults().data
        data.data_dir = f.data_dir
        builder = prepare(f.dataset, data_root(data))
        print(f"prepared {builder.info.full_name} in {builder.data_dir}: use "
              f"--config.data.dataset={f.dataset} --config.data.data_dir={data_root(data)}")

    cli.run(body, argv)


if __name__ == "__main__":
    main(sys.argv)
