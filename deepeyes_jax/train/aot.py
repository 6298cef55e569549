"""Ahead-of-time compilation of the training programs for a TPU topology, on a CPU-only machine (libtpu).

    mesh = topology_mesh("v5p:4x4x4", (1, -1, 1))
    report = compile_report("update", jitted, args, topology=..., chip=CHIPS["v5p"], shapes=...)

Memory comes from the compiled program (`memory_analysis`: what XLA allocated for that chip), FLOPs from the
traced program with every loop's trip count applied (`deepeyes_jax.flops`; XLA's `cost_analysis` counts a loop
body once: it is reported beside as `xla_flops`). A program that does not fit fails to compile with XLA's
CompileTimeHbmOom; its figure is read from the message and reported with `fits: false`.
"""

from __future__ import annotations

import dataclasses
import re
import time

import os

import jax
import numpy as np
from flax import nnx
from jax.experimental import topologies

from deepeyes_jax import sharding as shd
from deepeyes_jax.flops import program_flops
from deepeyes_jax.models.qwen2_5_vl import ModelConfig, Qwen2_5_VL, get_preset
from deepeyes_jax.models.qwen2_5_vl.presets import for_tokenizer
from deepeyes_jax.train import checkpoints
from deepeyes_jax.train.model_spec import ModelSpec, check_tokenizer


@dataclasses.dataclass(frozen=True)
class Chip:
    """hbm_bytes: what libtpu 0.0.52 reports as available to a program (its CompileTimeHbmOom message)."""

    hbm_bytes: float
    peak_bf16_flops: float  # per chip, dense


_GIB = 2.0**30
CHIPS = {
    "v5p": Chip(hbm_bytes=95.73 * _GIB, peak_bf16_flops=459e12),
    "v6e": Chip(hbm_bytes=31.24 * _GIB, peak_bf16_flops=918e12),
    "v5e": Chip(hbm_bytes=15.75 * _GIB, peak_bf16_flops=197e12),
}
_OOM = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM")


def chip_of(topology: str) -> Chip:
    kind = topology.split(":")[0]
    if kind not in CHIPS:
        raise ValueError(f"--topology {topology!r}: chip {kind!r} unknown; choose one of {sorted(CHIPS)} "
                         f"(e.g. v5p:4x4x4, v6e:4x4)")
    return CHIPS[kind]


def topology_mesh(topology: str, mesh_shape) -> jax.sharding.Mesh:
    """The project's (data, fsdp, tensor) mesh over the devices of a TPU topology that need not exist here."""
    chip_of(topology)
    try:
        devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    except Exception as e:  # libtpu's message names the problem (unknown shape, missing library)
        raise ValueError(f"--topology {topology!r}: {e}") from e
    return shd.make_mesh(mesh_shape, devices=devices)


def abstract_model(spec: ModelSpec, tokenizer, mesh):
    """-> (model config, graphdef, abstract params with the shardings `launch.train` gives them); nothing is
    allocated. A checkpoint contributes its config.json only; a preset takes the tokenizer's vocabulary."""
    runtime = spec.runtime()
    if spec.checkpoint:
        config = ModelConfig.from_json_file(os.path.join(spec.checkpoint, "config.json"), **runtime)
    else:
        config = for_tokenizer(get_preset(spec.preset, **runtime), tokenizer)
    check_tokenizer(config, tokenizer, spec.checkpoint or f"preset {spec.preset}")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2_5_VL(config, rngs=nnx.Rngs(0), mesh=mesh)))
    return config, graphdef, checkpoints.abstract_params(state, mesh, config.axis_rules)


def abstract(x, sharding):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def compile_report(program: str, jitted, args, *, topology: str, mesh, shapes: dict, flops_args=None) -> dict:
    """Compile jitted(*args) (abstract args with shardings) for the topology -> one report dict."""
    chip, devices = chip_of(topology), mesh.devices.size
    flops = program_flops(jitted, *(flops_args or args))
    report = dict(program=program, topology=topology, devices=int(devices), **shapes)
    t0 = time.perf_counter()
    try:
        compiled = jitted.lower(*args).compile()
    except Exception as e:  # noqa: BLE001 (XLA raises its runtime error type)
        found = _OOM.search(str(e))
        if not found:
            raise
        need = float(found.group(1)) * 1024.0 ** "KMGT".index(found.group(2)) * 1024
        report.update(compile_s=round(time.perf_counter() - t0, 1), argument_bytes=None, output_bytes=None,
                      alias_bytes=None, temp_bytes=int(need), peak_bytes=int(need), hbm_bytes=int(chip.hbm_bytes),
                      fits=False, flops=flops, flops_per_device=flops / devices, xla_flops=None,
                      predicted_s=None, error="CompileTimeHbmOom")
        return report
    mem, cost = compiled.memory_analysis(), compiled.cost_analysis() or {}
    if isinstance(cost, list):
        cost = cost[0]
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    xla_flops = float(cost.get("flops", 0.0))
    # XLA's TPU cost model times the program with every loop body run once; scale it by the loop-aware FLOPs.
    seconds = float(cost.get("optimal_seconds", 0.0))
    predicted = seconds * (flops / devices) / xla_flops if xla_flops > 0 and seconds > 0 else None
    report.update(compile_s=round(time.perf_counter() - t0, 1), argument_bytes=int(mem.argument_size_in_bytes),
                  output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
                  temp_bytes=int(mem.temp_size_in_bytes), peak_bytes=int(peak), hbm_bytes=int(chip.hbm_bytes),
                  fits=bool(peak <= chip.hbm_bytes), hbm_free=round(1.0 - peak / chip.hbm_bytes, 4), flops=flops,
                  flops_per_device=flops / devices, xla_flops=xla_flops, predicted_s=predicted)
    report["compiled"] = compiled
    return report


def summary(reports: list[dict], *, topology: str, programs: tuple[str, ...], tokens_per_step: float) -> dict:
    """The step = `programs` run once each: its predicted time, MFU against the bf16 peak, tokens/s/chip."""
    chip = chip_of(topology)
    chosen = [r for r in reports if r["program"] in programs]
    devices = chosen[0]["devices"]
    flops = sum(r["flops"] for r in chosen)
    times = [r["predicted_s"] for r in chosen]
    step_s = sum(times) if all(t is not None for t in times) else None
    return dict(summary=True, topology=topology, devices=devices, programs=list(programs),
                fits=all(r["fits"] for r in chosen), step_flops=flops,
                min_hbm_free=min((r.get("hbm_free") or -1.0) for r in chosen),
                predicted_step_s=step_s,
                mfu=None if not step_s else flops / devices / (step_s * chip.peak_bf16_flops),
                tokens_per_step=tokens_per_step,
                tokens_per_s_per_chip=None if not step_s else tokens_per_step / step_s / devices,
                deepeyes_tokens_per_s_per_gpu=375.0)
