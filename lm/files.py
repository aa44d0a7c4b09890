"""Atomic file writes: a temp file in the same directory, fsync, then rename.

Readers (and a job killed mid-write) never see half a file: results, configs, tokenizers and
caches are either the old version or the new one.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any


def temporary_path(path: Path, suffix: str = ".tmp") -> Path:
    """A unique sibling of `path` (same filesystem, so os.replace is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _strict(obj: Any) -> Any:
    """NaN and inf become null, so the file is strict JSON for every reader."""
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Strict JSON (NaN -> null), sorted keys, written atomically."""
    text = json.dumps(_strict(obj), indent=2, sort_keys=True, allow_nan=False)
    write_bytes_atomic(path, text.encode())
