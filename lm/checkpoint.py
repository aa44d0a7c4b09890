"""Orbax checkpoints: train state (params, optimizer state, step) and host metadata together.

Saves are asynchronous; Orbax writes each step to a temporary directory and renames it when
complete, so a crash mid-save leaves a directory that restore ignores. Before the rename, the
size and SHA-256 of each of its files go into its `integrity.json`; a checkpoint whose files no
longer match (damaged bytes, a truncated or missing file) is never restored: a resume sets it
aside and takes the previous one. The data pipeline is a pure function of the step, so no
iterator state is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lm.files import FileError, read_json, write_json_atomic

INTEGRITY = "integrity.json"  # in each checkpoint: {relative path: [size, sha256]} of its files
STEP_METADATA = "_CHECKPOINT_METADATA"  # Orbax's, rewritten when the checkpoint is committed


def checksums(directory: Path) -> dict[str, list]:
    """[size, SHA-256] by relative path of the files under `directory`, but its integrity record
    and Orbax's step metadata (JSON, which `damage` parses instead)."""
    out = {}
    for path in sorted(p for p in directory.rglob("*")
                       if p.is_file() and str(p.relative_to(directory)) not in (INTEGRITY, STEP_METADATA)):
        with open(path, "rb") as f:
            out[str(path.relative_to(directory))] = [path.stat().st_size,
                                                     hashlib.file_digest(f, "sha256").hexdigest()]
    return out


def damage(step_dir: Path) -> str | None:
    """What is wrong with the checkpoint in `step_dir`, or None when its files are as saved (a
    checkpoint saved before integrity records existed has none, and passes)."""
    record = step_dir / INTEGRITY
    if not record.exists():
        return None
    try:
        saved = read_json(record)
        read_json(step_dir / STEP_METADATA)
    except FileError as e:
        return str(e)
    found = checksums(step_dir)
    for name, entry in saved.items():
        if name not in found:
            return f"{name} is missing"
        if found[name] != entry:
            saved_size = entry[0] if isinstance(entry, list) and entry else "?"
            return f"{name} differs from the file saved ({found[name][0]} bytes, {saved_size} saved)"
    return None


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2, read_only: bool = False,
                 keep_steps: tuple[int, ...] = ()):
        """Keeps the latest `keep` checkpoints, and those at `keep_steps` for good."""
        cm = ocp.checkpoint_managers
        policy = cm.AnyPreservationPolicy([cm.LatestN(keep), cm.CustomSteps(list(keep_steps))])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, create=not read_only, read_only=read_only,
            enable_async_checkpointing=not read_only, cleanup_tmp_directories=not read_only,
            async_options=None if read_only else ocp.AsyncOptions(post_finalization_callback=self._seal))
        self.directory = Path(directory).absolute()
        self.read_only, self._saving, self._checked = read_only, None, set()
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start an async save of `state` (jax arrays) and `meta` (JSON) at `step`."""
        with self._failing_saves():
            self.manager.wait_until_finished()  # the previous save is sealed: `_saving` may move on
            self._saving = step
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    @contextlib.contextmanager
    def _failing_saves(self) -> Iterator[None]:
        """A save that failed (in the background: a full disk, a folder gone read-only) is one
        FileError naming the checkpoint directory and Orbax's reason."""
        try:
            yield
        except (OSError, ValueError) as e:
            raise FileError(f"{self.directory}: saving the checkpoint of step {self._saving} "
                            f"failed: {e}") from e

    def _seal(self) -> None:
        """Write the integrity record of the checkpoint being saved: Orbax's post-finalization
        hook, run on process 0 once every process has written its part, before the rename."""
        final = self.directory / str(self._saving)
        pending = final.with_name(final.name + ocp.utils.TMP_DIR_SUFFIX)
        step_dir = pending if pending.is_dir() else final
        write_json_atomic(step_dir / INTEGRITY, checksums(step_dir))

    def _first_good(self, steps: list[int]) -> tuple[int | None, dict[int, str]]:
        """The first of `steps` whose checkpoint passes its integrity check, and why those before
        it fail; process 0 reads the files and every process gets its answer."""
        good, reasons = None, {}
        if jax.process_index() == 0:
            for step in steps:
                if step in self._checked or (reason := damage(self.directory / str(step))) is None:
                    good = step
                    break
                reasons[step] = reason
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            good = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if good is None else good)))
            good = None if good < 0 else good
        if good is not None:
            self._checked.add(good)
        return good, reasons

    def check(self, step: int) -> None:
        """A FileError naming checkpoint `step` unless it passes its integrity check."""
        good, reasons = self._first_good([step])
        if good is None:
            raise FileError(f"{self.directory / str(step)}: damaged checkpoint "
                            f"({reasons.get(step, 'see process 0')})")

    def _verified(self, step: int | None) -> int:
        """`step`, checked, or the usable step; an error when there is none."""
        if step is not None:
            self.check(step)
            return step
        step = self.usable_step()
        if step is None:
            raise FileError(f"{self.directory}: no checkpoint")
        return step

    def usable_step(self) -> int | None:
        """The newest checkpoint that passes its integrity check (None: there are none). Each
        newer one gets a one-line warning and, unless read-only, is moved to `<dir>.damaged/`;
        a FileError when every checkpoint fails."""
        steps = sorted(self.all_steps(), reverse=True)
        good, reasons = self._first_good(steps)
        bad = [s for s in steps if good is None or s > good]
        if not bad:
            return good
        if good is None:
            details = "; ".join(f"step {s}: {reasons.get(s, 'see process 0')}" for s in bad)
            raise FileError(f"{self.directory}: every checkpoint is damaged ({details}); remove "
                            f"{self.directory} to train this run from the start")
        aside = self.directory.with_name(self.directory.name + ".damaged")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for step in bad:
            moved = "" if self.read_only else f"; moved to {aside / f'{step}-{stamp}'}"
            if jax.process_index() == 0:
                print(f"warning: checkpoint {self.directory / str(step)} is damaged "
                      f"({reasons[step]}){moved}; using step {good}", flush=True)
                if not self.read_only:
                    aside.mkdir(exist_ok=True)
                    (self.directory / str(step)).rename(aside / f"{step}-{stamp}")
        if not self.read_only:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("lm.checkpoint: damaged checkpoints set aside")
            self.manager.reload()
        return good

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore into `abstract_state` (ShapeDtypeStructs carrying the target shardings).

        The target decides the layout, so a checkpoint saved on one mesh restores onto another;
        without `step`, the newest that passes its integrity check (`usable_step`).
        """
        step = self._verified(step)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Only the parameters of a checkpoint (fine-tuning starts a fresh optimizer)."""
        step = self._verified(step)
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding),
                                    abstract_params)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args={"params": restore_args},
            partial_restore=True)))
        return out["state"]["params"]

    def close(self) -> None:
        """Wait for the last save, then close the manager. A save that failed is a FileError, and
        the manager is closed all the same (its threads and event loops end with it)."""
        try:
            with self._failing_saves():
                self.manager.wait_until_finished()
        except FileError:
            with contextlib.suppress(Exception):  # the failed save is what gets reported
                self.manager.close()
            raise
        with self._failing_saves():
            self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` placed on `shardings` (a restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def load_run(workdir: str | Path, step: int | None = None):
    """(config, graphdef, params, step, tokenizer) of a run directory, parameters on the default
    device: what a notebook needs to evaluate or sample a run, from its directory alone (a
    SentencePiece run's tokenizer is its own tokenizer.model).

    config.json is validated and checked against the checkpoint's parameter shapes; a bad one is a
    `FileError` (a `ConfigError`) naming it.
    """
    import copy

    from lm import data
    from lm import model as model_lib
    from lm.config import ConfigError, validate
    from lm.files import FileError, config_from_json, read_json

    def shapes(tree) -> dict[str, tuple[int, ...]]:
        return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(x.shape)
                for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    workdir = Path(workdir)
    saved = workdir / "config.json"
    config = config_from_json(read_json(saved, keys=("model", "data")))
    config.data.tokenizer_path = data.run_tokenizer(config.data, workdir) or config.data.tokenizer_path
    checked = copy.deepcopy(config)
    checked.mesh.shape = (-1, 1, 1)  # loaded onto one device, whatever mesh it trained on
    try:
        validate(checked, n_devices=1)
    except ConfigError as e:
        raise FileError(f"{saved}: {e}") from None
    ckpt = Checkpointer(workdir / "checkpoints", read_only=True)
    steps = ckpt.all_steps()
    if not steps or (step is not None and step not in steps):
        raise FileError(f"{ckpt.directory} has checkpoints at steps {steps}; "
                        f"asked for {'the latest' if step is None else step}")
    step = ckpt.usable_step() if step is None else step
    graphdef, abstract, _ = model_lib.abstract_model(config.model, config.seed)
    step_dir = ckpt.directory / str(step)
    stored = shapes(ocp.PyTreeCheckpointHandler().metadata(step_dir / "state")["params"])
    for name, shape in shapes(abstract).items():
        if stored.get(name) != shape:
            there = f"of shape {stored[name]}" if name in stored else "absent"
            raise FileError(f"{saved} does not fit its checkpoint {step_dir}: parameter {name} is "
                            f"{there} there and of shape {shape} by config.json")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract)
    return config, graphdef, ckpt.restore_params(target, step), step, data.get_tokenizer(config.data)
