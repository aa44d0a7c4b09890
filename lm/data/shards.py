"""The sharded token cache of one (dataset, split, tokenizer): its plan, its preparation by worker
processes and by several processes at once (hosts, SLURM array tasks), resumable shard by shard,
and its shards read back as one memory-mapped stream.

A split's documents are cut into shards of `shard_documents` consecutive documents: the plan,
fixed by whoever starts and kept in plan.json. Shard i's tokens (each document followed by EOS)
are one .npy, written atomically, then its record beside it (documents, UTF-8 bytes, tokens and
the sha256 of the tokens): a shard with a record is done, one without is tokenized again from
its first document. Once every shard is done, manifest.json lists them; it depends on the data
and the plan only, never on which process made which shard. Read back, the shards are one
stream: the tokens, in the order, that one file would hold, so no batch depends on the plan.

    <data_dir>/lm_cache/<dataset>/<tokenizer>/<split>/
        plan.json  manifest.json  00000-of-00012.npy  00000-of-00012.json  ...
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import math
import multiprocessing
import os
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import ml_collections
import numpy as np

from lm.data.settings import DataError, writing
from lm.data.sources import Corpus, open_corpus
from lm.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, Tokenizer
from lm.files import file_lock, load_array, read_json, write_array_atomic, write_json_atomic

PLAN, MANIFEST = "plan.json", "manifest.json"
SHARD_BYTES = 64 << 20  # stored text per shard in the default plan
MAX_SHARDS = 4096  # a shard is one open file (its memory map) in every process that trains on it
READ_CHUNK = 512  # documents read and tokenized together
PROGRESS_SECONDS = 10.0  # at most one progress line this often, and one at the end
SPARE_FILES = 256  # open files kept free for everything else when the limit is raised


@dataclasses.dataclass(frozen=True)
class Plan:
    """A split of `documents` documents cut into shards of `shard_documents` in a row."""

    documents: int
    shard_documents: int
    dtype: str  # of the stored tokens: uint16 when the vocabulary fits, else int32

    @property
    def shards(self) -> int:
        return -(-self.documents // self.shard_documents)

    def documents_of(self, i: int) -> range:
        return range(i * self.shard_documents, min((i + 1) * self.shard_documents, self.documents))

    def name(self, i: int) -> str:
        return f"{i:05d}-of-{self.shards:05d}"


def default_shard_documents(documents: int, n_bytes: int) -> int:
    """Documents per shard for about SHARD_BYTES of stored text each, in at most MAX_SHARDS shards."""
    shards = max(min(math.ceil(n_bytes / SHARD_BYTES), MAX_SHARDS, documents), 1)
    return max(math.ceil(documents / shards), 1)


def token_dtype(tokenizer: Tokenizer) -> str:
    return "uint16" if tokenizer.vocab_size <= 1 << 16 else "int32"


def split_dir(corpus: Corpus, split: str, tokenizer_name: str) -> Path:
    """Where the token cache of (corpus, split, tokenizer) lives."""
    return corpus.cache_dir / tokenizer_name / split


def read_plan(directory: Path) -> Plan | None:
    path = directory / PLAN
    if not path.exists():
        return None
    fields = [f.name for f in dataclasses.fields(Plan)]
    return Plan(**{k: v for k, v in read_json(path, keys=fields).items() if k in fields})


def read_manifest(directory: Path) -> dict | None:
    """The manifest of a complete token cache; None while any shard is missing."""
    path = directory / MANIFEST
    return read_json(path, keys=("dtype", "shards", "tokens")) if path.exists() else None


def record_path(directory: Path, plan: Plan, i: int) -> Path:
    """Shard i's record: it exists once the shard is done."""
    return directory / f"{plan.name(i)}.json"


def missing_shards(directory: Path, plan: Plan) -> list[int]:
    return [i for i in range(plan.shards) if not record_path(directory, plan, i).exists()]


def _fix_plan(directory: Path, wanted: Plan, explicit: bool) -> Plan:
    """The plan of whoever started on `directory`, else `wanted`, recorded now; an explicit shard
    size other than the recorded one is refused (its shards would not fit the others)."""
    path = directory / PLAN
    with file_lock(path):
        plan = read_plan(directory)
        if plan is None:
            write_json_atomic(path, dataclasses.asdict(wanted))
            return wanted
    if explicit and plan.shard_documents != wanted.shard_documents:
        raise DataError(f"--shard_documents={wanted.shard_documents} is not allowed: {path} was started "
                        f"with {plan.shard_documents}; use that (or leave it out), or delete {directory}")
    if (plan.documents, plan.dtype) != (wanted.documents, wanted.dtype):
        raise DataError(f"{path}: plans {plan.documents} documents of {plan.dtype} tokens, but the split "
                        f"has {wanted.documents} of {wanted.dtype}: delete {directory} and prepare it again")
    return plan


def _names(plan: Plan, shards: Sequence[int], shown: int = 4) -> str:
    more = f", and {len(shards) - shown} more" if len(shards) > shown else ""
    return ", ".join(plan.name(i) for i in shards[:shown]) + more


def check_not_partial(directory: Path, what: str) -> None:
    """DataError when `directory` holds some shards but not all: a preparation may still be
    running, and tokenizing the rest here could take days (a cache with none is a fresh one)."""
    plan = read_plan(directory)
    left = missing_shards(directory, plan) if plan else []
    if 0 < len(left) < plan.shards:
        raise DataError(f"{what} in {directory} is partly prepared: {len(left)} of {plan.shards} shards "
                        f"are missing ({_names(plan, left)}); a preparation is running or was stopped: "
                        f"finish it with `python -m lm.data.prepare --config=<this config>` (--workers, "
                        "--num_processes and --process_id share the work), or set config.data.prepare=True "
                        "to let this process tokenize what is missing")


@dataclasses.dataclass
class Tokenizing:
    """Tokenizing shards of one split into `directory` by `plan`; `read_threads` read and tokenize
    chunks ahead (0: in the calling thread, as a one-CPU worker process does)."""

    corpus: Corpus
    split: str
    tokenizer: Tokenizer
    directory: Path
    plan: Plan
    read_threads: int = 2

    def __post_init__(self) -> None:
        self.source = self.corpus.source(self.split)

    def _chunks(self, documents: range, stats: dict, digest: Any) -> Iterator[np.ndarray]:
        """The documents' tokens, each document followed by EOS; counts them and hashes the tokens."""
        eos = np.array([self.tokenizer.eos_id], dtype=np.int32)

        def encode(indices: np.ndarray) -> tuple[np.ndarray, int, int]:
            texts = self.corpus.texts(self.source, indices.tolist())
            ids = self.tokenizer.encode_batch([t.decode("utf-8", errors="replace") for t in texts])
            tokens = np.concatenate([part for doc in ids for part in (doc, eos)]).astype(self.plan.dtype)
            return tokens, len(texts), sum(map(len, texts))

        chunks = grain.MapDataset.range(documents.start, documents.stop).batch(READ_CHUNK).map(encode)
        ahead = grain.ReadOptions(num_threads=self.read_threads, prefetch_buffer_size=2 * self.read_threads)
        for tokens, docs, n_bytes in chunks.to_iter_dataset(ahead):
            stats["documents"] += docs
            stats["bytes"] += n_bytes
            digest.update(tokens)
            yield tokens

    def shard(self, i: int) -> tuple[dict, bool]:
        """Shard i's record, tokenizing and writing the shard first unless it is done; and whether
        it was tokenized now."""
        name = self.plan.name(i)
        path, record = self.directory / f"{name}.npy", record_path(self.directory, self.plan, i)
        with file_lock(path):
            if record.exists():
                return read_json(record), False
            for stale in self.directory.glob(f".{name}.*"):  # a killed writer's temporaries
                stale.unlink()
            documents, digest = self.plan.documents_of(i), hashlib.sha256()
            stats = {"documents": 0, "bytes": 0}
            chunks = self._chunks(documents, stats, digest)
            tokens = write_array_atomic(path, chunks, np.dtype(self.plan.dtype))
            stats.update(file=path.name, first=documents.start, tokens=tokens, sha256=digest.hexdigest())
            write_json_atomic(record, stats)
        return stats, True


# Worker processes: each opens the corpus and the tokenizer once, then tokenizes shards by index.

_worker: Tokenizing | None = None


def _start_worker(data: dict, split: str, model: str, directory: str, plan: dict) -> None:
    global _worker
    corpus = open_corpus(ml_collections.ConfigDict(data))
    tokenizer = SentencePieceTokenizer(Path(model), threads=1) if model else ByteTokenizer()
    _worker = Tokenizing(corpus, split, tokenizer, Path(directory), Plan(**plan), read_threads=0)


Timed = tuple[dict, bool, float, float, float]


def _timed(work: Tokenizing, i: int) -> Timed:
    """(record, whether tokenized now, CPU seconds, wall-clock start and end) of shard i."""
    start, cpu = time.time(), time.process_time()
    record, fresh = work.shard(i)
    return record, fresh, time.process_time() - cpu, start, time.time()


def _in_worker(i: int) -> Timed:
    return _timed(_worker, i)


def _results(work: Tokenizing, data_cfg: ml_collections.ConfigDict, todo: list[int], workers: int,
             ) -> Iterator[Timed]:
    """`_timed` of each shard in `todo`: in this process (workers = 0), else in `workers` one-CPU
    processes, as they finish."""
    if workers == 0:
        yield from (_timed(work, i) for i in todo)
        return
    spec = (data_cfg.to_dict(), work.split, str(getattr(work.tokenizer, "path", "")), str(work.directory),
            dataclasses.asdict(work.plan))
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_start_worker, initargs=spec)
    try:
        for future in concurrent.futures.as_completed([pool.submit(_in_worker, i) for i in todo]):
            yield future.result()
    finally:
        pool.shutdown(cancel_futures=True)


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + "s" * (n != 1)


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_line(label: str, done: int, total: int, tokens: int, elapsed: float) -> str:
    """`label: 3/8 shards, 1,234 tokens, 5,678 tokens/s, ETA 1m05s` (the ETA from the pace so far)."""
    rate = tokens / elapsed if elapsed > 0 else 0.0
    eta = (f"ETA {_duration(elapsed * (total - done) / done)}" if done < total else
           f"done in {_duration(elapsed)}")
    return f"lm.data: {label}: {done}/{total} shards, {tokens:,} tokens, {rate:,.0f} tokens/s, {eta}"


@dataclasses.dataclass
class Prepared:
    """What one `prepare` did: the manifest (None while other processes' shards are missing), and
    the tokens it tokenized, the seconds its workers spent on them (wall clock, and CPU), and the
    seconds from the first shard's start to the last one's end (process start-up left out)."""

    manifest: dict | None
    tokens: int = 0
    busy_s: float = 0.0
    cpu_s: float = 0.0
    wall_s: float = 0.0


def _finish(directory: Path, plan: Plan, about: dict) -> dict | None:
    """manifest.json, written by the first process to find no shard missing; None until then."""
    with file_lock(directory / PLAN):
        manifest = read_manifest(directory)
        if manifest is None and not missing_shards(directory, plan):
            records = [read_json(record_path(directory, plan, i)) for i in range(plan.shards)]
            manifest = {**about, **dataclasses.asdict(plan), "bytes": sum(r["bytes"] for r in records),
                        "tokens": sum(r["tokens"] for r in records), "shards": records}
            write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def _run(work: Tokenizing, data_cfg: ml_collections.ConfigDict, todo: list[int], workers: int,
         out: Callable[[str], None]) -> Prepared:
    """Tokenize the shards in `todo`, with progress lines; the manifest is left to the caller."""
    label, plan = f"{work.corpus.name} {work.split}", work.plan
    where = plural(workers, "worker") if workers else "this process"
    out(f"lm.data: tokenizing {label} with {work.tokenizer.name}: {len(todo)} of "
        f"{plural(plan.shards, 'shard')} ({plural(plan.shard_documents, 'document')} each) in {where} -> "
        f"{work.directory}")
    report, start, shown, first, last = Prepared(None), time.time(), 0.0, math.inf, 0.0
    for done, (record, fresh, cpu_s, began, ended) in enumerate(_results(work, data_cfg, todo, workers), 1):
        if fresh:
            report.tokens += record["tokens"]
            report.busy_s += ended - began
            report.cpu_s += cpu_s
            first, last = min(first, began), max(last, ended)
        if done == len(todo) or time.time() - shown >= PROGRESS_SECONDS:
            shown = time.time()
            out(progress_line(label, done, len(todo), report.tokens, shown - start))
    report.wall_s = max(last - first, 0.0)
    return report


def prepare(data_cfg: ml_collections.ConfigDict, corpus: Corpus, split: str, tokenizer: Tokenizer, *,
            directory: Path | None = None, workers: int = 0, share: tuple[int, int] = (0, 1),
            shard_documents: int | None = None, out: Callable[[str], None] = print) -> Prepared:
    """Tokenize this process's share of the split's missing shards (process p of P takes shards
    p, p + P, ...) in `workers` one-CPU processes (0: in this one, with its threads), then write
    the manifest if no shard is missing.

    The plan is the recorded one, else `shard_documents` per shard, else `default_shard_documents`.
    """
    directory = directory or split_dir(corpus, split, tokenizer.name)
    with writing(f"the token cache of {corpus.name} {split}", directory):
        if (manifest := read_manifest(directory)) is not None:
            return Prepared(manifest)
        documents = len(corpus.source(split))
        per_shard = shard_documents or default_shard_documents(documents, corpus.split_bytes(split))
        wanted = Plan(documents, per_shard, token_dtype(tokenizer))
        plan = _fix_plan(directory, wanted, explicit=shard_documents is not None)
        process, processes = share
        todo = [i for i in missing_shards(directory, plan) if i % processes == process]
        work = Tokenizing(corpus, split, tokenizer, directory, plan)
        report = _run(work, data_cfg, todo, min(workers, len(todo)), out) if todo else Prepared(None)
        report.manifest = _finish(directory, plan, {"dataset": corpus.name, "split": split,
                                                    "tokenizer": tokenizer.name})
    return report


# Reading: the shards as one stream.

class Stream:
    """Shards read as one token stream; `windows` cuts rows out of it, across shard boundaries too."""

    def __init__(self, parts: Sequence[np.ndarray], dtype: str) -> None:
        self.parts, self.dtype = list(parts), np.dtype(dtype)
        self.ends = np.cumsum([len(p) for p in self.parts], dtype=np.int64)
        self.begins = self.ends - [len(p) for p in self.parts]

    def __len__(self) -> int:
        return int(self.ends[-1]) if self.parts else 0

    def _span(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start + length] from every shard it touches."""
        first, last = np.searchsorted(self.ends, [start, start + length - 1], side="right")
        return np.concatenate([self.parts[s][max(start - self.begins[s], 0):start + length - self.begins[s]]
                               for s in range(first, last + 1)])

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows tokens[s : s + length] for each start s: int32 [len(starts), length]. A row inside
        one shard (all but a few) is one vectorized gather per shard from its memory map."""
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        if len(starts) and (starts.min() < 0 or starts.max() + length > len(self)):
            raise IndexError(f"windows of {length} tokens from {starts.min()} to {starts.max()} do not fit "
                             f"in a stream of {len(self)}")
        rows = np.empty((len(starts), length), np.int32)
        first = np.searchsorted(self.ends, starts, side="right")
        inside = first == np.searchsorted(self.ends, starts + length - 1, side="right")
        for s in np.unique(first[inside]):
            here = np.flatnonzero(inside & (first == s))
            rows[here] = self.parts[s][(starts[here] - self.begins[s])[:, None] + np.arange(length)]
        for i in np.flatnonzero(~inside):
            rows[i] = self._span(int(starts[i]), length)
        return rows


def _allow_open_files(n: int) -> None:
    """Each memory-mapped shard holds a file descriptor: raise this process's soft limit on open
    files to fit `n` more, or say why not (the hard limit is the administrator's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = len(os.listdir("/dev/fd")) + n + SPARE_FILES
    if need <= soft:
        return
    if hard != resource.RLIM_INFINITY and need > hard:
        raise DataError(f"the token cache has {n} shards, one open file each, but this process may open "
                        f"at most {hard} files (ulimit -Hn): ask for a higher limit, or prepare it again "
                        "with fewer shards (python -m lm.data.prepare --shard_documents=...)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _part(directory: Path, record: dict, dtype: str) -> np.ndarray:
    """One shard, memory-mapped; DataError naming it when it is missing or not what its record says."""
    path = directory / record["file"]
    fix = (f"delete it, {path.with_suffix('.json').name} and {MANIFEST}, then prepare again (only that "
           "shard is redone)")
    try:
        part = load_array(path)
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or e
        raise DataError(f"{path}: {reason}, though {MANIFEST} lists it: {fix}") from None
    if part.shape != (record["tokens"],) or part.dtype != dtype:
        raise DataError(f"{path}: holds {part.size} {part.dtype} tokens where {MANIFEST} says "
                        f"{record['tokens']} {dtype}: {fix}")
    return part


def open_stream(directory: Path, manifest: dict) -> Stream:
    """The manifest's shards, memory-mapped, as one stream."""
    _allow_open_files(len(manifest["shards"]))
    return Stream([_part(directory, r, manifest["dtype"]) for r in manifest["shards"]], manifest["dtype"])
