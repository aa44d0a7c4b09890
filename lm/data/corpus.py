"""A tfds builder for a text corpus held in local files, split into train/validation by document key.

It writes ArrayRecord files (`file_format="array_record"`), which tfds produces and reads
without TensorFlow; the split sizes (documents, UTF-8 bytes) go into the dataset's metadata.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

from lm.data.errors import DataError
from lm.data.splits import TRAIN, VALIDATION, plan, split_of

FILE_FORMAT = "array_record"


class SplitCorpus(tfds.core.GeneratorBasedBuilder):
    """Documents from `_documents()`, ~2.5 % of them (by a hash of their key) held out for validation.

    Each example is {"id": key, "text": text}; empty documents are left out.
    """

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
        return tfds.core.DatasetInfo(
            builder=self, description=type(self).__doc__,
            features=tfds.features.FeaturesDict({"id": tfds.features.Text(), "text": tfds.features.Text()}),
            metadata=tfds.core.MetadataDict())

    def _nonempty(self) -> Iterator[tuple[str, str]]:
        return ((key, text) for key, text in self._documents() if text)

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        fallback, counts = plan(key for key, _ in self._nonempty())
        if not all(counts.values()):
            raise DataError(f"{self.info.full_name} ({self.builder_config.description}) has "
                            f"{sum(counts.values())} non-empty documents; it needs two or more, "
                            "as one of them is held out for validation")
        return {split: self._generate_examples(split, fallback) for split in (TRAIN, VALIDATION)}

    def _generate_examples(self, split: str, fallback: str | None):
        documents = n_bytes = 0
        for key, text in self._nonempty():
            if split_of(key, fallback) == split:
                documents += 1
                n_bytes += len(text.encode("utf-8"))
                yield key, {"id": key, "text": text}
        self.info.metadata[split] = {"documents": documents, "bytes": n_bytes}
