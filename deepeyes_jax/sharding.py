"""Logical axis names -> mesh axes (MaxText style).

Modules name the logical axes of every parameter and main activation; a rule table
(part of the model config, overridable from ml-collections configs) maps them onto
the mesh axes `data`, `fsdp`, `tensor`. Changing the parallelism is a config edit.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
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


def without_fsdp_on_parameters(rules: AxisRules) -> AxisRules:
    """The rules with `fsdp` dropped from every parameter axis (activation rules unchanged): the decoding layout,
    weights whole on every fsdp shard (still split over `tensor`), so that a decode step reads local weights."""
    def drop(target):
        kept = tuple(a for a in ((target,) if isinstance(target, str) else tuple(target or ())) if a != "fsdp")
        return None if not kept else kept[0] if len(kept) == 1 else kept

    return tuple((name, target if name.startswith("activation_") else drop(target)) for name, target in rules)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: AxisRules,
    mesh: Mesh,
    shape: Sequence[int] | None = None,
    taken: Sequence[str] = (),
) -> PartitionSpec:
    """Resolve logical names to a PartitionSpec.

    A mesh axis is used at most once per array (`taken` ones not at all: an enclosing `vmap_rows` holds them),
    and is dropped for a dimension it does not divide (e.g. 2 KV heads on a 4-way tensor axis), so any config
    runs on any mesh.
    """
    table = dict(rules)
    used: set[str] = set(taken)
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


# Mesh axes held by the batch dimension of the enclosing `vmap_rows` calls (while they trace).
_ROW_AXES = contextvars.ContextVar("row_axes", default=())


@dataclasses.dataclass(frozen=True)
class Sharder:
    """Carries (mesh, rules) through the model; `None` mesh means single device."""

    mesh: Mesh | None
    rules: AxisRules = DEFAULT_AXIS_RULES

    def sharding(self, logical_axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        assert self.mesh is not None
        return NamedSharding(self.mesh, logical_to_spec(logical_axes, self.rules, self.mesh, shape, _ROW_AXES.get()))

    def vmap_rows(self, fn):
        """jax.vmap(fn) over a leading row axis laid out like `activation_batch`: the batch dimension keeps those
        mesh axes (spmd_axis_name) and the constraints inside `fn` do not use them again. A plain vmap would
        replicate the rows inside and let an inner constraint (the vision tower's patches) take the axes:
        every row's activations moved between devices (all-to-all, all-gather)."""
        if self.mesh is None:
            return jax.vmap(fn)

        def run(*args):
            rows = jax.tree.leaves(args)[0].shape[0]
            spec = logical_to_spec(("activation_batch",), self.rules, self.mesh, (rows,), _ROW_AXES.get())[0]
            axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
            token = _ROW_AXES.set(_ROW_AXES.get() + axes)
            try:
                return jax.vmap(fn, spmd_axis_name=axes or None)(*args)
            finally:
                _ROW_AXES.reset(token)

        return run

    def __call__(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
        """Constrain an activation to its logical sharding."""
        if self.mesh is None:
            return x
        if len(logical_axes) != x.ndim:
            raise ValueError(f"logical axes {tuple(logical_axes)} do not match array of shape {x.shape}")
        return jax.lax.with_sharding_constraint(x, self.sharding(logical_axes, x.shape))


def take_rows(x: jax.Array, i, n: int, axis: int = 0) -> jax.Array:
    """Part i (traced or not) of n interleaved parts of the rows (dimension `axis`): rows i, i + n, i + 2n, ...

    Under row sharding (each device holds a contiguous run of rows) every part has the same number of rows
    on every device, so a loop over the parts stays local (contiguous parts would each sit on a few devices
    and every step would gather them), and only the part taken is copied, never a reordered whole."""
    rows = x.shape[axis]
    if rows % n:
        raise ValueError(f"{rows} rows do not split into {n} parts")
    x = x.reshape(*x.shape[:axis], rows // n, n, *x.shape[axis + 1:])
    return jax.lax.dynamic_index_in_dim(x, i, axis + 1, keepdims=False)


def put_rows(x: jax.Array, part: jax.Array, i, n: int, axis: int = 0) -> jax.Array:
    """x with part i of n (`take_rows`) replaced by `part`."""
    rows = x.shape[axis]
    y = x.reshape(*x.shape[:axis], rows // n, n, *x.shape[axis + 1:])
    y = jax.lax.dynamic_update_index_in_dim(y, jnp.expand_dims(part.astype(x.dtype), axis + 1), i, axis + 1)
    return y.reshape(x.shape)


# --------------------------------------------------------------------------- batches on several hosts


def row_sharding(mesh: Mesh, rules: AxisRules, shape: Sequence[int], axis: int = 0) -> NamedSharding:
    """Rows (dimension `axis`) split like `activation_batch`, the other dimensions replicated."""
    names = [None] * len(shape)
    names[axis] = "activation_batch"
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


def process_rows(sharding: NamedSharding, shape: Sequence[int], axis: int = 0) -> tuple[int, int]:
    """[lo, hi): the rows this process's devices hold under `sharding` (what it must supply)."""
    spans = sorted({(s[axis].start or 0, shape[axis] if s[axis].stop is None else s[axis].stop)
                    for s in sharding.addressable_devices_indices_map(tuple(shape)).values()})
    lo, hi = spans[0][0], max(stop for _, stop in spans)
    if sum(stop - start for start, stop in spans) != hi - lo:
        raise ValueError(f"process {jax.process_index()} holds rows {spans} of {sharding}: not one contiguous "
                         f"range (order the mesh devices by process along the row axes)")
    return lo, hi


def global_batch(tree, mesh: Mesh, rules: AxisRules, rows: int):
    """Host arrays of this process's rows (`process_rows` of each leaf) -> global arrays sharded by rows.

    Every leaf has rows on axis 0. On one process this is a plain sharded `device_put`."""
    def put(x):
        x = np.asarray(x)
        shape = (rows, *x.shape[1:])
        with jax.transfer_guard_host_to_device("allow"):
            return jax.make_array_from_process_local_data(row_sharding(mesh, rules, shape), x, shape)
    return jax.tree.map(put, tree)


def host_rows(x: jax.Array, mesh: Mesh, rules: AxisRules, axis: int = 0) -> np.ndarray:
    """This process's rows (`process_rows`) of a global array, on the host.

    The array is first laid out by rows (a no-op when it already is), so only this host's rows, and
    never another host's, are copied to it."""
    target = row_sharding(mesh, rules, x.shape, axis)
    if x.sharding != target:
        x = jax.jit(lambda a: a, out_shardings=target)(x)
    shards = {}
    for s in x.addressable_shards:
        shards.setdefault(s.index[axis].start or 0, s)
    with jax.transfer_guard_device_to_host("allow"):
        return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)], axis=axis)


def to_host(tree, mesh: Mesh):
    """Small global arrays -> host numpy on every host (gathered to replicated first, since a host can only
    read what its own devices hold)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    tree = jax.jit(lambda t: t, out_shardings=replicated)(tree)
    with jax.transfer_guard_device_to_host("allow"):
        return jax.tree.map(np.asarray, tree)


def key_name(k) -> str:
    """A pytree path entry as a name (dict key, sequence index or attribute)."""
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def state_shardings(abstract_state, params):
    """Shardings for a state built from the parameters (optimizer moments, ...): a leaf whose tree path ends with a
    parameter's path and has its shape gets that parameter's sharding; the others (step counts, scalars) are
    replicated on the parameters' mesh. `params`: arrays or ShapeDtypeStructs with NamedShardings."""
    by_path = {tuple(map(key_name, p)): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    mesh = next(x.sharding.mesh for x in by_path.values())
    longest = max(map(len, by_path), default=0)

    def pick(path, x):
        names = tuple(map(key_name, path))
        for n in range(min(len(names), longest), 0, -1):
            p = by_path.get(names[-n:])
            if p is not None and p.shape == x.shape:
                return p.sharding
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def init_on_mesh(init, params):
    """`init(params)` (e.g. an optax init) laid out by `state_shardings` when the parameters are on a mesh, so
    step counts are replicated there rather than left on one device."""
    if not all(isinstance(getattr(x, "sharding", None), NamedSharding) for x in jax.tree.leaves(params)):
        return jax.jit(init)(params)
    return jax.jit(init, out_shardings=state_shardings(jax.eval_shape(init, params), params))(params)
