"""Orbax checkpoints of the GRPO train state: async, keep-last-K, resharding restore, corruption fallback.

One checkpoint step holds five orbax items (one sub-directory each):

    params      the model parameters (an `nnx.State` of Params, or any pytree of arrays)
    opt_state   the optax state (e.g. chain(clip, adamw): tuples of namedtuples of nnx.State)
    rng         uint32[*key_shape]: `jax.random.key_data(rng)`, rewrapped on restore
    data_state  small JSON dict: data iterator position (epoch, index, seed, ...)
    meta        JSON: rng impl name / typed flag and the format version

Pytrees are stored as nested dicts named by their tree paths (e.g. params/text/layers/0/q_proj/kernel),
so a checkpoint is readable without the model code; restore needs the abstract target trees
(`jax.ShapeDtypeStruct` leaves WITH `.sharding`) and lays every array out on those shardings, so a
checkpoint written on one mesh restores onto any other mesh shape. `abstract_params` and
`abstract_opt_state` build such targets from the model's `logical_axes` metadata + a mesh + rules.

Corruption: orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete
(on GCS it writes in place and adds `commit_success.txt` last), so a run killed mid-write leaves a tmp
dir, which orbax never lists as a step, or a step without the commit marker, which `restore` rejects
(it requires the marker in the step dir and in every item dir). A listed step whose files were later
truncated or deleted fails while being read (tensorstore reports the short / missing chunk; a
missing JSON item or a tree / shape / dtype mismatch also fails): `restore` catches that, logs a
warning naming the step, moves the directory aside to `<step>.corrupt` (never deletes anything) and
falls back to the next older step. Restore never raises on a bad checkpoint; with no readable
checkpoint it returns None.

Preemption: `install_sigterm_handler` turns SIGTERM (the TPU preemption notice) into a flag;
`preemption_requested(step)` reads it, and in multi-process runs (after `jax.distributed.initialize`)
also `multihost_utils.reached_preemption_sync_point(step)`, so all hosts save the same step. On a single
CPU process that JAX call is usable but always False (there is no distributed client), so the signal flag
is the mechanism there.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepeyes_jax.sharding import DEFAULT_AXIS_RULES, AxisRules, key_name, logical_to_spec, state_shardings

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_ITEMS = ("params", "opt_state", "rng", "data_state", "meta")
COMMIT_MARKER = "commit_success.txt"  # orbax 0.12 writes it last, in the step dir and in every item dir


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """save_every: steps between checkpoints (the last step and a preemption always save).
    keep: the most recent checkpoints kept. async_save: write in a background thread."""

    save_every: int = 20
    keep: int = 2
    async_save: bool = True


class Restored(NamedTuple):
    step: int
    params: Any  # same tree as abstract_params, arrays on its shardings
    opt_state: Any  # same tree as abstract_opt_state
    rng: jax.Array  # typed key (or raw uint32 key data if a raw key was saved)
    data_state: dict


# --------------------------------------------------------------------------- pytree <-> nested dict


def _to_nested(tree) -> dict:
    """Pytree -> nested dict {path component: ... -> leaf}; components are str(key/idx/attr)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [key_name(k) for k in path] or ["_leaf"]
        node = out
        for n in names[:-1]:
            node = node.setdefault(n, {})
        if names[-1] in node:
            raise ValueError(f"duplicate tree path {'/'.join(names)}")
        node[names[-1]] = leaf
    return out


def _from_nested(nested: dict, like):
    """Inverse of `_to_nested`, with the tree structure of `like`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in paths:
        node = nested
        for n in [key_name(k) for k in path] or ["_leaf"]:
            node = node[n]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


# --------------------------------------------------------------------------- abstract targets


def abstract_params(params, mesh: Mesh, rules: AxisRules = DEFAULT_AXIS_RULES):
    """Params (arrays or ShapeDtypeStructs; an nnx.State whose Variables carry `logical_axes`)
    -> same tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, rules(axes)))`.
    Variables without `logical_axes` (and plain leaves) are replicated."""
    is_var = lambda x: isinstance(x, nnx.Variable)
    shardings = []
    for v in jax.tree.leaves(params, is_leaf=is_var):
        leaf = v.get_value() if is_var(v) else v
        axes = v.get_metadata().get("logical_axes") if is_var(v) else None
        spec = PartitionSpec() if axes is None else logical_to_spec(axes, rules, mesh, leaf.shape)
        shardings.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec)))
    return jax.tree.unflatten(jax.tree.structure(params), shardings)


def abstract_opt_state(tx, abstract_params_tree):
    """`jax.eval_shape(tx.init, params)` with shardings (`sharding.state_shardings`): optimizer leaves that follow a
    parameter (adam mu / nu, ...) take its sharding, the others (step counts) are replicated."""
    shapes = jax.eval_shape(tx.init, abstract_params_tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                        state_shardings(shapes, abstract_params_tree))


def _with_sharding(abstract, shardings):
    """Target tree: abstract leaves (need .shape/.dtype) + shardings (tree or None = the leaves' own)."""
    if shardings is None:
        out = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract)
    else:
        out = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    for x in jax.tree.leaves(out):
        if x.sharding is None:
            raise ValueError("every abstract leaf needs a sharding (use abstract_params / abstract_opt_state)")
    return out


# --------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Async orbax checkpoints of (params, opt_state, rng, data_state) under `directory`.

    save_every: a non-forced `save(step, ...)` writes only when step % save_every == 0.
    keep: the number of most recent checkpoints kept (older ones are deleted by orbax).
    Saves are asynchronous: `save` returns once the arrays are copied off the device and the files are
    written by a background thread; `wait()` blocks until the last save is committed.
    """

    @classmethod
    def from_config(cls, directory: str | os.PathLike, config: CheckpointConfig) -> Checkpointer:
        return cls(directory, save_every=config.save_every, keep=config.keep, async_save=config.async_save)

    def __init__(self, directory: str | os.PathLike, *, save_every: int = 1, keep: int = 3,
                 async_save: bool = True):
        directory = os.fspath(directory)
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def save(self, step: int, params, opt_state, rng: jax.Array, data_state: dict, *, force: bool = False) -> bool:
        """Start writing checkpoint `step`; -> whether a save was started (False: not a save step).

        params / opt_state: pytrees of jax.Arrays (any sharding). rng: a typed key `jax.random.key(...)`
        (or raw uint32 key data). data_state: JSON-able dict. Arrays may be donated / overwritten by the
        next train step once this returns (orbax copies them to host first).
        """
        typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
        meta = {
            "format": FORMAT_VERSION,
            "rng_typed": bool(typed),
            "rng_impl": str(jax.random.key_impl(rng)) if typed else None,
        }
        key_data = np.asarray(jax.random.key_data(rng) if typed else rng)
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(_to_nested(params)),
            opt_state=ocp.args.StandardSave(_to_nested(opt_state)),
            rng=ocp.args.StandardSave({"key_data": key_data}),
            data_state=ocp.args.JsonSave(dict(data_state)),
            meta=ocp.args.JsonSave(meta),
        )
        return bool(self._manager.save(int(step), args=args, force=force))

    def wait(self) -> None:
        """Block until the pending asynchronous save (if any) is committed to disk."""
        self._manager.wait_until_finished()

    def in_progress(self) -> bool:
        """True while an asynchronous save is still being written."""
        return bool(self._manager.is_saving_in_progress())

    def all_steps(self) -> list[int]:
        """Committed steps, ascending (tmp / uncommitted directories are never listed)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, step: int | None = None, *, abstract_params, abstract_opt_state,
                params_shardings=None, opt_state_shardings=None, fallback: bool = True,
                quarantine: bool = True) -> Restored | None:
        """Restore onto the target shardings -> Restored(step, params, opt_state, rng, data_state) or None.

        abstract_params / abstract_opt_state: trees of ShapeDtypeStruct (or arrays) giving the structure,
        shapes, dtypes and, unless `*_shardings` trees are given, the target `.sharding` of each leaf
        (see `abstract_params`, `abstract_opt_state`). `step=None` means the latest step.
        A step that fails to read (missing / truncated files, bad JSON, shape mismatch) is logged with a
        warning, renamed to `<step>.corrupt` if `quarantine`, and, if `fallback`, the next older step is
        tried. Returns None when no step can be restored (e.g. a fresh run).
        """
        self.wait()
        p_target = _to_nested(_with_sharding(abstract_params, params_shardings))
        o_target = _to_nested(_with_sharding(abstract_opt_state, opt_state_shardings))
        steps = self.all_steps()
        candidates = [s for s in reversed(steps) if step is None or s <= step]
        if step is not None and step not in steps:
            log.warning("checkpoint step %d not found in %s (have %s)", step, self.directory, steps)
            if not fallback:
                return None
        for s in candidates:
            if step is not None and s != step and not fallback:
                break
            try:
                out = self._restore_step(s, p_target, o_target, abstract_params, abstract_opt_state)
            except Exception as e:  # noqa: BLE001 -- any read failure means a bad checkpoint
                log.warning("checkpoint step %d in %s is unreadable (%s: %s); falling back to an older step",
                            s, self.directory, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
                if quarantine:
                    self._quarantine(s)
                if not fallback:
                    return None
                continue
            return out
        return None

    def _restore_step(self, step, p_target, o_target, abstract_params, abstract_opt_state) -> Restored:
        step_dir = epath.Path(self.directory) / str(step)
        for d in [step_dir] + [step_dir / item for item in _ITEMS]:
            if not (d / COMMIT_MARKER).exists():
                raise FileNotFoundError(f"{d} has no {COMMIT_MARKER}: the save did not complete")
        got = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(p_target),
            opt_state=ocp.args.StandardRestore(o_target),
            rng=ocp.args.StandardRestore(),
            data_state=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        ))
        meta = got["meta"]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            raise TypeError(f"bad meta item {meta!r}")
        params = _from_nested(got["params"], abstract_params)
        opt_state = _from_nested(got["opt_state"], abstract_opt_state)
        for name, tree, target in (("params", params, abstract_params), ("opt_state", opt_state, abstract_opt_state)):
            for x, t in zip(jax.tree.leaves(tree), jax.tree.leaves(target), strict=True):
                if x.shape != t.shape or x.dtype != t.dtype:
                    raise ValueError(f"{name}: restored {x.shape} {x.dtype}, expected {t.shape} {t.dtype}")
        key_data = np.asarray(got["rng"]["key_data"])
        rng = (jax.random.wrap_key_data(key_data, impl=meta["rng_impl"]) if meta["rng_typed"]
               else jax.numpy.asarray(key_data))
        data_state = got["data_state"]
        if not isinstance(data_state, dict):
            raise TypeError(f"bad data_state item {data_state!r}")
        return Restored(int(step), params, opt_state, rng, data_state)

    def _quarantine(self, step: int) -> None:
        """Move a bad step aside (`<step>.corrupt[.N]`) so orbax stops listing it and the step can be
        written again; nothing is deleted. Only process 0 touches the filesystem."""
        if jax.process_index() == 0:
            src = epath.Path(self.directory) / str(step)
            dst, n = src.parent / f"{step}.corrupt", 0
            while dst.exists():
                n += 1
                dst = src.parent / f"{step}.corrupt.{n}"
            try:
                src.rename(dst)
                log.warning("moved unreadable checkpoint %s to %s", src, dst)
            except OSError as e:
                log.warning("could not move unreadable checkpoint %s aside: %s", src, e)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_quarantine_{step}")
        self._manager.reload()

    def close(self) -> None:
        """Wait for the pending save and release orbax's threads."""
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- preemption

_preempted = threading.Event()


def install_sigterm_handler(callback: Callable[[int], None] | None = None,
                            signals: Sequence[int] = (signal.SIGTERM,)) -> None:
    """On SIGTERM (the TPU preemption notice) set the flag read by `preemption_requested`, then call
    `callback(signum)` if given. The handler only records the request: the training loop should, at its
    next step boundary, `save(..., force=True)`, `wait()`, `close()` and exit 0. Must be called from the
    main thread. Not needed on multi-host TPU runs where JAX's preemption service already listens to
    SIGTERM (then `preemption_requested(step)` uses `reached_preemption_sync_point`)."""

    def handler(signum, frame):
        _preempted.set()
        log.warning("received signal %d: preemption requested, will checkpoint and exit", signum)
        if callback is not None:
            callback(signum)

    for s in signals:
        signal.signal(s, handler)


def preemption_requested(step: int | None = None) -> bool:
    """True once SIGTERM was received, or (multi-process runs with the preemption service, given `step`)
    when all hosts reached JAX's preemption sync point at `step`."""
    if _preempted.is_set():
        return True
    if step is not None and jax.process_count() > 1:
        try:
            return bool(multihost_utils.reached_preemption_sync_point(int(step)))
        except RuntimeError:  # preemption service not enabled
            return False
    return False


def reset_preemption_flag() -> None:
    """Clear the SIGTERM flag (tests)."""
    _preempted.clear()
