"""Train/validation assignment by a stable hash of each document's key (e.g. its relative path).

A document's split depends on its key alone, never on file order or on the other documents,
except for one rule: when no key hashes into validation, the key with the smallest hash goes
there, so a small corpus (two documents or more) still has a held-out split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

VALIDATION_FRACTION = 0.025
TRAIN, VALIDATION = "train", "validation"


def unit_hash(key: str) -> float:
    """sha256 of the key mapped to [0, 1): the same on every machine and Python version."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def plan(keys: Iterable[str]) -> tuple[str | None, dict[str, int]]:
    """The fallback key (None when the hash rule already holds one out) and each split's size."""
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
