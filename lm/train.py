"""Train one model: `python -m lm.train --config=configs/train.py --workdir=DIR [--config.x=y]`.

The hot path is one AOT-compiled `jax.jit` step over a pure state dict (params, optimizer
state, step) with explicit shardings and donated buffers; the host reads metrics only at
log, eval and checkpoint boundaries. Everything a scaling study needs lands in the workdir:
config.json, metrics.jsonl, TensorBoard events, checkpoints/ and result.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lm import data as data_lib
from lm import distributed, optim, sharding
from lm import model as model_lib
from lm.checkpoint import Checkpointer, abstract_with_shardings
from lm.config import ConfigError, validate
from lm.evaluate import make_eval_step
from lm.files import write_bytes_atomic, write_json_atomic
from lm.host import RetainedMemoryBound, setup_process
from lm.metrics import (
    MetricsWriter,
    device_peak_flops,
    format_duration,
)
from lm.sizing import count_params, flops_per_token, flops_per_token_6n

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: rerun the same command to continue
EXIT_DIVERGED = 3


def num_steps(config: ml_collections.ConfigDict) -> int:
    """Optimizer steps of the run: train.steps, else train.tokens / (batch · seq_len)."""
    if config.train.steps > 0:
        return config.train.steps
    steps = config.train.tokens // (config.data.batch_size * config.data.seq_len)
    if steps < 1:
        raise ConfigError(
            f"config.train.tokens = {config.train.tokens} is not allowed: must cover at least one "
            f"batch of data.batch_size × data.seq_len = "
            f"{config.data.batch_size * config.data.seq_len} tokens")
    return steps


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


def make_train_step(graphdef, config: ml_collections.ConfigDict, tx, lr_fn):
    """state, batch [B, T+1] -> state, metrics; gradients accumulate over micro-batches."""
    loss_fn = make_loss_fn(graphdef, config.optim.z_loss)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    m = config.train.microbatches

    def step(state, batch):
        params = state["params"]
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
        metrics = {"loss": ce, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(state["step"])}
        return new_state, metrics

    return step


class Preemption:
    """SIGTERM/SIGINT set a flag the loop polls; the loop saves and exits at a step boundary."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        print(f"\nsignal {signal.Signals(signum).name}: saving a checkpoint and stopping",
              flush=True)
        self.requested = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _without_mesh(config: dict) -> dict:
    """The parts of a config that define the run: the mesh may change between restarts."""
    return {k: v for k, v in config.items() if k != "mesh"}


def prepare_workdir(workdir: Path, config: ml_collections.ConfigDict, overwrite: bool) -> None:
    """Create the workdir; refuse a different config unless `overwrite` (which starts afresh)."""
    saved = workdir / "config.json"
    if saved.exists() and _without_mesh(json.loads(saved.read_text())) != _without_mesh(
            json.loads(config.to_json())):
        if not overwrite:
            raise ConfigError(
                f"{workdir} holds a run with a different config ({saved}); use another workdir, "
                "or --overwrite to discard that run and start again")
        if jax.process_index() == 0:
            for name in ("checkpoints", "tensorboard", "metrics.jsonl", "result.json", "eval.json"):
                path = workdir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(saved, json.loads(config.to_json()))


class Trainer:
    """Builds the sharded state and the compiled steps for one config."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        self.config, self.mesh = config, mesh
        self.shape = RunShape.of(config)
        self.graphdef, abstract_params, axes = model_lib.abstract_model(config.model, config.seed)
        self.param_shardings = sharding.tree_shardings(axes, abstract_params, mesh)
        self.lr_fn = optim.schedule(config.optim, self.shape.peak_lr, self.shape.steps)
        self.tx = optim.make_optimizer(config.optim, self.lr_fn, abstract_params)
        self.batch_sharding = sharding.batch_sharding(mesh)
        rep = sharding.replicated(mesh)

        def make_state():
            params = model_lib.init_params(config.model, config.seed)
            return {"params": params, "opt_state": self.tx.init(params),
                    "step": jnp.zeros((), jnp.int32)}

        self._make_state = make_state
        abstract = jax.eval_shape(make_state)
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, s: s, abstract["opt_state"], self.param_shardings,
            transform_non_params=lambda _: rep)
        self.state_shardings = {"params": self.param_shardings, "opt_state": opt_shardings,
                                "step": rep}
        self.abstract_state = abstract_with_shardings(abstract, self.state_shardings)
        batch = jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len + 1), jnp.int32,
                                     sharding=self.batch_sharding)
        t = time.perf_counter()
        with jax.set_mesh(mesh):
            self.train_step = jax.jit(
                make_train_step(self.graphdef, config, self.tx, self.lr_fn),
                in_shardings=(self.state_shardings, self.batch_sharding),
                out_shardings=(self.state_shardings, rep), donate_argnums=0,
            ).lower(self.abstract_state, batch).compile()
            self.compile_seconds = time.perf_counter() - t
            self.eval_step = jax.jit(
                make_eval_step(self.graphdef), in_shardings=(self.param_shardings,
                                                             self.batch_sharding),
                out_shardings=rep).lower(self.abstract_state["params"], batch).compile()

    def init_state(self):
        """Fresh state, created directly in its shardings (no full copy on one device)."""
        with jax.set_mesh(self.mesh):
            return jax.jit(self._make_state, out_shardings=self.state_shardings)()

    def evaluate(self, params, dataset) -> float:
        """Token-weighted mean loss over the fixed validation windows."""
        sums = [self.eval_step(params, data_lib.to_global(local, self.batch_sharding))
                for local in dataset.eval_batches(jax.process_index(), jax.process_count())]
        sums = np.concatenate(jax.device_get(sums))
        return float(sums.sum() / (len(sums) * self.config.data.seq_len))


def load_init(config: ml_collections.ConfigDict, trainer: Trainer):
    """What `train.init_from` gives a run that has no checkpoint of its own.

    init_mode "params": that checkpoint's parameters with a fresh optimizer and step 0
    (fine-tuning). "state": its parameters, optimizer state, step and loss history, so the
    run continues that one under its own schedule (a WSD cooldown branch).
    Returns (state, start step, meta).
    """
    t = config.train
    source = Path(t.init_from)
    saved = source / "config.json"
    if not saved.exists():
        raise ConfigError(f"config.train.init_from = {str(source)!r}: no config.json there "
                          "(expected the workdir of a finished or checkpointed run)")
    theirs = json.loads(saved.read_text())["model"]
    ours = json.loads(config.model.to_json())
    shape_keys = ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "d_ff",
                  "activation", "tied_embeddings")
    diff = {k: (theirs.get(k), ours[k]) for k in shape_keys if theirs.get(k) != ours[k]}
    if diff:
        raise ConfigError(
            f"config.train.init_from = {str(source)!r} has a different model: " + ", ".join(
                f"model.{k} is {t!r} there and {o!r} here" for k, (t, o) in diff.items()))
    ckpt = Checkpointer(source / "checkpoints", read_only=True)
    step = None if t.init_step < 0 else t.init_step
    if step is None and ckpt.latest_step() is None or step is not None and (
            step not in ckpt.all_steps()):
        raise ConfigError(f"config.train.init_step = {t.init_step}: {source} has "
                          f"checkpoints at steps {ckpt.all_steps()}")
    if t.init_mode == "params":
        state = trainer.init_state()
        state["params"] = ckpt.restore_params(trainer.abstract_state["params"], step)
        print(f"initialised parameters from {source} step {step or ckpt.latest_step()}",
              flush=True)
        return state, 0, None
    state, meta = ckpt.restore(trainer.abstract_state, step)
    start = int(jax.device_get(state["step"]))
    print(f"branched from {source} at step {start}", flush=True)
    return state, start, meta


def train(config: ml_collections.ConfigDict, workdir: str | Path, overwrite: bool = False,
          ) -> dict[str, Any]:
    """Run (or resume) training in `workdir`; returns the result dict also saved as result.json."""
    validate(config)
    workdir = Path(workdir).absolute()
    shape = RunShape.of(config)
    prepare_workdir(workdir, config, overwrite)
    wall_start = time.perf_counter()
    mesh = sharding.make_mesh(config.mesh.shape)
    dataset = data_lib.build_dataset(config)
    trainer = Trainer(config, mesh)
    ckpt = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints,
                        keep_steps=tuple(config.train.save_steps))
    start = ckpt.latest_step()
    fresh: dict[str, Any] = {"losses": {}, "train_seconds": 0.0, "wall_seconds": 0.0,
                             "trained_steps": 0}
    if start is not None:
        state, meta = ckpt.restore(trainer.abstract_state, start)
        print(f"resumed from step {start} of {shape.steps}", flush=True)
    elif config.train.init_from:
        state, start, meta = load_init(config, trainer)
        meta = {**fresh, "losses": meta["losses"]} if meta else fresh
    else:
        state, start, meta = trainer.init_state(), 0, fresh
    losses = {int(k): v for k, v in meta["losses"].items()}
    writer = MetricsWriter(workdir, start)
    peak = device_peak_flops() * jax.device_count()
    window = max(1, math.ceil(shape.steps / 100))  # train_loss: mean of the last 1 % of steps
    keep = max(window, config.train.log_every)
    is_main = jax.process_index() == 0
    tokenizer_file = getattr(dataset.tokenizer, "path", None)
    if is_main and tokenizer_file is not None:  # the run carries its tokenizer (fine-tuning reuses it)
        write_bytes_atomic(workdir / "tokenizer.model", Path(tokenizer_file).read_bytes())
    if is_main:
        print(f"{shape.n_params:,} params ({shape.n_params_non_embedding:,} non-embedding), "
              f"{shape.steps} steps × {shape.tokens_per_step} tokens, {sharding.describe(mesh)}, "
              f"compiled in {trainer.compile_seconds:.1f}s", flush=True)

    def host_batch(step: int):
        local = dataset.train_batch(step, jax.process_index(), jax.process_count())
        return data_lib.to_global(local, trainer.batch_sharding)

    preemption = Preemption()
    memory_bound = RetainedMemoryBound()
    status, diverged_step, eval_loss = "completed", None, float("nan")
    pending: list[tuple[int, dict]] = []
    train_seconds, trained_steps = meta["train_seconds"], meta["trained_steps"]
    interval_start, interval_tokens = time.perf_counter(), 0
    batch = host_batch(start) if start < shape.steps else None
    try:
        for step in range(start, shape.steps):
            state, metrics = trainer.train_step(state, batch)
            pending.append((step, metrics))
            done = step + 1
            if done < shape.steps:
                batch = host_batch(done)  # overlaps with the step running on the device
            interval_tokens += shape.tokens_per_step
            log = done % config.train.log_every == 0 or done == shape.steps
            evaluate = done % config.train.eval_every == 0 or done == shape.steps
            save = (done % config.train.checkpoint_every == 0 or done == shape.steps
                    or done in config.train.save_steps)
            preempt = preemption.requested or (
                jax.process_count() > 1 and ckpt.manager.reached_preemption(done))
            if not (log or evaluate or save or preempt):
                continue
            fetched = jax.device_get(pending)
            pending = []
            memory_bound.check()  # here the steps so far have finished and freed their temporaries
            for s, m in fetched:
                losses[s] = float(m["loss"])
            bad = [s for s, m in fetched if not np.isfinite(m["loss"])]
            if bad:
                status, diverged_step = "diverged", bad[0]
                print(f"loss is {fetched[-1][1]['loss']} at step {bad[0]}: run diverged; "
                      f"the last good checkpoint is step {ckpt.latest_step()}", flush=True)
                break
            now = time.perf_counter()
            train_seconds += now - interval_start
            trained_steps += interval_tokens // shape.tokens_per_step
            tok_s = interval_tokens / max(now - interval_start, 1e-9)
            if log:
                last = fetched[-1][1]
                interval = [losses[s] for s in range(done - config.train.log_every, done)
                            if s in losses]
                record = {"step": done, "tokens": done * shape.tokens_per_step,
                          "flops": done * shape.tokens_per_step * shape.flops_per_token,
                          "loss": float(np.mean(interval)), "lr": float(last["lr"]),
                          "grad_norm": float(last["grad_norm"]), "tokens_per_sec": tok_s,
                          "mfu": tok_s * shape.flops_per_token / peak}
                writer.write(record)
                if is_main:
                    eta = (shape.steps - done) * shape.tokens_per_step / tok_s
                    print(f"step {done}/{shape.steps} | loss {record['loss']:.4f} | "
                          f"{tok_s:,.0f} tok/s | MFU {record['mfu']:.1%} | "
                          f"ETA {format_duration(eta)}", flush=True)
            if evaluate:
                eval_loss = trainer.evaluate(state["params"], dataset)
                writer.write({"step": done, "tokens": done * shape.tokens_per_step,
                              "flops": done * shape.tokens_per_step * shape.flops_per_token,
                              "eval_loss": eval_loss})
                if is_main:
                    print(f"step {done}/{shape.steps} | eval loss {eval_loss:.4f}", flush=True)
            if save or preempt:
                tail = {s: v for s, v in losses.items() if s >= done - keep}
                ckpt.save(done, state, {
                    "losses": tail, "train_seconds": train_seconds, "trained_steps": trained_steps,
                    "wall_seconds": meta["wall_seconds"] + time.perf_counter() - wall_start})
            if preempt:
                status = "preempted"
                break
            interval_start, interval_tokens = time.perf_counter(), 0
    finally:
        preemption.restore()
        ckpt.close()
        writer.close()
    done = shape.steps if status == "completed" else int(jax.device_get(state["step"]))
    tail = [losses[s] for s in range(done - window, done) if s in losses]
    tokens = done * shape.tokens_per_step
    # Throughput counts only the steps this run trained itself (not a branch's shared trunk).
    tok_s = (trained_steps * shape.tokens_per_step / train_seconds if train_seconds > 0
             else float("nan"))
    result = {
        "status": status, "name": workdir.name, "steps": done, "planned_steps": shape.steps,
        "n_params": shape.n_params, "n_params_non_embedding": shape.n_params_non_embedding,
        "tokens": tokens, "flops_per_token": shape.flops_per_token,
        "flops": tokens * shape.flops_per_token,
        "flops_6nd": tokens * flops_per_token_6n(config.model),
        "train_loss": float(np.mean(tail)) if tail and status != "diverged" else float("nan"),
        "eval_loss": eval_loss if status == "completed" else float("nan"),
        "diverged_step": diverged_step, "peak_lr": shape.peak_lr,
        "wall_seconds": meta["wall_seconds"] + time.perf_counter() - wall_start,
        "train_seconds": train_seconds, "tokens_per_second": tok_s,
        "mfu": tok_s * shape.flops_per_token / peak, "compile_seconds": trainer.compile_seconds,
        "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
        "config_hash": config_hash(config), "model": config.model.to_dict(),
    }
    if is_main:
        write_json_atomic(workdir / "result.json", result)
        print(f"{status}: {done} steps, train loss {result['train_loss']:.4f}, "
              f"eval loss {result['eval_loss']:.4f}, {tok_s:,.0f} tok/s -> "
              f"{workdir / 'result.json'}", flush=True)
    return result


def main(argv: list[str]) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/train.py", "training config file")
    flags.DEFINE_string("workdir", None, "run directory (created; resumed if it has checkpoints)")
    flags.DEFINE_bool("overwrite", False, "discard a run with a different config in workdir")
    flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0")
    flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
    flags.DEFINE_integer("process_id", None, "multi-process: this process's index")
    flags.mark_flags_as_required(["workdir"])

    def run(_):
        f = flags.FLAGS
        setup_process()
        distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
        try:
            result = train(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.overwrite)
        except (ConfigError, data_lib.DataError) as e:
            sys.exit(f"error: {e}")
        if result["status"] == "preempted":
            sys.exit(EXIT_PREEMPTED)
        if result["status"] == "diverged":
            sys.exit(EXIT_DIVERGED)

    app.run(run, argv=argv)


if __name__ == "__main__":
    main(sys.argv)
