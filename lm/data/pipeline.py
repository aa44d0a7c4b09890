"""Token windows and batches as grain random-access datasets: batch k is a pure function of k.

The token stream (documents joined by EOS) is cut into windows of seq_len + 1 tokens that
start every seq_len tokens, so consecutive windows share one token and every token after the
first is a target exactly once. Training visits all windows once per epoch in an order that
grain's index shuffle derives from (seed, epoch); nothing depends on iterator state, so a run
resumed at step k sees the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib

import grain
import numpy as np

EVAL_SEED = 0  # the validation windows never depend on config.data.seed


def window_count(n_tokens: int, seq_len: int) -> int:
    return max(n_tokens - 1, 0) // seq_len


def grain_seed(seed: int, purpose: str) -> int:
    """A 32-bit seed for grain's shuffle, hashed so that different seeds do not share epochs.

    (grain reshuffles epoch e with seed + e: unhashed, seed 1 would replay seed 0's 2nd epoch.)
    """
    return int.from_bytes(hashlib.sha256(f"{purpose}:{seed}".encode()).digest()[:4], "big")


class WindowReader:
    """Window indices [n] -> int32 array [n, seq_len + 1], one vectorized gather from the tokens."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        self.offsets = np.arange(seq_len + 1)

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        return self.tokens[np.asarray(indices)[:, None] * self.seq_len + self.offsets].astype(np.int32)


def train_order(n_windows: int, seed: int) -> grain.MapDataset:
    """Element i = index of the i-th window seen in training: epochs of fresh permutations."""
    return grain.MapDataset.range(n_windows).shuffle(seed=grain_seed(seed, "train")).repeat()


def eval_order(n_windows: int, count: int) -> grain.MapDataset:
    """The first `count` windows of one fixed permutation: spread over the whole split, and the
    set for a smaller count is a prefix of the set for a larger one."""
    return grain.MapDataset.range(n_windows).shuffle(seed=grain_seed(EVAL_SEED, "eval"))[:count]


def batches(order: grain.MapDataset, rows: int, reader: WindowReader) -> grain.MapDataset:
    """Element j = the rows [j·rows, (j+1)·rows) of `order`, read as windows.

    With rows = B / P, element k·P + p is process p's share of global batch k.
    """
    return order.batch(rows).map(reader)
