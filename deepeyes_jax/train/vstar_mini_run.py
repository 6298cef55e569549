"""The pieces `launch.train` and `launch.eval` share for V*-mini: config -> data, model, programs, evaluation."""

from __future__ import annotations

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepeyes_jax.data import vstar_mini, vstar_mini_tfds
from deepeyes_jax.data.prompt_stream import PromptStream
from deepeyes_jax.data.tokenizer import COMPACT_SYSTEM_PROMPT, SYSTEM_PROMPT
from deepeyes_jax.data.vstar_mini_sft import Budgets
from deepeyes_jax.eval import render
from deepeyes_jax.eval import vstar_mini as ev
from deepeyes_jax.models.qwen2_5_vl import ModelConfig, TextConfig, VisionConfig
from deepeyes_jax.rl.grpo import GRPOConfig
from deepeyes_jax.rl.rewards import RewardConfig
from deepeyes_jax.rl.train_step import TrainConfig, rollout_and_score
from deepeyes_jax.rollout.config import RolloutConfig
from deepeyes_jax.rollout.zoom import CropSpec
from deepeyes_jax.sft.conversation import Shapes

SYSTEM_PROMPTS = {"compact": COMPACT_SYSTEM_PROMPT, "deepeyes": SYSTEM_PROMPT}


def system_prompt(cfg) -> str:
    if cfg.system_prompt not in SYSTEM_PROMPTS:
        raise ValueError(f"--config.system_prompt={cfg.system_prompt!r}; choose one of {sorted(SYSTEM_PROMPTS)}")
    return SYSTEM_PROMPTS[cfg.system_prompt]


def world(cfg) -> vstar_mini.WorldConfig:
    return vstar_mini.WorldConfig(size=cfg.data.image_size, hard_fraction=cfg.data.hard_fraction,
                                  kinds=tuple(cfg.data.kinds), letter_stroke=cfg.data.letter_stroke,
                                  position_tint=cfg.data.position_tint, small_size=tuple(cfg.data.small_size),
                                  num_small=tuple(cfg.data.num_small))


def load_data(cfg, *, test_seed: int | None = None) -> dict:
    """{"train", "test"} random-access V*-mini splits (built on first use); `test_seed` >= 0 gives the
    test split of a freshly generated dataset with that seed."""
    d = cfg.data
    load = functools.partial(vstar_mini_tfds.load, os.path.expanduser(d.data_dir), num_train=d.num_train,
                             num_test=d.num_test, world=world(cfg))
    splits = load(seed=d.seed)
    if test_seed is not None and test_seed >= 0 and test_seed != d.seed:
        splits = dict(splits, test=load(seed=test_seed)["test"])
    return splits


def budgets(cfg) -> Budgets:
    return Budgets(scene_max_pixels=cfg.data.scene_max_pixels, crop_min_pixels=cfg.rollout.crop_min_pixels,
                   crop_max_pixels=cfg.rollout.crop_max_pixels, system_prompt=system_prompt(cfg),
                   tool_prior=cfg.sft.tool_prior, box_grid=cfg.sft.box_grid, kinds=tuple(cfg.data.kinds))


def crop_spec(cfg) -> CropSpec:
    return CropSpec(image_height=cfg.data.image_size, image_width=cfg.data.image_size,
                    min_pixels=cfg.rollout.crop_min_pixels, max_pixels=cfg.rollout.crop_max_pixels)


def sft_shapes(cfg) -> Shapes:
    patches = max(cfg.data.num_patches, crop_spec(cfg).max_patches)
    return Shapes(seq_len=cfg.sft.seq_len, prompt_patches=patches, crop_patches=crop_spec(cfg).max_patches,
                  max_crops=1)


def model_config(cfg) -> ModelConfig:
    """The architecture (vocabulary and special ids are set from the tokenizer by `for_tokenizer`)."""
    m = cfg.model
    return ModelConfig(
        text=TextConfig(hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
                        num_key_value_heads=m.num_key_value_heads, mrope_section=tuple(m.mrope_section)),
        vision=VisionConfig(depth=m.vision_depth, hidden_size=m.vision_hidden_size,
                            intermediate_size=2 * m.vision_hidden_size, num_heads=m.vision_heads,
                            out_hidden_size=m.hidden_size, fullatt_block_indexes=(m.vision_depth - 1,)),
        dtype=jnp.dtype(cfg.compute_dtype), remat=cfg.remat, axis_rules=tuple(cfg.axis_rules))


def reward_config(cfg) -> RewardConfig:
    return RewardConfig(acc_weight=cfg.reward.acc_weight, format_weight=cfg.reward.format_weight,
                        tool_weight=cfg.reward.tool_weight)


def train_config(cfg, *, temperature: float | None = None) -> TrainConfig:
    """The fused step's config; `temperature=0` gives the greedy evaluation rollout."""
    r = cfg.rollout
    t = r.temperature if temperature is None else temperature
    return TrainConfig(
        rollout=RolloutConfig(max_total_len=r.max_total_len, crop=crop_spec(cfg), max_turns=r.max_turns,
                              max_turn_tokens=r.max_turn_tokens, temperature=t),
        grpo=GRPOConfig(group_size=cfg.grpo.group_size, clip_ratio_low=cfg.grpo.clip_ratio_low,
                        clip_ratio_high=cfg.grpo.clip_ratio_high, kl_coef=cfg.grpo.kl_coef,
                        entropy_coef=cfg.grpo.entropy_coef, loss_agg_mode=cfg.grpo.loss_agg_mode,
                        temperature=r.temperature),
        reward=reward_config(cfg), logprob_chunk=cfg.logprob_chunk, mini_batches=cfg.mini_batches,
        micro_batches=cfg.micro_batches)


def record(ex: dict) -> dict:
    """A V*-mini example as a prompt-stream record (the ground-truth box under "box")."""
    return dict(ex, box=ex["target_box"])


def prompt_stream(cfg, tokenizer, source, *, prompts: int, group_size: int, state=None) -> PromptStream:
    d = cfg.data
    return PromptStream(lambda i: record(source[i % len(source)]), tokenizer=tokenizer, prompts=prompts,
                        group_size=group_size, prompt_len=d.prompt_len, num_patches=d.num_patches,
                        image_hw=(d.image_size, d.image_size), max_pixels=d.scene_max_pixels,
                        reward=reward_config(cfg), state=state, system_prompt=system_prompt(cfg))


def eval_batches(cfg, tokenizer, source, n: int, put) -> list:
    """The first n test examples as (TrainBatch on device, boxes, hard, meta) batches of cfg.eval.batch."""
    b = cfg.eval.batch
    if n % b:
        raise ValueError(f"eval examples {n} must be a multiple of eval.batch {b}")
    stream = prompt_stream(cfg, tokenizer, source, prompts=b, group_size=1)
    out = []
    for _ in range(n // b):
        batch, rows = stream.next_batch()
        out.append((put(batch), np.array([r["box"] for r in rows], np.float32), np.array([r["hard"] for r in rows]),
                    [dict(kind=r["kind"], index=int(r["index"])) for r in rows]))
    return out


def eval_prefix(cfg, batches: list) -> list:
    """The during-training evaluation set: the first eval.examples of the final evaluation's batches."""
    if cfg.eval.examples > cfg.eval.final_examples or cfg.eval.examples % cfg.eval.batch:
        raise ValueError(f"eval.examples {cfg.eval.examples} must be a multiple of eval.batch {cfg.eval.batch} "
                         f"and at most eval.final_examples {cfg.eval.final_examples}")
    return batches[:cfg.eval.examples // cfg.eval.batch]


def make_evaluator(model, cfg, templates, table):
    """-> run(params, batch, rng) -> (trajectories, score): the greedy rollout-and-reward program."""
    jitted = jax.jit(functools.partial(rollout_and_score, nnx.graphdef(model), train_config(cfg, temperature=0.0),
                                       templates))
    return lambda params, batch, rng: jitted(params, batch, rng, table)


TABLE_ROWS = (("hard/accuracy", "accuracy, hard questions"), ("easy/accuracy", "accuracy, easy questions"),
              ("hard/tool_call_rate", "tool-call rate, hard"), ("easy/tool_call_rate", "tool-call rate, easy"),
              ("hard/zooms_per_trajectory", "zoom calls / trajectory, hard"),
              ("easy/zooms_per_trajectory", "zoom calls / trajectory, easy"),
              ("hard/grounding_iou", "grounding IoU of zoom boxes, hard"),
              ("hard/response_length", "response length (tokens), hard"),
              ("easy/response_length", "response length (tokens), easy"))


def table(before: dict, after: dict) -> str:
    """Markdown before/after table of held-out numbers."""
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
    lines = ["| held-out V*-mini | before RL | after RL |", "|---|---|---|"]
    lines += [f"| {label} | {fmt(before.get(k))} | {fmt(after.get(k))} |" for k, label in TABLE_ROWS]
    return "\n".join(lines)


def render_examples(outputs, records, source, tokenizer, directory: str, count: int) -> list[str]:
    """Save `count` evaluated trajectories as PNGs (hard ones with zooms first, then others)."""
    os.makedirs(directory, exist_ok=True)
    flat = [(traj, score, i) for traj, score in outputs for i in range(len(traj.num_turns))]
    order = sorted(range(len(flat)), key=lambda k: (not records[k]["hard"], records[k]["zooms_per_trajectory"] == 0, k))
    paths = []
    for k in order[:count]:
        traj, score, i = flat[k]
        ex = source[records[k]["index"]]
        image = render.render_trajectory(ex["image"], ex["question"], ev.turns_of(traj, i, tokenizer),
                                         gt_box=ex["target_box"], answer=ex["answer"],
                                         correct=bool(score["acc"][i] > 0.5))
        paths.append(os.path.join(directory, f"example_{len(paths)}_{records[k]['kind']}.png"))
        image.save(paths[-1])
    return paths


def save_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=float)
