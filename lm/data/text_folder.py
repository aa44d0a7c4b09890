"""The user's own text: a folder of `.txt` files (one document each) and `.jsonl` files (one
JSON object per line, the text in field `data.text_key`).

Files are found recursively (hidden ones skipped) and must be UTF-8. The builder's config name
holds the folder's name and a fingerprint of its resolved path, the text key and every file's
path, size and modification time, so a changed folder is built again under a new name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds

from lm.data.corpus import FILE_FORMAT, SplitCorpus
from lm.data.errors import DataError

SUFFIXES = (".txt", ".jsonl")


def folder_files(root: Path) -> list[Path]:
    """The folder's .txt/.jsonl files, sorted; DataError if it is missing or has none."""
    if not root.is_dir():
        raise DataError(f"config.data.text_dir = {str(root)!r} is not a folder: point it at a folder "
                        f"of {' / '.join(SUFFIXES)} files")
    files = sorted(p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DataError(f"config.data.text_dir = {str(root)!r} has no {' or '.join(SUFFIXES)} files: add "
                        "text files (one document each) or .jsonl files (one JSON object per line)")
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


def config_name(root: Path, text_key: str) -> str:
    """`<folder name>-<12 hex digits>`, changing whenever a file is added, removed or modified."""
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
    config = TextFolderConfig(name=config_name(root, text_key), root=str(root), text_key=text_key,
                              description=f"text files under {root}")
    return LmTextFolder(config=config, data_dir=str(data_dir), file_format=FILE_FORMAT)
