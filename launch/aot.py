"""Compile the training step for a TPU topology ahead of time, on this (CPU-only) machine, and say if it fits.

  pip install -r requirements-aot.txt
  python -m launch.aot --config=configs/deepeyes_7b.py --topology=v5p:4x4x4 [--config.x=...]

1. The topology's devices (libtpu; no TPU needed) in the config's mesh; the model, optimizer state, batch and
   PRNG key as abstract arrays with the shardings the launcher gives them (nothing is allocated).
2. Each program the configured step runs (fused: train_step; with a judge URL: rollout_and_score, update;
   --programs picks others) is lowered and compiled for that topology.
3. One JSON line per program: per-device memory from the compiled program, loop-aware FLOPs, compile time and
   the shapes it was compiled for; then a summary line (the step's predicted time, MFU, tokens/s/chip).

To read a program: XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text" writes its optimised HLO and a memory
usage report per module (libtpu 0.0.52 cannot print a compiled TPU executable's text itself).
"""

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPU without one: libtpu only describes the devices

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from deepeyes_jax.rl import train_step as ts  # noqa: E402
from deepeyes_jax.rl.judge import JudgeConfig  # noqa: E402
from deepeyes_jax.rollout import tools  # noqa: E402
from deepeyes_jax.rollout.config import make_templates  # noqa: E402
from deepeyes_jax.rollout.inputs import RolloutBatch  # noqa: E402
from deepeyes_jax.sharding import row_sharding  # noqa: E402
from deepeyes_jax.train import aot, checkpoints, trainer  # noqa: E402
from deepeyes_jax.train.config_lib import build  # noqa: E402
from deepeyes_jax.train.input_pipeline import DataConfig  # noqa: E402
from deepeyes_jax.train.model_spec import ModelSpec, load_tokenizer  # noqa: E402
from deepeyes_jax.testing import qwen_tokenizer  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/deepeyes_7b.py", "Training configuration.", lock_config=True)
flags.DEFINE_string("topology", "v5p:4x4x4", "TPU topology to compile for, e.g. v5p:4x4x4, v5p:2x2x1, v6e:4x4.")
flags.DEFINE_list("programs", [], "Programs to compile (default: those the configured step runs); any of "
                  "train_step, rollout_and_score, update.")
FLAGS = flags.FLAGS


def tokenizer_for(spec: ModelSpec):
    """The checkpoint's (or model.tokenizer's) tokenizer; without either, a Qwen-sized one (151,665 tokens at
    Qwen's ids), so that the vocabulary, templates and byte table have the real model's sizes."""
    return load_tokenizer(spec) if spec.checkpoint or spec.tokenizer else qwen_tokenizer.build()


def abstract_batch(rows: int, data: DataConfig, crop, patch_dim: int, mesh, rules) -> ts.TrainBatch:
    """The launcher's global TrainBatch as abstract arrays, rows sharded as `input_pipeline` shards them."""
    def arr(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=row_sharding(mesh, rules, shape))

    i32, p = "int32", data.prompt_len
    rollout = RolloutBatch(prompt_ids=arr((rows, p), i32), prompt_mask=arr((rows, p), i32),
                           pixel_values=arr((rows, data.num_patches, patch_dim), "float32"),
                           image_grid_thw=arr((rows, 3), i32),
                           image=arr((rows, crop.image_height, crop.image_width, 3), "uint8"),
                           image_hw=arr((rows, 2), i32), first_turn=arr((rows, 0), i32),
                           tool=arr((rows,), bool))
    return ts.TrainBatch(rollout=rollout, answer=arr((rows, data.answer_bytes), "uint8"), answer_len=arr((rows,), i32),
                         source_kind=arr((rows,), i32), box=arr((rows, 4), "float32"), has_box=arr((rows,), bool))


def rows_sharded(outputs, mesh, rules):
    """Shardings along the row axis for (Trajectories, score) (position_ids hold rows on axis 1)."""
    traj, score = outputs
    def rows(x, axis=0):
        return row_sharding(mesh, rules, x.shape, axis)

    return (traj._replace(**{f: rows(getattr(traj, f), 1 if f == "position_ids" else 0) for f in traj._fields}),
            jax.tree.map(rows, score))


def main(argv):
    del argv
    cfg, topology = FLAGS.config, FLAGS.topology
    # ------------------------------------------------------------------ 1. Devices, abstract state
    mesh = aot.topology_mesh(topology, cfg.mesh)
    spec = build(ModelSpec, cfg.model, where="model")
    tokenizer = tokenizer_for(spec)
    model_config, graphdef, params = aot.abstract_model(spec, tokenizer, mesh)
    rules = model_config.axis_rules
    config = trainer.train_config(cfg)
    tx = ts.optimizer(build(ts.OptimConfig, cfg.optim, where="optim"))
    opt_state = checkpoints.abstract_opt_state(tx, params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    table = jax.tree.map(lambda x: aot.abstract(x, replicated), tools.token_bytes(tokenizer))
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    rows = cfg.prompts * config.grpo.group_size
    data = build(DataConfig, cfg.data, where="data")
    batch = abstract_batch(rows, data, config.rollout.crop, model_config.vision.patch_dim, mesh, rules)
    ref = params if config.grpo.kl_coef > 0 else None
    judged = bool(build(JudgeConfig, cfg.judge, where="judge").base_url)
    step_programs = ("rollout_and_score", "update") if judged else ("train_step",)
    wanted = tuple(FLAGS.programs) or step_programs
    unknown = set(wanted) - {"train_step", "rollout_and_score", "update"}
    if unknown:
        raise app.UsageError(f"--programs: unknown {sorted(unknown)}")
    r = config.rollout
    shapes = dict(prompts_per_step=cfg.prompts, group_size=config.grpo.group_size, max_prompt_tokens=data.prompt_len,
                  max_total_len=r.max_total_len, max_turns=r.max_turns, max_turn_tokens=r.max_turn_tokens,
                  crop_max_pixels=r.crop.max_pixels)

    # ------------------------------------------------------------------ 2. Compile each program
    jitted = ts.programs(graphdef, config, make_templates(tokenizer), tx)
    args = dict(train_step=(params, opt_state, batch, rng, table, ref),
                rollout_and_score=(params, batch, rng, table))
    reports = {}
    for name in ("rollout_and_score", "update", "train_step"):
        if name not in wanted:
            continue
        if name == "update":
            # Its inputs are the rollout's outputs: laid out as the compiled rollout leaves them, or (rollout
            # not compiled) sharded along rows as the rollout is meant to leave them.
            outputs = jax.eval_shape(jitted["rollout_and_score"], *args["rollout_and_score"])
            rollout = reports.get("rollout_and_score", {}).get("compiled")
            shardings = rollout.output_shardings if rollout else rows_sharded(outputs, mesh, rules)
            traj, score = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), outputs,
                                       shardings)
            args["update"] = (params, opt_state, traj, score, batch.box, batch.has_box, ref)
        reports[name] = aot.compile_report(name, jitted[name], args[name], topology=topology, mesh=mesh,
                                           shapes=shapes)
        # ---------------------------------------------------------------- 3. Report
        print(json.dumps({k: v for k, v in reports[name].items() if k != "compiled"}), flush=True)
    step = tuple(n for n in step_programs if n in wanted) or wanted
    print(json.dumps(aot.summary([reports[n] for n in step], topology=topology, programs=step,
                                 tokens_per_step=rows * r.max_total_len)), flush=True)


if __name__ == "__main__":
    app.run(main)
