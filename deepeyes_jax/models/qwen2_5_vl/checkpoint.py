"""Hugging Face checkpoints <-> our NNX module.

Our parameter paths mirror the Hub names (`model.layers.3.self_attn.q_proj.kernel` is
`model.layers.3.self_attn.q_proj.weight`), so one rule maps every tensor: a kernel is
stored float[in, *out] and its Hub weight is float[prod(out), in] (torch Linear), with
the Conv3d patch embedding reshaped to its 5-D kernel on the way out.
"""

from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from deepeyes_jax.models.qwen2_5_vl.config import ModelConfig
from deepeyes_jax.models.qwen2_5_vl.model import Qwen2_5_VL
from deepeyes_jax.models.safetensors_io import FLOAT_DTYPES, CheckpointError, SafetensorsFile, strict_json, write_file
from deepeyes_jax.sharding import Sharder

_RENAMES = {
    "visual.patch_embed.kernel": "visual.patch_embed.proj.kernel",
    "visual.merger.fc1": "visual.merger.mlp.0",
    "visual.merger.fc2": "visual.merger.mlp.2",
}
# Newer transformers keep these prefixes in memory; accept checkpoints saved that way too.
_ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))
_INDEX = "model.safetensors.index.json"


def hf_name(path: tuple) -> str:
    name = ".".join(str(p) for p in path)
    for ours, theirs in _RENAMES.items():
        name = name.replace(ours, theirs)
    return name.replace(".kernel", ".weight")


def hf_shape(path: tuple, ours: tuple[int, ...], config: ModelConfig) -> tuple[int, ...]:
    if path == ("visual", "patch_embed", "kernel"):
        v = config.vision
        return (ours[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    if path[-1] == "kernel":
        return (int(np.prod(ours[1:])), ours[0])
    return (int(np.prod(ours)),) if path[-1] == "bias" else ours


def to_ours(path: tuple, w: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
    """Hub tensor -> our layout; a view where numpy can, so shards are sliced lazily."""
    if path[-1] == "kernel":
        return w.reshape(-1, ours[0]).T.reshape(ours)
    return w.reshape(ours)


def to_hf(path: tuple, w: np.ndarray, config: ModelConfig) -> np.ndarray:
    shape = hf_shape(path, w.shape, config)
    if path[-1] == "kernel":
        return w.reshape(w.shape[0], -1).T.reshape(shape)
    return w.reshape(shape)


def _shard_path(path: str, fn, index: str) -> str:
    """The shard file an index entry names: a plain relative path inside the checkpoint directory (no absolute
    path, no `..`, no drive or NUL), else a `CheckpointError`. (Symlinked files are followed: the Hugging Face
    cache links snapshot files to its blob store.)"""
    if not isinstance(fn, str) or not fn or "\0" in fn or "\\" in fn or os.path.isabs(fn) or ":" in fn:
        raise CheckpointError(f"{index}: shard file name {fn!r} is not a relative path inside {path}")
    parts = fn.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise CheckpointError(f"{index}: shard file name {fn!r} leaves the checkpoint directory {path}")
    full = os.path.join(path, *parts)
    if not os.path.isfile(full):
        raise CheckpointError(f"{index}: shard file {fn!r} does not exist in {path}")
    return full


def _read_index(path: str) -> dict[str, str]:
    """model.safetensors.index.json -> {tensor name: shard file name}, every field checked."""
    index = os.path.join(path, _INDEX)
    with open(index, "rb") as f:
        data = strict_json(f.read(), index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no weight_map object")
    bad = [name for name, fn in weight_map.items() if not isinstance(fn, str)]
    if bad:
        raise CheckpointError(f"{index}: weight_map[{bad[0]!r}] = {weight_map[bad[0]]!r} is not a file name")
    return weight_map


def _open_tensors(path: str) -> dict[str, SafetensorsFile]:
    index = os.path.join(path, _INDEX)
    if os.path.exists(index):
        weight_map = _read_index(path)
        files = {fn: SafetensorsFile(_shard_path(path, fn, index)) for fn in sorted(set(weight_map.values()))}
        out = {}
        for name, fn in weight_map.items():
            if name not in files[fn].entries:
                raise CheckpointError(f"{_INDEX} maps {name!r} to {fn}, which does not contain it")
            out[name] = files[fn]
    else:
        shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not shards:
            raise FileNotFoundError(f"no model.safetensors or {_INDEX} in {path}")
        out = {}
        for fn in shards:
            st = SafetensorsFile(fn)
            out.update({k: st for k in st.keys()})
    renamed = {}
    for name, st in out.items():
        key = name
        for old, new in _ALIASES:
            if key.startswith(old):
                key = new + key[len(old):]
        renamed[key] = (st, name)
    return renamed


def from_pretrained(path: str, *, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
                    compute_dtype=None, axis_rules=None, **runtime) -> Qwen2_5_VL:
    """Load a Hugging Face Qwen2.5-VL directory onto `mesh` (or the default device).

    Each tensor is memory-mapped and every device reads only its own shard of it, so the
    model is never materialised on the host, let alone twice. `runtime`: other runtime fields of
    `ModelConfig` (`ModelConfig.runtime()`).
    """
    runtime = dict(runtime, param_dtype=dtype, dtype=compute_dtype or dtype)
    if axis_rules is not None:
        runtime["axis_rules"] = tuple(axis_rules)
    config = ModelConfig.from_json_file(os.path.join(path, "config.json"), **runtime)
    abstract = nnx.eval_shape(lambda: Qwen2_5_VL(config, rngs=nnx.Rngs(0), mesh=mesh))
    graphdef, state = nnx.split(abstract)
    tensors = _open_tensors(path)
    shard = Sharder(mesh, config.axis_rules)
    missing, wrong, used = [], [], set()
    for path_, var in nnx.to_flat_state(state):
        name = hf_name(path_)
        shape = tuple(var.get_value().shape)
        if name not in tensors:
            missing.append(name)
            continue
        st, stored = tensors[name]
        used.add(name)
        expected = hf_shape(path_, shape, config)
        if st.shape(stored) != expected:
            wrong.append(f"shape {name}: expected {list(expected)}, found {list(st.shape(stored))}")
            continue
        if st.entries[stored]["dtype"] not in FLOAT_DTYPES:  # would be cast silently
            wrong.append(f"dtype {name}: {st.entries[stored]['dtype']}, not a floating-point weight")
            continue
        host = to_ours(path_, st.get(stored), shape)
        sharding = (shard.sharding(var.get_metadata()["logical_axes"], shape) if mesh is not None
                    else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        # The loader's transfers are the intended ones: allowed even under a strict transfer guard.
        with jax.transfer_guard_host_to_device("allow"):
            var.set_value(jax.make_array_from_callback(
                shape, sharding, lambda idx, h=host: np.asarray(h[idx], dtype=jnp.dtype(dtype))))
    unexpected = sorted(set(tensors) - used - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    problems = ([f"missing tensor {n}" for n in missing] + [f"wrong {w}" for w in wrong]
                + [f"unexpected tensor {n}" for n in unexpected])
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"checkpoint {path} does not match the Qwen2.5-VL config:\n  {shown}")
    return nnx.merge(graphdef, state)


def save_pretrained(model: Qwen2_5_VL, path: str, *, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write config.json + safetensors with the Hub names, loadable by transformers and vLLM.

    Tensors are gathered one at a time; on multi-host runs every process takes part in
    the gathers and process 0 writes.
    """
    config = model.config
    params = {hf_name(p): (p, v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    specs = [(n, hf_shape(p, tuple(v.get_value().shape), config), jnp.dtype(v.get_value().dtype))
             for n, (p, v) in params.items()]

    def fetch(name):
        path_, var = params[name]
        arr = var.get_value()
        host = (np.asarray(multihost_utils.process_allgather(arr, tiled=True)) if jax.process_count() > 1
                else np.asarray(jax.device_get(arr)))
        return to_hf(path_, host, config)

    shards, current, size = [], [], 0
    for spec in specs:
        nbytes = int(np.prod(spec[1])) * spec[2].itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    shards.append(current)

    is_writer = jax.process_index() == 0
    if is_writer:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "model*.safetensors")) + glob.glob(os.path.join(path, _INDEX)):
            os.remove(stale)
        config.save_json(path)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total, weight_map = 0, {}
    for fn, shard_specs in zip(names, shards):
        if is_writer:
            total += write_file(os.path.join(path, fn), shard_specs, fetch, {"format": "pt"})
        else:
            for name, _, _ in shard_specs:
                fetch(name)
        weight_map.update({name: fn for name, _, _ in shard_specs})
    if is_writer and len(shards) > 1:
        with open(os.path.join(path, _INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
