"""The text datasets, all read as prepared tfds datasets: the embedded corpus and a folder of the
user's text (tfds builders here, prepared on first use), or any tfds dataset already prepared.

The two local corpora are split into train/validation by a stable hash of each document's key,
so a document's split never depends on file order. They are written as ArrayRecord, which tfds
reads by index without TensorFlow. Only `prepare` downloads (a tfds dataset, once).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import grain
import ml_collections
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import file_adapters, read_only_builder, registered

from lm.data.settings import EMBEDDED, FOLDER, DataError, data_root, writing
from lm.files import file_lock

FILE_FORMAT = "array_record"
TRAIN, VALIDATION = "train", "validation"
EVAL_SPLITS = (VALIDATION, "test")  # the held-out split: the first of these that exists
VALIDATION_FRACTION = 0.025
CACHE_DIR = "lm_cache"  # under data_dir: tokenizers and token caches, per dataset
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                                  "__pycache__"})
FOLDER_SUFFIXES = (".txt", ".jsonl")


# The train/validation split of the local corpora.

def unit_hash(key: str) -> float:
    """sha256 of the key mapped to [0, 1): the same on every machine and Python version."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def plan(keys: Iterable[str]) -> tuple[str | None, dict[str, int]]:
    """Each split's size, and the fallback key: when no key hashes into validation, the one with the
    smallest hash goes there, so two documents or more always hold one out (None when not needed)."""
    counts = {TRAIN: 0, VALIDATION: 0}
    best, best_hash = None, 1.0
    for key in keys:
        h = unit_hash(key)
        counts[VALIDATION if h < VALIDATION_FRACTION else TRAIN] += 1
        if h < best_hash:
            best, best_hash = key, h
    if counts[VALIDATION] == 0 and counts[TRAIN] > 1:
        return best, {TRAIN: counts[TRAIN] - 1, VALIDATION: 1}
    return None, counts


def split_of(key: str, fallback: str | None) -> str:
    """TRAIN or VALIDATION for a document key; `fallback` comes from `plan`."""
    return VALIDATION if key == fallback or unit_hash(key) < VALIDATION_FRACTION else TRAIN


class LocalInfo(tfds.core.DatasetInfo):
    """The metadata of a corpus made on this machine, which tfds's bucket never holds: skipping
    the bucket lookup also skips the empty temp dir tfds leaves for each unprepared builder."""

    def initialize_from_bucket(self) -> None:
        """Nothing to fetch: the info comes from the builder's code until it is prepared."""


class SplitCorpus(tfds.core.GeneratorBasedBuilder):
    """Documents from `_documents()` as {"id": key, "text": text}, empty ones left out, a hashed
    fraction held out for validation; each split's documents and UTF-8 bytes go into its metadata."""

    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """The builder's source file. tfds 4.9.10 finds it through `importlib_resources`, which it
        installs only on Python < 3.9; without this, preparing a builder in a package fails."""
        return epath.Path(inspect.getfile(cls))

    @abc.abstractmethod
    def _documents(self) -> Iterator[tuple[str, str]]:
        """(key, text) for every document; keys are unique and stable (e.g. relative paths)."""

    def _info(self) -> tfds.core.DatasetInfo:
        return LocalInfo(
            builder=self, description=type(self).__doc__,
            features=tfds.features.FeaturesDict({"id": tfds.features.Text(), "text": tfds.features.Text()}),
            metadata=tfds.core.MetadataDict())

    def _nonempty(self) -> Iterator[tuple[str, str]]:
        return ((key, text) for key, text in self._documents() if text)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # everything is local
        fallback, counts = plan(key for key, _ in self._nonempty())
        if not all(counts.values()):
            raise DataError(f"{self.info.full_name} ({self.builder_config.description}) has "
                            f"{sum(counts.values())} non-empty documents; it needs two or more, "
                            "as one of them is held out for validation")
        return {split: self._generate_examples(split, fallback) for split in (TRAIN, VALIDATION)}

    def _generate_examples(self, split: str, fallback: str | None) -> Iterator[tuple[str, dict[str, str]]]:
        documents = n_bytes = 0
        for key, text in self._nonempty():
            if split_of(key, fallback) == split:
                documents += 1
                n_bytes += len(text.encode("utf-8"))
                yield key, {"id": key, "text": text}
        self.info.metadata[split] = {"documents": documents, "bytes": n_bytes}


# The embedded corpus: the .py files of the running interpreter's standard library.

def stdlib_files(root: Path) -> list[str]:
    """Relative POSIX paths of the library's .py files, sorted, without test or package dirs."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        rel = Path(dirpath).relative_to(root)
        found += [(rel / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(found)


def stdlib_config_name(root: Path, files: list[str]) -> str:
    """`py3.11.7-1a2b3c4d`: the interpreter's version and a hash of the files' paths and sizes, so
    the corpora (and caches) of different interpreters never mix."""
    h = hashlib.sha256()
    for rel in files:
        h.update(f"{rel}\0{(root / rel).stat().st_size}\n".encode())
    v = sys.version_info
    return f"py{v.major}.{v.minor}.{v.micro}-{h.hexdigest()[:8]}"


@dataclasses.dataclass(eq=False)
class StdlibConfig(tfds.core.BuilderConfig):
    root: str = ""


class LmStdlib(SplitCorpus):
    """Python standard library sources (one document per .py file, tests excluded)."""

    name = "lm_stdlib"

    def _documents(self) -> Iterator[tuple[str, str]]:
        root = Path(self.builder_config.root)
        for rel in stdlib_files(root):
            yield rel, (root / rel).read_bytes().decode("utf-8", errors="replace")


def stdlib_builder(data_dir: Path) -> LmStdlib:
    root = Path(sysconfig.get_paths()["stdlib"])
    config = StdlibConfig(name=stdlib_config_name(root, stdlib_files(root)), root=str(root),
                          description=f"standard library of Python {sys.version.split()[0]} at {root}")
    return LmStdlib(config=config, data_dir=str(data_dir), file_format=FILE_FORMAT)


# The user's text: .txt files (one document each) and .jsonl files (one JSON object a line).

def folder_files(root: Path) -> list[Path]:
    """The folder's .txt/.jsonl files (recursive, hidden ones skipped), sorted; DataError if none."""
    if not root.is_dir():
        raise DataError(f"config.data.text_dir = {str(root)!r} is not a folder: point it at a folder "
                        f"of {' / '.join(FOLDER_SUFFIXES)} files")
    files = sorted(p for p in root.rglob("*") if p.suffix in FOLDER_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DataError(f"config.data.text_dir = {str(root)!r} has no {' or '.join(FOLDER_SUFFIXES)} "
                        "files: add text files (one document each) or .jsonl files (one JSON object "
                        "per line)")
    return files


def _decode(path: Path, data: bytes, where: str = "") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}{where}: not valid UTF-8 at byte {e.start}; convert the file to "
                        "UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _jsonl_documents(path: Path, key: str, text_key: str) -> Iterator[tuple[str, str]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f":{lineno}"
            try:
                record = json.loads(_decode(path, raw, where))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}{where}: not valid JSON ({e.msg} at column {e.colno}); each "
                                f"line must be one JSON object like {{\"{text_key}\": \"...\"}}") from None
            text = record.get(text_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}{where}: expected a JSON object with a string field "
                                f"{text_key!r} (data.text_key), got {raw[:80].decode('utf-8', 'replace')!r}")
            yield f"{key}:{lineno}", text


def folder_documents(root: Path, text_key: str) -> Iterator[tuple[str, str]]:
    """(key, text) for each document: key = relative path, plus `:line` for .jsonl lines."""
    for path in folder_files(root):
        key = path.relative_to(root).as_posix()
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, key, text_key)
        else:
            yield key, _decode(path, path.read_bytes())


def folder_config_name(root: Path, text_key: str) -> str:
    """`<folder name>-<12 hex digits>`, a hash of the resolved path, the text key and every file's
    path, size and mtime: a changed folder is built again under a new name."""
    h = hashlib.sha256(f"{root}\0{text_key}\n".encode())
    for path in folder_files(root):
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    slug = re.sub(r"[^\w\-.]+", "_", root.name).strip("._") or "folder"
    return f"{slug}-{h.hexdigest()[:12]}"


@dataclasses.dataclass(eq=False)
class TextFolderConfig(tfds.core.BuilderConfig):
    root: str = ""
    text_key: str = "text"


class LmTextFolder(SplitCorpus):
    """A folder of the user's .txt / .jsonl files."""

    name = "lm_text_folder"

    def _documents(self) -> Iterator[tuple[str, str]]:
        return folder_documents(Path(self.builder_config.root), self.builder_config.text_key)


def text_folder_builder(text_dir: str, text_key: str, data_dir: Path) -> LmTextFolder:
    root = Path(text_dir).expanduser().resolve()
    config = TextFolderConfig(name=folder_config_name(root, text_key), root=str(root), text_key=text_key,
                              description=f"text files under {root}")
    return LmTextFolder(config=config, data_dir=str(data_dir), file_format=FILE_FORMAT)


# Opening the dataset that config.data names.

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

    def split_bytes(self, split: str) -> int:
        """The size of the split's stored records (its text, and a little more)."""
        return int(self.builder.info.splits[split].num_bytes)

    def texts(self, source: Sequence, indices: Sequence[int]) -> list[bytes]:
        """The UTF-8 text of the given records."""
        values = [record[self.text_key] for record in source.__getitems__(list(indices))]
        return [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values]

    def sample(self, max_bytes: int) -> Iterator[str]:
        """Train documents in a fixed pseudo-random order over the whole split (not its first
        files) until about `max_bytes` of text."""
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
    """`make()`'s builder and whether it is prepared; made again when another process finished
    preparing it between the two, so its info is read from the files and not the code's."""
    with _quiet_absl():
        builder = make()
        ready = builder.is_prepared()
        if ready and not builder.info.splits:
            builder = make()
        return builder, ready


def _prepared(make: Callable[[], tfds.core.DatasetBuilder], root: Path) -> tfds.core.DatasetBuilder:
    """`make()`'s dataset, generated first (once, under a lock) if it is not on disk yet."""
    builder, ready = _open(make)
    if ready:
        return builder
    with writing(f"dataset {builder.info.full_name}", root), file_lock(root / f"{builder.name}.build"):
        builder, ready = _open(make)  # another process may have built it while we waited
        if not ready:
            print(f"lm.data: building dataset {builder.info.full_name} in {root}", flush=True)
            tfds.display_progress_bar(False)
            builder.download_and_prepare(file_format=FILE_FORMAT)
    return builder


def has_tensorflow() -> bool:
    """Whether TensorFlow is installed (tfds's own builders need it to prepare a dataset)."""
    return importlib.util.find_spec("tensorflow") is not None


def prepare(name: str, root: Path) -> tfds.core.DatasetBuilder:
    """Download and prepare the tfds dataset `name` in `root` as ArrayRecord, once (`python -m
    lm.data.prepare`); tfds's own builders read their downloads with TensorFlow."""
    try:
        with _quiet_absl():
            builder = tfds.builder(name, data_dir=str(root))
    except registered.DatasetNotFoundError:
        raise DataError(f"{name!r} is not a tfds dataset: see https://www.tensorflow.org/datasets/catalog "
                        "(e.g. 'lm1b', 'c4/en:3.1.0')") from None
    if type(builder).__module__.startswith("tensorflow_datasets.") and not has_tensorflow():
        raise DataError(f"preparing {name!r} needs TensorFlow, which tfds's builder uses to read the "
                        f"download: pip install -e '.[prepare]' in the lm checkout (or pip install "
                        f"tensorflow-cpu), then run this again")
    return _prepared(lambda: tfds.builder(name, data_dir=str(root)), root)


def _prepare_hint(name: str, root: Path) -> str:
    return (f"prepare it once with `python -m lm.data.prepare --dataset={name} --data_dir={root}` (it "
            f"downloads, and needs TensorFlow: pip install -e '.[prepare]'), or copy "
            f"{root / name.split(':')[0]} from a machine where it is prepared (data_dir is "
            f"config.data.data_dir, else $LM_DATA_DIR, else $LM_CACHE_DIR/data; {EMBEDDED!r} and "
            f"{FOLDER!r} need no preparation)")


def _registered(name: str, root: Path, required: bool = True) -> tfds.core.DatasetBuilder | None:
    """A tfds dataset already prepared under `root`, loaded from its files (no builder code);
    None when it is not prepared and not `required`."""
    try:
        builder = read_only_builder.builder_from_files(name, data_dir=str(root))
    except registered.DatasetNotFoundError:
        if not required:
            return None
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


def _corpus(data_cfg: ml_collections.ConfigDict, build: bool) -> Corpus | None:
    """The dataset `data_cfg` names, built first when it is a local corpus and `build`; None when
    it is not prepared (and not built); DataError if it is missing or unusable."""
    root = data_root(data_cfg)
    if data_cfg.dataset in (EMBEDDED, FOLDER):
        make = ((lambda: stdlib_builder(root)) if data_cfg.dataset == EMBEDDED else
                (lambda: text_folder_builder(data_cfg.text_dir, data_cfg.text_key, root)))
        builder, ready = (_prepared(make, root), True) if build else _open(make)
    else:
        builder = _registered(data_cfg.dataset, root, required=build)
        ready = builder is not None
    if not ready:
        return None
    info = builder.info
    held_out = [s for s in EVAL_SPLITS if s in info.splits]
    if TRAIN not in info.splits or not held_out:
        raise DataError(f"config.data.dataset = {data_cfg.dataset!r} has splits {sorted(info.splits)}; "
                        f"it needs {TRAIN!r} and one of {', '.join(map(repr, EVAL_SPLITS))}")
    text_key = "text" if data_cfg.dataset in (EMBEDDED, FOLDER) else data_cfg.text_key
    if text_key not in info.features:
        raise DataError(f"config.data.text_key = {text_key!r} is not a feature of "
                        f"{info.full_name}; its features are {sorted(info.features)}")
    return Corpus(builder, text_key, held_out[0], root / CACHE_DIR / info.full_name)


def open_corpus(data_cfg: ml_collections.ConfigDict) -> Corpus:
    """The dataset `data_cfg` names, prepared (a local corpus is built on first use); DataError if
    it is missing or unusable."""
    return _corpus(data_cfg, build=True)


def prepared_corpus(data_cfg: ml_collections.ConfigDict) -> Corpus | None:
    """The dataset `data_cfg` names if it is prepared, else None; nothing is built or written."""
    return _corpus(data_cfg, build=False)
