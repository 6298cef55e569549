"""Logical axis names -> mesh axes (MaxText style).

Modules name the logical axes of every parameter and main activation; a rule table
(part of the model config, overridable from ml-collections configs) maps them onto
the mesh axes `data`, `fsdp`, `tensor`. Changing the parallelism is a config edit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

AxisRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_AXIS_RULES: AxisRules = (
    # Parameters.
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("patch", None),
    ("norm", None),
    ("qkv", None),
    # Activations.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_patches", ("data", "fsdp")),
)


def make_mesh(shape: Sequence[int], axis_names: Sequence[str] = MESH_AXES, devices=None) -> Mesh:
    """A mesh with Auto axes: GSPMD propagation plus our explicit constraints.

    One entry of `shape` may be -1: it takes all remaining devices.
    """
    devices = jax.devices() if devices is None else devices
    requested = tuple(int(s) for s in shape)
    shape = list(requested)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)} may contain -1 only once")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = len(devices) // rest if rest and len(devices) % rest == 0 else 0
    shape = tuple(shape)
    if int(np.prod(shape)) != len(devices) or 0 in shape:
        need = "a multiple of " + str(-int(np.prod(requested))) if -1 in requested else str(int(np.prod(shape)))
        raise ValueError(f"mesh shape {requested} needs {need} devices, have {len(devices)}")
    return jax.make_mesh(
        shape,
        tuple(axis_names),
        axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
        devices=devices,
    )


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: AxisRules,
    mesh: Mesh,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Resolve logical names to a PartitionSpec.

    A mesh axis is used at most once per array, and is dropped for a dimension it does
    not divide (e.g. 2 KV heads on a 4-way tensor axis), so any config runs on any mesh.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in the axis rule table")
        target = table[name]
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        kept = []
        for axis in targets:
            if axis in used or axis not in mesh.shape:
                continue
            size = int(np.prod([mesh.shape[a] for a in kept + [axis]]))
            if shape is not None and shape[i] % size:
                continue
            kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


@dataclasses.dataclass(frozen=True)
class Sharder:
    """Carries (mesh, rules) through the model; `None` mesh means single device."""

    mesh: Mesh | None
    rules: AxisRules = DEFAULT_AXIS_RULES

    def sharding(self, logical_axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        assert self.mesh is not None
        return NamedSharding(self.mesh, logical_to_spec(logical_axes, self.rules, self.mesh, shape))

    def __call__(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
        """Constrain an activation to its logical sharding."""
        if self.mesh is None:
            return x
        if len(logical_axes) != x.ndim:
            raise ValueError(f"logical axes {tuple(logical_axes)} do not match array of shape {x.shape}")
        return jax.lax.with_sharding_constraint(x, self.sharding(logical_axes, x.shape))
