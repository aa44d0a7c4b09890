"""Orbax checkpoints: train state (params, optimizer state, step) and host metadata together.

Saves are asynchronous; Orbax writes each step to a temporary directory and renames it when
complete, so a crash mid-save leaves a directory that restore ignores. The data pipeline is
a pure function of the step, so no iterator state is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2, read_only: bool = False,
                 keep_steps: tuple[int, ...] = ()):
        """Keeps the latest `keep` checkpoints, and those at `keep_steps` for good."""
        cm = ocp.checkpoint_managers
        policy = cm.AnyPreservationPolicy([cm.LatestN(keep), cm.CustomSteps(list(keep_steps))])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, create=not read_only, read_only=read_only,
            enable_async_checkpointing=not read_only, cleanup_tmp_directories=not read_only)
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start an async save of `state` (jax arrays) and `meta` (JSON) at `step`."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore into `abstract_state` (ShapeDtypeStructs carrying the target shardings).

        The target decides the layout, so a checkpoint saved on one mesh restores onto another.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Only the parameters of a checkpoint (fine-tuning starts a fresh optimizer)."""
        step = self.latest_step() if step is None else step
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding),
                                    abstract_params)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args={"params": restore_args},
            partial_restore=True)))
        return out["state"]["params"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` placed on `shardings` (a restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def load_run(workdir: str | Path, step: int | None = None):
    """(config, graphdef, params, step) of a run directory, parameters on the default device."""
    import json

    from lm import model as model_lib
    from lm.files import config_from_json

    workdir = Path(workdir)
    if not (workdir / "config.json").exists():
        raise FileNotFoundError(f"{workdir} has no config.json: not a run directory")
    config = config_from_json(json.loads((workdir / "config.json").read_text()))
    ckpt = Checkpointer(workdir / "checkpoints", read_only=True)
    steps = ckpt.all_steps()
    if not steps or (step is not None and step not in steps):
        raise FileNotFoundError(f"{workdir}/checkpoints has checkpoints at steps {steps}; "
                                f"asked for {'the latest' if step is None else step}")
    graphdef, abstract, _ = model_lib.abstract_model(config.model, config.seed)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract)
    step = max(steps) if step is None else step
    return config, graphdef, ckpt.restore_params(target, step), step
