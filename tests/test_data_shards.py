"""Sharded token caches: the shards read as one stream equal one file batch for batch; preparation
in worker processes and in several processes splits the work, resumes after a kill and ends
identical; a partly prepared cache is refused in one line; a split's size is known without
tokenizing."""

import copy
import hashlib
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lm.config import ConfigError
from lm.data import DataError, build_dataset, shards, split_tokens
from lm.data.dataset import Dataset, get_tokenizer
from lm.data.prepare import process_share
from lm.data.sources import TRAIN, open_corpus

from .conftest import ROOT, data_config

SHARD_DOCUMENTS = 7


@pytest.fixture
def config(tmp_path):
    """A folder of 120 documents of 1 to 400 characters (some shorter than a window), seq_len 16."""
    folder = tmp_path / "text"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(120):
        (folder / f"{i:03d}.txt").write_text("".join(rng.choice(list("abcdefgh é\n"), rng.integers(1, 400))))
    return data_config(tmp_path / "data", dataset="folder", text_dir=str(folder), seq_len=16, batch_size=4,
                       eval_batches=2)


def one_file(corpus, split, tokenizer):
    """What the single-file cache held: every document's tokens, then EOS, in the stored order."""
    source = corpus.source(split)
    texts = corpus.texts(source, range(len(source)))
    return np.concatenate([np.append(tokenizer.encode(t.decode()), tokenizer.eos_id) for t in texts])


def prepare_all(c, **kwargs):
    corpus, tokenizer = open_corpus(c.data), get_tokenizer(c.data)
    return [shards.prepare(c.data, corpus, split, tokenizer, shard_documents=SHARD_DOCUMENTS, **kwargs)
            for split in (TRAIN, corpus.eval_split)]


def cache_of(c, split=TRAIN):
    return shards.split_dir(open_corpus(c.data), split, get_tokenizer(c.data).name)


def test_stream_windows_cross_shards():
    parts = [np.arange(n, dtype=np.uint16) + 100 * k for k, n in enumerate([5, 1, 3, 7])]
    stream, whole = shards.Stream(parts, "uint16"), np.concatenate(parts)
    assert len(stream) == 16 and np.array_equal(stream.windows([0], 16), whole[None])
    for length in (1, 2, 4, 9):
        starts = np.arange(len(whole) - length + 1)
        rows = stream.windows(starts, length)
        assert rows.dtype == np.int32 and np.array_equal(rows, whole[starts[:, None] + np.arange(length)])
    with pytest.raises(IndexError, match="windows of 4 tokens from 0 to 13 do not fit in a stream of 16"):
        stream.windows([0, 13], 4)


def test_shards_equal_one_file_batch_for_batch(config):
    prepare_all(config)
    ds = build_dataset(config)  # reads the manifests: nothing is tokenized again
    corpus, tokenizer = open_corpus(config.data), get_tokenizer(config.data)
    assert ds.info["train"]["shards"] == -(-ds.info["train"]["documents"] // SHARD_DOCUMENTS) > 10
    files = {split: one_file(corpus, split, tokenizer) for split in (TRAIN, corpus.eval_split)}
    directory = cache_of(config)
    manifest = shards.read_manifest(directory)
    stream = shards.open_stream(directory, manifest)
    assert np.array_equal(stream.windows([0], len(stream))[0], files[TRAIN])
    for record, part in zip(manifest["shards"], stream.parts, strict=True):
        assert record["sha256"] == hashlib.sha256(part.tobytes()).hexdigest()
    assert manifest["tokens"] == len(files[TRAIN]) and manifest["dtype"] == "uint16"
    assert set(manifest) == {"dataset", "split", "tokenizer", "documents", "shard_documents", "dtype",
                             "bytes", "tokens", "shards"}
    assert [r["first"] for r in manifest["shards"]] == list(range(0, manifest["documents"], SHARD_DOCUMENTS))
    assert sum(r["documents"] for r in manifest["shards"]) == manifest["documents"]
    one = {split: shards.Stream([tokens], "uint16") for split, tokens in files.items()}
    single = Dataset(config.data, tokenizer, one[TRAIN], one[corpus.eval_split], copy.deepcopy(ds.info))
    for step in (0, 1, 2, 17, 999, 12345):
        assert np.array_equal(ds.train_batch(step), single.train_batch(step))
        assert np.array_equal(ds.train_batch(step, 1, 2), single.train_batch(step, 1, 2))
    assert all(np.array_equal(a, b) for a, b in zip(ds.eval_batches(), single.eval_batches(), strict=True))


def test_a_killed_preparation_resumes_and_ends_identical(config, tmp_path):
    """Killed (os._exit, no clean-up) while writing shard 3: training refuses the partial cache in
    one line unless data.prepare asks, then only the unfinished shards are tokenized."""
    code = f"""
        import os
        from configs.train import get_config
        from lm.data import shards
        from lm.data.dataset import get_tokenizer
        from lm.data.sources import TRAIN, open_corpus

        chunks = shards.Tokenizing._chunks
        def dying(self, documents, stats, digest):
            for n, tokens in enumerate(chunks(self, documents, stats, digest)):
                if documents.start == 3 * {SHARD_DOCUMENTS} and n == 1:
                    os._exit(9)
                yield tokens
        shards.Tokenizing._chunks = dying
        shards.READ_CHUNK = 4  # two chunks a shard: the kill lands between them
        c = get_config()
        c.data.update({config.data.to_dict()!r})
        corpus = open_corpus(c.data)
        shards.prepare(c.data, corpus, TRAIN, get_tokenizer(c.data), shard_documents={SHARD_DOCUMENTS})
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    directory = cache_of(config)
    plan = shards.read_plan(directory)
    assert shards.missing_shards(directory, plan) == list(range(3, plan.shards))
    assert list(directory.glob(".00003-*.raw"))  # the killed writer's temporary
    with pytest.raises(DataError) as e:
        build_dataset(config)
    message = str(e.value)
    assert f"is partly prepared: {plan.shards - 3} of {plan.shards} shards are missing (00003-of-" in message
    assert "python -m lm.data.prepare --config=" in message and "\n" not in message
    done = {p.name: p.stat().st_mtime_ns for p in directory.glob("0000[012]-*")}
    config.data.prepare = True
    ds = build_dataset(config)
    assert {p.name: p.stat().st_mtime_ns for p in directory.glob("0000[012]-*")} == done
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]
    fresh = copy.deepcopy(config)
    fresh.data.data_dir = str(tmp_path / "fresh")
    prepare_all(fresh)
    assert shards.read_manifest(directory) == shards.read_manifest(cache_of(fresh))
    assert ds.info["train"]["tokens"] == shards.read_manifest(directory)["tokens"]


def test_two_processes_split_the_work_and_agree_with_one(config, tmp_path):
    """Process 0 (two worker processes) and process 1 (one) prepare one data dir side by side."""
    args = [f"--config={ROOT / 'configs' / 'train.py'}", "--config.data.dataset=folder",
            f"--config.data.text_dir={config.data.text_dir}",
            f"--config.data.data_dir={config.data.data_dir}", f"--shard_documents={SHARD_DOCUMENTS}",
            "--num_processes=2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-m", "lm.data.prepare", *args, f"--process_id={p}",
                               f"--workers={2 - p}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    one = copy.deepcopy(config)
    one.data.data_dir = str(tmp_path / "one")
    prepare_all(one)
    corpus = open_corpus(config.data)
    for split in (TRAIN, corpus.eval_split):
        assert shards.read_manifest(cache_of(config, split)) == shards.read_manifest(cache_of(one, split))
    n = shards.read_plan(cache_of(config)).shards
    for p, (out, _) in enumerate(outs):
        assert f"train with bytes: {len(range(p, n, 2))} of {n} shards" in out
        assert f"in {2 - p} worker" in out
    assert sum(out.count("prepared lm_text_folder") for out, _ in outs) >= 2  # each split by its last process


def test_the_plan_of_a_started_cache_is_kept(config):
    corpus, tokenizer = open_corpus(config.data), get_tokenizer(config.data)
    half = shards.prepare(config.data, corpus, TRAIN, tokenizer, share=(0, 2),
                          shard_documents=SHARD_DOCUMENTS)
    assert half.manifest is None and half.tokens > 0
    with pytest.raises(DataError, match=rf"--shard_documents=5 is not allowed: .*plan.json was started with "
                                        rf"{SHARD_DOCUMENTS}"):
        shards.prepare(config.data, corpus, TRAIN, tokenizer, share=(1, 2), shard_documents=5)
    rest = shards.prepare(config.data, corpus, TRAIN, tokenizer, share=(1, 2))
    assert rest.manifest["shard_documents"] == SHARD_DOCUMENTS
    assert rest.manifest["tokens"] == half.tokens + rest.tokens
    assert split_tokens(config.data) == rest.manifest["tokens"]


def test_split_tokens_reads_the_manifest_and_builds_nothing(config, tmp_path):
    stdlib = data_config(tmp_path / "elsewhere").data
    assert split_tokens(stdlib) is None and not (tmp_path / "elsewhere").exists()
    assert split_tokens(config.data) is None  # the folder is not built yet
    ds = build_dataset(config)
    assert split_tokens(config.data) == ds.info["train"]["tokens"]
    assert split_tokens(config.data, ds.info["eval"]["split"]) == ds.info["eval"]["tokens"]
    with pytest.raises(DataError, match=r"split = 'dev' is not one of the splits .*'train' or 'validation'"):
        split_tokens(config.data, "dev")
    config.data.update(tokenizer="sentencepiece", sp_vocab_size=300)
    assert split_tokens(config.data) is None  # no SentencePiece model trained yet


def test_a_damaged_or_missing_shard_is_named(config):
    prepare_all(config)
    directory = cache_of(config)
    shard = sorted(directory.glob("*.npy"))[2]
    np.save(shard, np.zeros(3, np.uint16))
    with pytest.raises(DataError, match=rf"{re.escape(str(shard))}: holds 3 uint16 tokens where "
                                        rf"manifest.json says \d+ uint16: delete it, {shard.stem}.json and "
                                        "manifest.json"):
        build_dataset(config)
    shard.unlink()
    with pytest.raises(DataError, match=rf"{re.escape(str(shard))}: No such file or directory, though "
                                        "manifest.json lists it"):
        build_dataset(config)


def test_open_file_limit(monkeypatch):
    calls = []
    monkeypatch.setattr(shards.resource, "getrlimit", lambda _: (1024, 4096))
    monkeypatch.setattr(shards.resource, "setrlimit", lambda _, limits: calls.append(limits))
    shards._allow_open_files(100)
    shards._allow_open_files(2000)
    assert len(calls) == 1 and 2000 < calls[0][0] <= 4096 and calls[0][1] == 4096
    with pytest.raises(DataError, match=r"has 5000 shards, one open file each, .* at most 4096 files"):
        shards._allow_open_files(5000)


def test_default_plan_and_progress():
    assert shards.default_shard_documents(730, 12 << 20) == 730  # the embedded corpus: one shard
    assert shards.default_shard_documents(30_000_000, 4 << 30) == 468_750  # lm1b-like: 64 shards
    assert shards.default_shard_documents(365_000_000, 800 << 30) == 89_112  # c4-like: 4096 shards
    assert shards.default_shard_documents(3, 1 << 30) == 1
    line = shards.progress_line("c4 train", 3, 12, 3_000_000, 60.0)
    assert line == "lm.data: c4 train: 3/12 shards, 3,000,000 tokens, 50,000 tokens/s, ETA 3m00s"
    assert shards.progress_line("x", 2, 2, 10, 3725.0).endswith("done in 1h02m")


def test_process_share():
    assert process_share(None, None, {}) == (0, 1)
    assert process_share(4, 3, {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}) == (3, 4)
    array = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1",
             "SLURM_ARRAY_TASK_STEP": "2"}  # --array=1-7:2
    assert process_share(None, None, array) == (3, 4)
    with pytest.raises(ConfigError, match=r"--process_id=2 is not allowed: must lie in \[0, "
                                          r"--num_processes = 2\)"):
        process_share(2, 2, {})
    with pytest.raises(ConfigError, match="--num_processes and --process_id go together"):
        process_share(2, None, {})


@pytest.mark.parametrize("args, message", [
    (["--workers=0"], "--workers=0 is not allowed: must be a positive integer"),
    (["--dataset=lm1b", "--workers=2"],
     "--workers applies to tokenizing, not to --dataset (downloading): run them one after the other"),
])
def test_prepare_flags_are_one_line(tmp_path, args, message):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "lm.data.prepare", *args, f"--data_dir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stderr.splitlines()) == (1, [f"error: {message}"])
    assert not any(tmp_path.iterdir())



def test_the_benchmark_times_preparation(config):
    from lm import bench

    r = bench.prepare_benchmark(config.data, (1,))
    assert r["prepare_shards"] == 4 and r["prepare_tokens_per_s_1"] > 0 and r["worker_tokens_per_s_1"] > 0
    assert [p.name for p in open_corpus(config.data).cache_dir.iterdir()] == []  # the scratch cache is gone
    assert bench.worker_counts("1,2") == (1, 2)
    with pytest.raises(ConfigError, match=r"--workers='1,x' is not allowed: must be worker counts, e.g. 1,2"):
        bench.worker_counts("1,x")
