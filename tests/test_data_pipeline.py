"""Batches: a pure function of (dataset, seed, step), split across processes, fixed validation."""

import errno
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lm.config import ConfigError
from lm.data import DataError, build_dataset, shards, sources, to_global
from lm.data.sources import unit_hash

from .conftest import ROOT, data_config, run_python


@pytest.fixture(scope="module")
def stdlib(data_dir):
    return build_dataset(data_config(data_dir))


def test_batch_shape_and_cache(stdlib, data_dir, capsys):
    batch = stdlib.train_batch(0)
    assert batch.shape == (8, 33) and batch.dtype == np.int32
    assert batch.max() < 257 and stdlib.info["train"]["tokens"] > 5_000_000
    again = build_dataset(data_config(data_dir))  # reads the cache: no tokenizing
    assert "tokenizing" not in capsys.readouterr().out
    assert np.array_equal(again.train_batch(0), batch)
    manifest = shards.read_manifest(data_dir / "lm_cache" / stdlib.info["dataset"] / "bytes" / "train")
    assert manifest["dtype"] == "uint16" and manifest["tokens"] == stdlib.info["train"]["tokens"]


def test_batches_are_a_function_of_seed_and_step(stdlib, data_dir):
    other = build_dataset(data_config(data_dir))
    for step in (0, 1, 7, 12345):
        assert np.array_equal(stdlib.train_batch(step), other.train_batch(step))
    reseeded = build_dataset(data_config(data_dir, seed=1))
    assert not np.array_equal(stdlib.train_batch(0), reseeded.train_batch(0))
    uninterrupted = [stdlib.train_batch(k) for k in range(20)]
    resumed = build_dataset(data_config(data_dir))  # a restart at step 10
    assert all(np.array_equal(resumed.train_batch(k), uninterrupted[k]) for k in range(10, 20))
    assert not np.array_equal(uninterrupted[0], uninterrupted[1])


def test_windows_overlap_by_one_token(data_dir):
    c = data_config(data_dir, eval_batches=1)
    ds = build_dataset(c)
    directory = data_dir / "lm_cache" / ds.info["dataset"] / "bytes" / "validation"
    tokens = shards.open_stream(directory, shards.read_manifest(directory))
    windows = {tuple(row) for row in tokens.windows(np.arange(ds.info["eval"]["windows"]) * 32, 33)}
    rows = next(ds.eval_batches())
    assert all(tuple(row) in windows for row in rows)


def test_epochs_cover_every_window_once_and_reshuffle(tmp_path):
    folder = tmp_path / "text"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        (folder / f"{i}.txt").write_text("".join(rng.choice(list("abcdefgh"), 700)))
    ds = build_dataset(data_config(tmp_path / "data", dataset="folder", text_dir=str(folder),
                                   seq_len=16, batch_size=1, eval_batches=1))
    n = ds.num_train_windows
    assert n > 100

    def epoch(e):
        return [tuple(ds.train_batch(k)[0]) for k in range(e * n, (e + 1) * n)]

    first, second = epoch(0), epoch(1)
    assert len(set(first)) == n and set(second) == set(first)
    assert first != second


def test_processes_read_disjoint_rows_of_the_global_batch(stdlib):
    for step in (0, 5):
        whole = stdlib.train_batch(step)
        parts = [stdlib.train_batch(step, p, 2) for p in range(2)]
        assert all(p.shape == (4, 33) for p in parts)
        assert np.array_equal(np.concatenate(parts), whole)
        quarters = [stdlib.train_batch(step, p, 4) for p in range(4)]
        assert np.array_equal(np.concatenate(quarters), whole)
    with pytest.raises(ConfigError, match="divisible by the 3 processes"):
        stdlib.train_batch(0, 0, 3)
    with pytest.raises(DataError, match="process_index = 2"):
        stdlib.train_batch(0, 2, 2)


def test_eval_set_is_fixed_and_independent_of_the_seed(stdlib, data_dir):
    batches = list(stdlib.eval_batches())
    assert len(batches) == stdlib.num_eval_batches == 2 and stdlib.num_eval_windows == 16
    reseeded = build_dataset(data_config(data_dir, seed=3))
    assert all(np.array_equal(a, b) for a, b in zip(batches, reseeded.eval_batches(), strict=True))
    shares = [list(stdlib.eval_batches(p, 2)) for p in range(2)]
    assert all(np.array_equal(np.concatenate([shares[0][i], shares[1][i]]), batches[i]) for i in range(2))
    more = list(build_dataset(data_config(data_dir, eval_batches=4)).eval_batches())
    assert all(np.array_equal(a, b) for a, b in zip(batches, more[:2], strict=True))


def test_short_validation_split_warns_and_empty_one_fails(data_dir, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_dataset(data_config(data_dir, eval_batches=1_000_000))
    assert ds.num_eval_batches == ds.info["eval"]["windows"] // 8
    assert any("not data.eval_batches = 1000000" in str(w.message) for w in caught)
    folder = tmp_path / "one"
    folder.mkdir()
    held, kept = sorted(["held.txt", "kept.txt"], key=unit_hash)
    (folder / kept).write_text("a single document has no held-out part " * 20)
    c = data_config(tmp_path / "data", dataset="folder", text_dir=str(folder))
    with pytest.raises(DataError, match=r"text files under .*one\) has 1 non-empty documents"):
        build_dataset(c)
    (folder / held).write_text("short")  # held out, with fewer tokens than one window
    with pytest.raises(DataError, match=r"validation split of lm_text_folder.* has 0 windows"):
        build_dataset(c)


def test_to_global_on_a_cpu_mesh(stdlib):
    mesh = Mesh(np.array(jax.devices()).reshape(-1, 1, 1), ("data", "fsdp", "tensor"))
    batch = stdlib.train_batch(0)
    array = to_global(batch, NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None)))
    assert array.shape == batch.shape and np.array_equal(np.asarray(array), batch)


def test_to_global_shards_rows_over_data_and_fsdp(data_dir):
    proc = run_python(f"""
        import jax, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec
        from configs.train import get_config
        from lm.data import build_dataset, to_global
        c = get_config()
        c.data.data_dir, c.data.seq_len, c.data.batch_size = {str(data_dir)!r}, 32, 8
        ds = build_dataset(c)
        mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"))
        local = ds.train_batch(3)
        array = to_global(local, NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None)))
        assert np.array_equal(np.asarray(array), local)
        for shard in array.addressable_shards:
            assert shard.data.shape == (1, 33)
            assert np.array_equal(np.asarray(shard.data), local[shard.index])
        print("ok", len(array.addressable_shards))
    """, devices=8)
    assert "ok 8" in proc.stdout


def test_concurrent_builds_agree(tmp_path):
    code = textwrap.dedent(f"""
        from configs.train import get_config
        from lm.data import build_dataset
        c = get_config()
        c.data.data_dir = {str(tmp_path)!r}
        print("sum", build_dataset(c).train_batch(0).sum())
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    sums = [next(line for line in out.splitlines() if line.startswith("sum")) for out, _ in outs]
    assert sums[0] == sums[1]
    assert sum(out.count("lm.data: tokenizing") for out, _ in outs) == 2  # train + validation, once
    assert not list(tmp_path.rglob(".*.tmp")) and not list(tmp_path.rglob(".*.raw"))


def test_a_full_disk_is_one_data_error_naming_the_cache(tmp_path, monkeypatch):
    """A token cache that cannot be written (a full disk, simulated) names its path and the reason."""
    def full(path, chunks, dtype):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(shards, "write_array_atomic", full)
    with pytest.raises(DataError) as e:
        build_dataset(data_config(tmp_path))
    message = str(e.value)
    assert "/bytes/train/00000-of-00001.npy: No space left on device (writing the token cache of lm_stdlib/" \
        in message, message
    monkeypatch.undo()  # space freed: no shard was finished, so the next start tokenizes afresh
    assert build_dataset(data_config(tmp_path)).info["train"]["shards"] == 1


def test_a_full_disk_while_building_the_corpus_is_one_data_error(tmp_path, monkeypatch):
    """tfds's ArrayRecord writer reports a full disk as a RuntimeError, not an OSError: it too is one
    DataError naming the data_dir, and tfds leaves no incomplete.* folder behind."""
    def full(self, *args, **kwargs):
        Path(self.data_dir, "train.array_record-00000-of-00001").write_bytes(b"partial")
        raise RuntimeError('Failed to finalize writing of split "train": write() failed: '
                           'No space left on device')

    monkeypatch.setattr(sources.LmStdlib, "_download_and_prepare", full)
    with pytest.raises(DataError) as e:
        build_dataset(data_config(tmp_path))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{tmp_path}: No space left on device (writing dataset "
                                                      "lm_stdlib/"), message
    assert not [p for p in tmp_path.rglob("*") if "incomplete" in p.name], list(tmp_path.rglob("*"))
