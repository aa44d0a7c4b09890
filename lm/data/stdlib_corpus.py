"""The embedded corpus: the .py sources of the running interpreter's standard library.

It needs no download and builds in seconds. Tests and site-packages are left out. Another
Python (version or installation) has other files, so the config name carries the version and
a fingerprint of the file list (paths and sizes): caches of different interpreters never mix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds

from lm.data.corpus import FILE_FORMAT, SplitCorpus

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[str]:
    """Relative POSIX paths of the library's .py files, sorted, without test or package dirs."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        rel = Path(dirpath).relative_to(root)
        found += [(rel / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(found)


def config_name(root: Path, files: list[str]) -> str:
    """`py3.11.7-1a2b3c4d`: the interpreter's version and a hash of the files' paths and sizes."""
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
    root = stdlib_root()
    config = StdlibConfig(name=config_name(root, stdlib_files(root)), root=str(root),
                          description=f"standard library of Python {sys.version.split()[0]} at {root}")
    return LmStdlib(config=config, data_dir=str(data_dir), file_format=FILE_FORMAT)
