"""Device mesh and the one table that maps logical axis names onto mesh axes.

Parameters and activations are annotated with logical names (`batch`, `embed`, `heads`,
...); `RULES` decides where each lives on the (data, fsdp, tensor) mesh, so changing the
parallelism is a config change, never a model change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lm.config import mesh_shape

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes) it is split over; None = replicated.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv": None,
    "qkv": None,
    "mlp": "tensor",
    "gate": None,
    "vocab": "tensor",
    "layers": None,
    "norm": None,
}

Axes = tuple[str | None, ...]


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; -1 in `shape` takes the remaining devices.

    Axes are `Auto` so the logical rules (sharding constraints) drive the layout.
    """
    devices = list(devices if devices is not None else jax.devices())
    resolved = mesh_shape(shape, len(devices))
    return jax.make_mesh(resolved, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _mesh_size(mesh: Mesh | jax.sharding.AbstractMesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(axes: Axes, shape: Sequence[int] | None = None, mesh=None) -> PartitionSpec:
    """PartitionSpec for logical `axes`.

    A mesh axis serves at most one dimension (the first that asks: activations
    [batch, length, embed] are split over batch only, while an [vocab, embed] parameter
    is split over both), and a dim the mesh does not divide evenly stays replicated.
    """
    spec, used = [], set()
    for i, name in enumerate(axes):
        target = RULES[name] if name is not None else None
        names = (target,) if isinstance(target, str) else (target or ())
        if used.intersection(names):
            target = None
        elif target is not None and shape is not None and mesh is not None:
            if shape[i] % _mesh_size(mesh, target):
                target = None
        used.update(names if target is not None else ())
        spec.append(target)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh):
    """NamedShardings for a tree of arrays given a matching tree of logical axes."""
    return jax.tree.map(
        lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)),
        axes_tree, shapes_tree, is_leaf=lambda a: isinstance(a, tuple),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches [batch, length] split over the data-parallel axes."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(shape: Sequence[int], n_devices: int) -> int:
    """Devices a batch is split over (the mesh axes of logical `batch`) for a mesh.shape config."""
    sizes = dict(zip(MESH_AXES, mesh_shape(shape, n_devices), strict=True))
    return math.prod(sizes[a] for a in RULES["batch"])


def describe(mesh: Mesh) -> str:
    return " ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" ({np.prod(mesh.devices.shape)} devices)"
