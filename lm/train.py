"""Train one model: `python -m lm.train --config=configs/train.py --workdir=DIR [--config.x=y]`.

The hot path is one AOT-compiled `jax.jit` step over a pure state dict (params, optimizer
state, step) with explicit shardings and donated buffers; the host reads metrics only at
log, eval and checkpoint boundaries. Everything a scaling study needs lands in the workdir:
config.json, metrics.jsonl, TensorBoard events, checkpoints/ and result.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lm import data as data_lib
from lm import model as model_lib
from lm import optim, sharding
from lm.checkpoint import Checkpointer, abstract_with_shardings
from lm.config import ConfigError, num_steps, validate
from lm.evaluate import make_eval_step
from lm.files import FileError, RunLock, read_json, write_bytes_atomic, write_json_atomic
from lm.metrics import MetricsWriter, format_duration, utilization
from lm.process import setup
from lm.sizing import count_params, flops_per_token, flops_per_token_6n

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: rerun the same command to continue
EXIT_DIVERGED = 3


def config_hash(config: ml_collections.ConfigDict) -> str:
    return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RunShape:
    """Numbers derived from the config once, before anything compiles."""

    steps: int
    tokens_per_step: int
    flops_per_token: float
    n_params: int
    n_params_non_embedding: int
    peak_lr: float

    @classmethod
    def of(cls, config: ml_collections.ConfigDict) -> RunShape:
        pc = count_params(config.model)
        return cls(num_steps(config), config.data.batch_size * config.data.seq_len,
                   flops_per_token(config.model, config.data.seq_len), pc.total, pc.non_embedding,
                   optim.peak_lr(config.optim, config.model.d_model))


def make_loss_fn(graphdef, z_loss: float):
    def loss_fn(params, batch):
        logits = model_lib.apply(graphdef, params, batch[:, :-1])
        ce, total = model_lib.cross_entropy(logits, batch[:, 1:], z_loss)
        return total, ce

    return loss_fn


def make_train_step(graphdef, config: ml_collections.ConfigDict):
    """state, batch [B, T+1], schedule (optim.schedule_args) -> state, metrics; gradients
    accumulate over micro-batches."""
    loss_fn = make_loss_fn(graphdef, config.optim.z_loss)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    m = config.train.microbatches

    def step(state, batch, sched):
        params = state["params"]
        lr = optim.schedule(config.optim, sched)
        tx = optim.make_optimizer(config.optim, lr, params)
        if m == 1:
            (_, ce), grads = grad_fn(params, batch)
        else:
            # Micro-batch i takes rows i, i+m, ...: every data shard contributes to each one.
            micro = batch.reshape(batch.shape[0] // m, m, -1).swapaxes(0, 1)

            def accumulate(carry, mb):
                mb = sharding.constrain(mb, ("batch", "length"))
                (_, ce), g = grad_fn(params, mb)
                return jax.tree.map(jnp.add, carry, (ce, g)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (ce, grads), _ = jax.lax.scan(accumulate, zeros, micro)
            ce, grads = ce / m, jax.tree.map(lambda g: g / m, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                     "step": state["step"] + 1}
        metrics = {"loss": ce, "grad_norm": optax.tree.norm(grads), "lr": lr(state["step"])}
        return new_state, metrics

    return step


class Preemption:
    """USR2 (SLURM's time-limit notice, submitit's signal), SIGTERM (preemption, scancel) and
    SIGINT ask the run to save a checkpoint at the next step boundary and stop.

    One process: a flag the loop polls. Several: every process must stop at the same step, which
    JAX's preemption service agrees on (`reached_preemption`); it listens for SIGTERM itself, so
    SIGTERM is left to it and USR2 or SIGINT is passed on to it as SIGTERM. `received` keeps the
    signal for whoever ran the loop (a submitit job hands USR2 on to submitit, which requeues it).
    """

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
    received: int | None = None  # the last signal that stopped a run in this process

    def __init__(self):
        self.requested = False
        self.shared = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS
                         if not (self.shared and sig == signal.SIGTERM)}

    def _handle(self, signum, frame):
        print(f"\nsignal {signal.Signals(signum).name}: saving a checkpoint and stopping",
              flush=True)
        Preemption.received = signum
        if self.shared:
            signal.raise_signal(signal.SIGTERM)  # to JAX's preemption notifier
        else:
            self.requested = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _without_mesh(config: dict) -> dict:
    """The parts of a config that define the run: the mesh may change between restarts."""
    return {k: v for k, v in config.items() if k != "mesh"}


def workdir_path(workdir: str | Path) -> Path:
    """The run directory, absolute; an empty name (the current directory) or a file is refused."""
    if not str(workdir).strip():
        raise ConfigError("--workdir = '' is not allowed: name the run directory (created if missing)")
    path = Path(workdir).absolute()
    if path.exists() and not path.is_dir():
        raise FileError(f"{path}: not a directory (--workdir names the run directory)")
    return path


def needs_wipe(workdir: Path, config: ml_collections.ConfigDict, overwrite: bool) -> bool:
    """Whether `workdir` holds a run with another config, which only `overwrite` discards."""
    saved = workdir / "config.json"
    if not saved.exists() or _without_mesh(read_json(saved)) == _without_mesh(
            json.loads(config.to_json())):
        return False
    if not overwrite:
        raise ConfigError(
            f"{workdir} holds a run with a different config ({saved}); use another workdir, "
            "or --overwrite to discard that run and start again")
    return True


def has_checkpoints(workdir: Path) -> bool:
    return any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*"))


def follow_process_0(error: str) -> str:
    """Process 0's refusal (a one-line message, '' for none) on every process of the run, so all
    of them stop with the same error, or go on together (no process waits on one that left)."""
    if jax.process_count() == 1:
        return error
    from jax.experimental import multihost_utils

    message = np.frombuffer(error.encode(), np.uint8) if jax.process_index() == 0 else None
    size = int(multihost_utils.broadcast_one_to_all(np.int32(0 if message is None else message.size)))
    if not size:
        return ""
    if message is None:
        message = np.zeros(size, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(message), np.uint8)).decode()


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold the run's `RunLock` (process 0) for the block: one process trains a run at a time.

    Process 0 takes the lock and every process follows its verdict: a lock held elsewhere (or a
    lock file it cannot write) is the same one-line error on all of them.
    Re-entrant, so a sweep worker that holds it already (`experiments.launch.run_one`) goes on.
    """
    lock, error, failure = None, "", None
    if jax.process_index() == 0:
        lock = RunLock(workdir)
        try:
            if not lock.acquire():
                error = (f"{workdir} is being trained by {lock.holder()} (lock file {lock.path}); "
                         "wait for that run to end, or use another workdir")
                lock = None
        except OSError as e:  # the lock file cannot be written: a read-only or full workdir
            lock, failure = None, e
            error = f"{e.filename}: {e.strerror}" if e.filename is not None else f"{workdir}: {e}"
    error = follow_process_0(error)
    if failure is not None and failure.filename is not None:
        raise failure  # process 0: lm.cli says which path, and why
    if error:
        raise FileError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def prepare_workdir(workdir: Path, config: ml_collections.ConfigDict, wipe: bool) -> None:
    """Process 0: discard the previous run if `wipe`, create the workdir and write config.json."""
    if jax.process_index() != 0:
        return
    if wipe:
        for name in ("checkpoints", "checkpoints.damaged", "tensorboard", "metrics.jsonl",
                     "result.json", "eval.json"):
            path = workdir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(workdir / "config.json", json.loads(config.to_json()))


class Trainer:
    """Builds the sharded state and the compiled steps for one config.

    `compile=False` stops before compiling: the shardings, the abstract state and batch and
    the jitted steps, on any mesh, an `AbstractMesh` of devices this host does not have
    included (`lm.bench --lower_only` exports this same step for another platform).
    """

    def __init__(self, config: ml_collections.ConfigDict,
                 mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh, compile: bool = True):
        self.config, self.mesh = config, mesh
        self.shape = RunShape.of(config)
        self.graphdef, abstract_params, axes = model_lib.abstract_model(config.model, config.seed)
        self.param_shardings = sharding.tree_shardings(axes, abstract_params, mesh)
        self.sched = sched = optim.schedule_args(config.optim, self.shape.peak_lr, self.shape.steps)
        self.tx = optim.make_optimizer(config.optim, optim.schedule(config.optim, sched),
                                       abstract_params)
        self.batch_sharding = sharding.batch_sharding(mesh)
        rep = sharding.replicated(mesh)

        def make_state(seed: jax.Array):
            params = model_lib.init_params(config.model, seed)
            return {"params": params, "opt_state": self.tx.init(params),
                    "step": jnp.zeros((), jnp.int32)}

        self._make_state = make_state
        abstract = jax.eval_shape(make_state, jax.ShapeDtypeStruct((), jnp.int32))
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, s: s, abstract["opt_state"], self.param_shardings,
            transform_non_params=lambda _: rep)
        self.state_shardings = {"params": self.param_shardings, "opt_state": opt_shardings,
                                "step": rep}
        self.abstract_state = abstract_with_shardings(abstract, self.state_shardings)
        self.abstract_batch = jax.ShapeDtypeStruct(
            (config.data.batch_size, config.data.seq_len + 1), jnp.int32,
            sharding=self.batch_sharding)
        self.abstract_schedule = {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
                                  for k in sched}
        self.abstract_args = (self.abstract_state, self.abstract_batch, self.abstract_schedule)
        self.jit_train_step = jax.jit(
            make_train_step(self.graphdef, config),
            in_shardings=(self.state_shardings, self.batch_sharding, rep),
            out_shardings=(self.state_shardings, rep), donate_argnums=0)
        self.jit_eval_step = jax.jit(
            make_eval_step(self.graphdef), in_shardings=(self.param_shardings, self.batch_sharding),
            out_shardings=rep)
        self.compiled_train_step = self.eval_step = self.schedule = None
        self.compile_seconds = float("nan")
        if compile:
            self.compile()

    def compile(self) -> None:
        """AOT-compile both steps on the trainer's (concrete) mesh, and place the schedule."""
        t = time.perf_counter()
        rep = sharding.replicated(self.mesh)
        self.schedule = {k: jax.make_array_from_callback((), rep, lambda _, v=v: np.float32(v))
                         for k, v in self.sched.items()}
        with jax.set_mesh(self.mesh):
            self.compiled_train_step = self.jit_train_step.lower(*self.abstract_args).compile()
            self.compile_seconds = time.perf_counter() - t
            self.eval_step = self.jit_eval_step.lower(self.abstract_state["params"],
                                                      self.abstract_batch).compile()

    def train_step(self, state, batch):
        """One update of `state` on the global `batch`: the compiled step at this run's schedule."""
        return self.compiled_train_step(state, batch, self.schedule)

    def init_state(self):
        """Fresh state, created directly in its shardings (no full copy on one device); the seed
        is an input, so a seed replicate reuses the program."""
        rep = sharding.replicated(self.mesh)
        seed = jax.make_array_from_callback((), rep, lambda _: np.int32(self.config.seed))
        with jax.set_mesh(self.mesh):
            return jax.jit(self._make_state, out_shardings=self.state_shardings)(seed)

    def evaluate(self, params, dataset) -> float:
        """Token-weighted mean loss over the fixed validation windows."""
        sums = [self.eval_step(params, data_lib.to_global(local, self.batch_sharding))
                for local in dataset.eval_batches(jax.process_index(), jax.process_count())]
        sums = np.concatenate(jax.device_get(sums))
        return float(sums.sum() / (len(sums) * self.config.data.seq_len))


InitPoint = tuple[Path, Checkpointer, int]  # a run to start from, its checkpoints, the step


def init_point(config: ml_collections.ConfigDict) -> InitPoint:
    """Where `train.init_from` starts this run, checked before anything is written: a
    ConfigError when it is not a run, has another model or lacks the step."""
    t = config.train
    source = Path(t.init_from)
    saved = source / "config.json"
    if not saved.exists():
        raise ConfigError(f"config.train.init_from = {str(source)!r}: no config.json there "
                          "(expected the workdir of a finished or checkpointed run)")
    theirs = read_json(saved, keys=("model",))["model"]
    if not isinstance(theirs, dict):
        raise FileError(f"{saved}: 'model' is not a JSON object")
    ours = json.loads(config.model.to_json())
    shape_keys = ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "d_ff",
                  "activation", "tied_embeddings", "qk_norm")
    diff = {k: (theirs.get(k), ours[k]) for k in shape_keys if theirs.get(k) != ours[k]}
    if diff:
        raise ConfigError(
            f"config.train.init_from = {str(source)!r} has a different model: " + ", ".join(
                f"model.{k} is {t!r} there and {o!r} here" for k, (t, o) in diff.items()))
    ckpt = Checkpointer(source / "checkpoints", read_only=True)
    step = ckpt.usable_step() if t.init_step < 0 else t.init_step
    if step is None or step not in ckpt.all_steps():
        raise ConfigError(f"config.train.init_step = {t.init_step}: {source} has "
                          f"checkpoints at steps {ckpt.all_steps()}")
    ckpt.check(step)
    return source, ckpt, step


def load_init(config: ml_collections.ConfigDict, trainer: Trainer, point: InitPoint):
    """What `train.init_from` gives a run that has no checkpoint of its own.

    init_mode "params": that checkpoint's parameters with a fresh optimizer and step 0
    (fine-tuning). "state": its parameters, optimizer state, step and loss history, so the
    run continues that one under its own schedule (a WSD cooldown branch).
    Returns (state, start step, meta).
    """
    source, ckpt, step = point
    if config.train.init_mode == "params":
        state = trainer.init_state()
        state["params"] = ckpt.restore_params(trainer.abstract_state["params"], step)
        print(f"initialised parameters from {source} step {step}", flush=True)
        return state, 0, None
    state, meta = ckpt.restore(trainer.abstract_state, step)
    start = int(jax.device_get(state["step"]))
    print(f"branched from {source} at step {start}", flush=True)
    return state, start, meta


def start_state(config: ml_collections.ConfigDict, trainer: Trainer, ckpt: Checkpointer,
                init: InitPoint | None = None):
    """(state, start step, history) of a run: its own newest sound checkpoint, else `init_from`
    (`init`, when already checked), else fresh. The history is what a checkpoint carries
    besides the state (`History.to_meta`)."""
    start = ckpt.usable_step()
    if start is not None:
        state, meta = ckpt.restore(trainer.abstract_state, start)
        print(f"resumed from step {start} of {trainer.shape.steps}", flush=True)
        return state, start, History.from_meta(meta)
    if config.train.init_from:
        state, start, meta = load_init(config, trainer, init or init_point(config))
        return state, start, History(losses=History.from_meta(meta).losses if meta else {})
    return trainer.init_state(), 0, History()


@dataclass
class History:
    """What a run accumulates across restarts: per-step losses (the tail a checkpoint keeps),
    time spent training and the steps this run trained itself (a branch's trunk excluded)."""

    losses: dict[int, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    trained_steps: int = 0
    wall_seconds: float = 0.0

    @classmethod
    def from_meta(cls, meta: dict) -> History:
        return cls({int(k): v for k, v in meta["losses"].items()}, meta["train_seconds"],
                   meta["trained_steps"], meta["wall_seconds"])

    def to_meta(self, since: int, wall_seconds: float) -> dict:
        tail = {s: v for s, v in self.losses.items() if s >= since}
        return {"losses": tail, "train_seconds": self.train_seconds,
                "trained_steps": self.trained_steps, "wall_seconds": wall_seconds}

    def mean_loss(self, start: int, end: int) -> float:
        values = [self.losses[s] for s in range(start, end) if s in self.losses]
        return float(np.mean(values)) if values else float("nan")


@dataclass
class Boundary:
    """Which of log, eval, save and preempt happen after step `done`."""

    log: bool
    evaluate: bool
    save: bool
    preempt: bool

    @classmethod
    def after(cls, done: int, steps: int, t: ml_collections.ConfigDict, preempt: bool) -> Boundary:
        last = done == steps
        return cls(done % t.log_every == 0 or last, done % t.eval_every == 0 or last,
                   done % t.checkpoint_every == 0 or last or done in t.save_steps, preempt)

    def __bool__(self) -> bool:
        return self.log or self.evaluate or self.save or self.preempt


class Run:
    """One training run in a workdir: the loop, its boundaries and its result."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: Path, dataset: data_lib.Dataset,
                 init: InitPoint | None = None):
        self.config, self.workdir, self.dataset = config, workdir, dataset
        self.wall_start = time.perf_counter()
        self.trainer = Trainer(config, sharding.make_mesh(config.mesh.shape))
        self.shape = self.trainer.shape
        self.ckpt = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints,
                                 keep_steps=tuple(config.train.save_steps))
        self.state, self.start, self.history = start_state(config, self.trainer, self.ckpt, init)
        self.writer = MetricsWriter(workdir, self.start)
        self.is_main = jax.process_index() == 0
        self.status, self.diverged_step, self.eval_loss = "completed", None, float("nan")

    def batch(self, step: int) -> jax.Array:
        local = self.dataset.train_batch(step, jax.process_index(), jax.process_count())
        return data_lib.to_global(local, self.trainer.batch_sharding)

    def announce(self) -> None:
        shape, trainer = self.shape, self.trainer
        tokenizer_file = getattr(self.dataset.tokenizer, "path", None)
        if self.is_main and tokenizer_file is not None:  # the run carries its tokenizer
            write_bytes_atomic(self.workdir / "tokenizer.model", Path(tokenizer_file).read_bytes())
        if self.is_main:
            print(f"{shape.n_params:,} params ({shape.n_params_non_embedding:,} non-embedding), "
                  f"{shape.steps} steps × {shape.tokens_per_step} tokens, "
                  f"{sharding.describe(trainer.mesh)}, compiled in {trainer.compile_seconds:.1f}s",
                  flush=True)

    def loop(self, preemption: Preemption) -> None:
        """Steps from `start` to the end; the host syncs only at boundaries."""
        steps, pending = self.shape.steps, []
        interval_start = time.perf_counter()
        batch = self.batch(self.start) if self.start < steps else None
        for step in range(self.start, steps):
            self.state, metrics = self.trainer.train_step(self.state, batch)
            pending.append((step, metrics))
            done = step + 1
            if done < steps:
                batch = self.batch(done)  # overlaps with the step running on the device
            preempt = preemption.requested or (
                jax.process_count() > 1 and self.ckpt.manager.reached_preemption(done))
            at = Boundary.after(done, steps, self.config.train, preempt)
            if not at:
                continue
            if not self.boundary(done, at, jax.device_get(pending), interval_start):
                return
            pending, interval_start = [], time.perf_counter()

    def boundary(self, done: int, at: Boundary, fetched: list, interval_start: float) -> bool:
        """Record, log, evaluate and save after step `done`; returns whether to go on."""
        h = self.history
        for s, m in fetched:
            h.losses[s] = float(m["loss"])
        bad = [s for s, m in fetched if not np.isfinite(m["loss"])]
        if bad:
            self.status, self.diverged_step = "diverged", bad[0]
            print(f"loss is {fetched[-1][1]['loss']} at step {bad[0]}: run diverged; the last "
                  f"good checkpoint is step {self.ckpt.latest_step()}", flush=True)
            return False
        seconds = time.perf_counter() - interval_start
        h.train_seconds += seconds
        h.trained_steps += len(fetched)
        if at.log:
            self.log(done, fetched[-1][1], len(fetched) * self.shape.tokens_per_step / max(seconds, 1e-9))
        if at.evaluate:
            self.evaluate(done)
        if at.save or at.preempt:
            keep = max(self.window, self.config.train.log_every)
            self.ckpt.save(done, self.state, h.to_meta(done - keep, self.wall_seconds()))
            self.writer.flush()
        if at.preempt:
            self.status = "preempted"
        return not at.preempt

    @property
    def window(self) -> int:
        """train_loss is the mean of the last 1 % of steps."""
        return max(1, math.ceil(self.shape.steps / 100))

    def wall_seconds(self) -> float:
        """Wall time of the run over all its restarts."""
        return self.history.wall_seconds + time.perf_counter() - self.wall_start

    def log(self, done: int, last: dict, tok_s: float) -> None:
        shape = self.shape
        record = {"step": done, "tokens": done * shape.tokens_per_step,
                  "flops": done * shape.tokens_per_step * shape.flops_per_token,
                  "loss": self.history.mean_loss(done - self.config.train.log_every, done),
                  "lr": float(last["lr"]), "grad_norm": float(last["grad_norm"]),
                  "tokens_per_sec": tok_s,
                  "mfu": utilization(tok_s * shape.flops_per_token, jax.device_count())}
        self.writer.write(record)
        if self.is_main:
            eta = (shape.steps - done) * shape.tokens_per_step / tok_s
            print(f"step {done}/{shape.steps} | loss {record['loss']:.4f} | {tok_s:,.0f} tok/s | "
                  f"MFU {record['mfu']:.1%} | ETA {format_duration(eta)}", flush=True)

    def evaluate(self, done: int) -> None:
        shape = self.shape
        self.eval_loss = self.trainer.evaluate(self.state["params"], self.dataset)
        self.writer.write({"step": done, "tokens": done * shape.tokens_per_step,
                           "flops": done * shape.tokens_per_step * shape.flops_per_token,
                           "eval_loss": self.eval_loss})
        if self.is_main:
            print(f"step {done}/{shape.steps} | eval loss {self.eval_loss:.4f}", flush=True)

    def result(self) -> dict[str, Any]:
        """result.json: what a scaling study reads of this run."""
        shape, h, config = self.shape, self.history, self.config
        done = int(jax.device_get(self.state["step"]))
        if self.status == "completed" and not np.isfinite(self.eval_loss):
            # restarted at its last step: nothing to train, the final eval is the checkpoint's
            self.eval_loss = self.trainer.evaluate(self.state["params"], self.dataset)
        tokens = done * shape.tokens_per_step
        # Throughput counts only the steps this run trained itself (not a branch's shared trunk).
        tok_s = (h.trained_steps * shape.tokens_per_step / h.train_seconds if h.train_seconds > 0
                 else float("nan"))
        diverged = self.status == "diverged"
        return {
            "status": self.status, "name": self.workdir.name, "steps": done,
            "planned_steps": shape.steps, "n_params": shape.n_params,
            "n_params_non_embedding": shape.n_params_non_embedding, "tokens": tokens,
            "flops_per_token": shape.flops_per_token, "flops": tokens * shape.flops_per_token,
            "flops_6nd": tokens * flops_per_token_6n(config.model),
            "train_loss": float("nan") if diverged else h.mean_loss(done - self.window, done),
            "eval_loss": self.eval_loss if self.status == "completed" else float("nan"),
            "diverged_step": self.diverged_step, "peak_lr": shape.peak_lr,
            "wall_seconds": self.wall_seconds(), "train_seconds": h.train_seconds,
            "tokens_per_second": tok_s,
            "mfu": utilization(tok_s * shape.flops_per_token, jax.device_count()),
            "compile_seconds": self.trainer.compile_seconds, "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "config_hash": config_hash(config),
            "model": config.model.to_dict(),
        }


@contextlib.contextmanager
def closing_all(*closers) -> Iterator[None]:
    """Call every one of `closers` after the block, even when one fails. An error the block
    raised wins: a close failing in its wake (a full disk fails the checkpoint's save, then the
    TensorBoard file's close) must not mask it. Otherwise the first close error is raised."""
    try:
        yield
    except BaseException:
        for close in closers:
            with contextlib.suppress(Exception):
                close()
        raise
    first = None
    for close in closers:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - the others are closed, then it is raised
            first = first or e
    if first is not None:
        raise first


def train(config: ml_collections.ConfigDict, workdir: str | Path, overwrite: bool = False,
          ) -> dict[str, Any]:
    """Run (or resume) training in `workdir`; returns the result dict also saved as result.json.

    Nothing is written to `workdir` before every check has passed: the config, the workdir
    and its saved config, the dataset, `train.init_from`, and the lock (no other process
    training this run).
    """
    validate(config)
    workdir = workdir_path(workdir)
    wipe = needs_wipe(workdir, config, overwrite)
    dataset = data_lib.build_dataset(config)
    fresh = wipe or not has_checkpoints(workdir)
    init = init_point(config) if config.train.init_from and fresh else None
    with workdir_lock(workdir):
        prepare_workdir(workdir, config, wipe)
        run = Run(config, workdir, dataset, init)
        run.announce()
        preemption = Preemption()
        with closing_all(preemption.restore, run.ckpt.close, run.writer.close):
            run.loop(preemption)
            result = run.result()
        if run.is_main:
            write_json_atomic(workdir / "result.json", result)
            print(f"{result['status']}: {result['steps']} steps, train loss {result['train_loss']:.4f}, "
                  f"eval loss {result['eval_loss']:.4f}, {result['tokens_per_second']:,.0f} tok/s -> "
                  f"{workdir / 'result.json'}", flush=True)
    return result


def main(argv: list[str]) -> None:
    from absl import flags

    from lm import cli

    cli.define_config("train.py", "training config file")
    flags.DEFINE_string("workdir", None, "run directory (created; resumed if it has checkpoints)")
    flags.DEFINE_bool("overwrite", False, "discard a run with a different config in workdir")
    flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0")
    flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
    flags.DEFINE_integer("process_id", None, "multi-process: this process's index")
    flags.mark_flags_as_required(["workdir"])

    def run():
        f = flags.FLAGS
        setup(True, f.coordinator_address, f.num_processes, f.process_id)
        result = train(f.config, f.workdir, f.overwrite)
        if result["status"] == "preempted":
            sys.exit(EXIT_PREEMPTED)
        if result["status"] == "diverged":
            sys.exit(EXIT_DIVERGED)

    cli.run(run, argv)


if __name__ == "__main__":
    main(sys.argv)
