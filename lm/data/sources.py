"""The prepared tfds dataset that `config.data` names, with its train and held-out splits.

"stdlib" and "folder" are prepared here on first use (under a lock, so concurrent processes
build them once). Any other name must already be prepared in data_dir as ArrayRecord: this
module never downloads, it explains how to prepare the dataset instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grain
import ml_collections
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters, read_only_builder, registered

from lm.data.corpus import FILE_FORMAT
from lm.data.errors import DataError
from lm.data.settings import EMBEDDED, FOLDER, data_root
from lm.data.splits import TRAIN
from lm.data.stdlib_corpus import stdlib_builder
from lm.data.text_folder import text_folder_builder
from lm.files import file_lock

EVAL_SPLITS = ("validation", "test")  # the held-out split: the first of these that exists
CACHE_DIR = "lm_cache"  # under data_dir: tokenizers and token caches, per dataset


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A prepared dataset: where its text is, which split is held out, where its caches go."""

    builder: tfds.core.DatasetBuilder
    text_key: str
    eval_split: str
    cache_dir: Path

    @property
    def name(self) -> str:
        return self.builder.info.full_name

    def source(self, split: str) -> Sequence:
        return self.builder.as_data_source(split=split)

    def texts(self, source: Sequence, indices: Sequence[int]) -> list[bytes]:
        """The UTF-8 text of the given records."""
        values = [record[self.text_key] for record in source.__getitems__(list(indices))]
        return [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values]

    def sample(self, max_bytes: int) -> Iterator[str]:
        """Train documents in a fixed pseudo-random order until about `max_bytes` of text."""
        source = self.source(TRAIN)
        order = grain.MapDataset.range(len(source)).shuffle(seed=0).batch(256)
        total = 0
        for indices in order:
            for text in self.texts(source, indices):
                yield text.decode("utf-8", errors="replace")
                total += len(text)
                if total >= max_bytes:
                    return


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Hide tfds's warnings for a block: "custom data configuration" is how our configs work, and
    "variant folder has no dataset_info.json" is how an unprepared dataset looks."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _open(make: Callable[[], tfds.core.DatasetBuilder]) -> tuple[tfds.core.DatasetBuilder, bool]:
    with _quiet_absl():
        builder = make()
        return builder, builder.is_prepared()


def _prepared(make: Callable[[], tfds.core.DatasetBuilder], root: Path) -> tfds.core.DatasetBuilder:
    """`make()`'s dataset, generated first (once, under a lock) if it is not on disk yet."""
    builder, ready = _open(make)
    if ready:
        return builder
    with file_lock(root / f"{builder.name}.build"):
        builder, ready = _open(make)  # another process may have built it while we waited
        if not ready:
            print(f"lm.data: building dataset {builder.info.full_name} in {root}", flush=True)
            tfds.display_progress_bar(False)
            builder.download_and_prepare(file_format=FILE_FORMAT)
    return builder


def _prepare_hint(name: str, root: Path) -> str:
    return (f"prepare it once (this needs the internet) with\n"
            f"  tfds build {name} --data_dir={root} --file_format={FILE_FORMAT}\n"
            f"or in Python\n"
            f"  tfds.builder({name!r}, data_dir={str(root)!r}).download_and_prepare("
            f"file_format={FILE_FORMAT!r})\n"
            f"(tfds 4.9.10 also needs `pip install importlib_resources` for this; data_dir comes "
            f"from config.data.data_dir, else $LM_DATA_DIR, else $LM_CACHE_DIR/data; {EMBEDDED!r} and "
            f"{FOLDER!r} need no preparation)")


def _registered(name: str, root: Path) -> tfds.core.DatasetBuilder:
    """A tfds dataset already prepared under `root`, loaded from its files (no builder code)."""
    try:
        builder = read_only_builder.builder_from_files(name, data_dir=str(root))
    except registered.DatasetNotFoundError:
        raise DataError(f"config.data.dataset = {name!r} is not prepared in {root}: "
                        f"{_prepare_hint(name, root)}") from None
    except ValueError as e:
        raise DataError(f"config.data.dataset = {name!r} is not a dataset name ({e}); use "
                        f"{EMBEDDED!r}, {FOLDER!r}, or a tfds name like 'lm1b' or 'c4/en:3.1.0'") from None
    formats = builder.info.available_file_formats() & file_adapters.FileFormat.with_random_access()
    if not formats:
        stored = sorted(f.value for f in builder.info.available_file_formats())
        raise DataError(f"config.data.dataset = {name!r} is prepared in {builder.data_dir} as {stored}, "
                        f"which cannot be read by index; move or delete it and {_prepare_hint(name, root)}")
    return builder


def open_corpus(data_cfg: ml_collections.ConfigDict) -> Corpus:
    """The dataset `data_cfg` names, prepared; DataError if it is missing or unusable."""
    root = data_root(data_cfg)
    if data_cfg.dataset == EMBEDDED:
        builder = _prepared(lambda: stdlib_builder(root), root)
    elif data_cfg.dataset == FOLDER:
        builder = _prepared(lambda: text_folder_builder(data_cfg.text_dir, data_cfg.text_key, root), root)
    else:
        builder = _registered(data_cfg.dataset, root)
    info = builder.info
    splits = sorted(info.splits)
    held_out = [s for s in EVAL_SPLITS if s in info.splits]
    if TRAIN not in info.splits or not held_out:
        raise DataError(f"config.data.dataset = {data_cfg.dataset!r} has splits {splits}; it needs "
                        f"{TRAIN!r} and one of {', '.join(map(repr, EVAL_SPLITS))}")
    text_key = "text" if data_cfg.dataset in (EMBEDDED, FOLDER) else data_cfg.text_key
    if text_key not in info.features:
        raise DataError(f"config.data.text_key = {text_key!r} is not a feature of "
                        f"{info.full_name}; its features are {sorted(info.features)}")
    return Corpus(builder, text_key, held_out[0], root / CACHE_DIR / info.full_name)
