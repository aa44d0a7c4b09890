"""One training run: a small byte-level model on the embedded corpus, about a minute on CPU.

Every field and its default is in `lm.config.defaults`. Override any field from the command
line, e.g.
`python -m lm.train --config=configs/train.py --workdir=/tmp/run --config.model.d_model=128`.
"""

import ml_collections

from lm.config import defaults, model_defaults

model_config = model_defaults  # the model part alone (tests and sizing start from it)


def get_config() -> ml_collections.ConfigDict:
    return defaults()
