"""GRPO training of Qwen2.5-VL with the zoom-in tool inside the compiled step.

  python -m launch.train --config=configs/grpo_toy.py --workdir=runs/toy [--config.steps=...]

Resumes from the latest good checkpoint in --workdir (model, optimizer, RNG, data position);
SIGTERM (TPU preemption) saves and exits; metrics go to the console, TensorBoard and metrics.jsonl.
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from deepeyes_jax.data import toy_scenes
from deepeyes_jax.data.prompt_stream import PromptStream
from deepeyes_jax.data.tokenizer import build_tokenizer
from deepeyes_jax.models.qwen2_5_vl import ModelConfig, Qwen2_5_VL, TextConfig, VisionConfig, save_pretrained
from deepeyes_jax.models.qwen2_5_vl.presets import for_tokenizer
from deepeyes_jax.rl.grpo import GRPOConfig
from deepeyes_jax.rl.rewards import RewardConfig
from deepeyes_jax.rl.train_step import TrainConfig, make_optimizer, make_train_step
from deepeyes_jax.rollout import tools
from deepeyes_jax.rollout.config import RolloutConfig, make_templates
from deepeyes_jax.rollout.zoom import CropSpec
from deepeyes_jax.sharding import make_mesh
from deepeyes_jax.train import checkpoints
from deepeyes_jax.train.metrics import MetricsWriter

config_flags.DEFINE_config_file("config", "configs/grpo_toy.py", "Training configuration.", lock_config=True)
flags.DEFINE_string("workdir", "runs/grpo_toy", "Checkpoints, metrics and the exported model go here.")
FLAGS = flags.FLAGS


def grounding_iou(turn_bbox, turn_status, boxes):
    """Mean IoU of successful zoom boxes against the ground-truth box; NaN without any zoom."""
    zoom = turn_status == tools.STATUS_ZOOM
    gt = boxes[:, None, :]
    lo, hi = np.maximum(turn_bbox[..., :2], gt[..., :2]), np.minimum(turn_bbox[..., 2:], gt[..., 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    area = lambda b: np.prod(b[..., 2:] - b[..., :2], axis=-1)  # noqa: E731
    iou = inter / np.maximum(area(turn_bbox) + area(gt) - inter, 1e-9)
    ok = zoom & np.isfinite(iou)
    return float(iou[ok].mean()) if ok.any() else float("nan")


def main(argv):
    del argv
    cfg = FLAGS.config
    if cfg.distributed:
        jax.distributed.initialize()
    jax.config.update("jax_transfer_guard", "disallow")
    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("DEEPEYES_JAX_CACHE", os.path.expanduser("~/.cache/deepeyes_jax/xla")))
    workdir = FLAGS.workdir
    os.makedirs(workdir, exist_ok=True)

    # ------------------------------------------------------------------ Set up mesh
    mesh = make_mesh(cfg.mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    # ------------------------------------------------------------------ Tokenizer and model
    tokenizer = build_tokenizer(vocab_size=cfg.tokenizer_vocab)
    m = cfg.model
    model_cfg = for_tokenizer(ModelConfig(
        text=TextConfig(hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
                        num_key_value_heads=m.num_key_value_heads, mrope_section=tuple(m.mrope_section)),
        vision=VisionConfig(depth=m.vision_depth, hidden_size=m.vision_hidden_size,
                            intermediate_size=2 * m.vision_hidden_size, num_heads=m.vision_heads,
                            out_hidden_size=m.hidden_size, fullatt_block_indexes=(m.vision_depth - 1,)),
        dtype=jnp.dtype(cfg.compute_dtype), remat=cfg.remat, axis_rules=tuple(cfg.axis_rules)), tokenizer)
    with jax.transfer_guard("allow"):
        model = Qwen2_5_VL(model_cfg, rngs=nnx.Rngs(cfg.seed), mesh=mesh)

    # ------------------------------------------------------------------ Optimizer and the fused step
    o = cfg.optim
    schedule = optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1))
    tx = make_optimizer(schedule, weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm)
    d, r = cfg.data, cfg.rollout
    crop = CropSpec(image_height=d.image_height, image_width=d.image_width, min_pixels=r.crop_min_pixels,
                    max_pixels=r.crop_max_pixels)
    reward_cfg = RewardConfig(acc_weight=cfg.reward.acc_weight, format_weight=cfg.reward.format_weight,
                              tool_weight=cfg.reward.tool_weight)
    train_cfg = TrainConfig(
        rollout=RolloutConfig(max_total_len=r.max_total_len, crop=crop, max_turns=r.max_turns,
                              max_turn_tokens=r.max_turn_tokens, temperature=r.temperature),
        grpo=GRPOConfig(group_size=cfg.grpo.group_size, clip_ratio_low=cfg.grpo.clip_ratio_low,
                        clip_ratio_high=cfg.grpo.clip_ratio_high, kl_coef=cfg.grpo.kl_coef,
                        entropy_coef=cfg.grpo.entropy_coef, loss_agg_mode=cfg.grpo.loss_agg_mode,
                        temperature=r.temperature),
        reward=reward_cfg, logprob_chunk=cfg.logprob_chunk, mini_batches=cfg.mini_batches,
        micro_batches=cfg.micro_batches)
    graphdef = nnx.split(model)[0]
    with jax.transfer_guard("allow"):
        step_fn, params, opt_state = make_train_step(model, tx, train_cfg, make_templates(tokenizer),
                                                     jax.device_put(tools.token_bytes(tokenizer), replicated))
    del model  # its arrays now belong to the (donated) train state

    # ------------------------------------------------------------------ Restore
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=cfg.checkpoint.save_every,
                                    keep=cfg.checkpoint.keep)
    abstract = checkpoints.abstract_params(params, mesh, model_cfg.axis_rules)
    with jax.transfer_guard("allow"):
        restored = ckpt.restore(abstract_params=abstract,
                                abstract_opt_state=checkpoints.abstract_opt_state(tx, abstract))
    with jax.transfer_guard("allow"):
        rng = jax.device_put(jax.random.key(cfg.seed), replicated)
    start, data_state = 0, None
    if restored is not None:
        start, params, opt_state, rng, data_state = restored
        logging.info("resumed from step %d (data position %s)", start, data_state)
    else:  # lay the fresh state out exactly as a restored one, so the step compiles once either way
        shardings = lambda tree: jax.tree.map(lambda a: a.sharding, tree)  # noqa: E731
        params = jax.device_put(params, shardings(abstract))
        opt_state = jax.device_put(opt_state, shardings(checkpoints.abstract_opt_state(tx, abstract)))

    # ------------------------------------------------------------------ Input pipeline
    stream = PromptStream(
        functools.partial(toy_scenes.scene, seed=cfg.seed, height=d.image_height, width=d.image_width),
        tokenizer=tokenizer, prompts=d.prompts, group_size=cfg.grpo.group_size, prompt_len=d.prompt_len,
        num_patches=d.num_patches, image_hw=(d.image_height, d.image_width), max_pixels=d.max_pixels,
        reward=reward_cfg, state=data_state)

    # ------------------------------------------------------------------ Train loop
    writer = MetricsWriter(workdir, total_steps=cfg.steps, resume_step=start, active=jax.process_index() == 0)
    checkpoints.install_sigterm_handler()
    for step in range(start, cfg.steps):
        host_batch, boxes = stream.next_batch()
        batch = jax.device_put(host_batch, replicated)
        t0 = time.perf_counter()
        key = jax.random.fold_in(rng, jax.device_put(np.uint32(step), replicated))
        params, opt_state, metrics, traj, _ = step_fn(params, opt_state, batch, key)
        metrics, turn_bbox, turn_status = jax.device_get((metrics, traj.turn_bbox, traj.turn_status))
        seconds = time.perf_counter() - t0
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics.update(step_time=seconds, rollout_tokens_per_s=metrics["sampled_tokens"] / seconds,
                       grounding_iou=grounding_iou(turn_bbox, turn_status, boxes),
                       skipped_records=float(stream.skipped))
        writer.write(step, metrics)
        # Checkpoint n holds the state after n steps; the last one and a preempted one are always saved.
        last = step + 1 == cfg.steps or checkpoints.preemption_requested(step)
        ckpt.save(step + 1, params, opt_state, rng, stream.state(), force=last)
        if step + 1 < cfg.steps and checkpoints.preemption_requested(step):
            logging.warning("preemption requested: saved step %d, exiting", step + 1)
            break
    else:
        if cfg.export_hf:
            with jax.transfer_guard("allow"):
                save_pretrained(nnx.merge(graphdef, params), os.path.join(workdir, "export"))
    ckpt.wait()
    ckpt.close()
    writer.close()


if __name__ == "__main__":
    app.run(main)
