"""V*-mini: GRPO with the zoom tool on procedural V*-style scenes, from a tiny supervised base model.

  python -m launch.train                                   # this config, workdir runs/vstar_mini
  python -m launch.train --config=configs/vstar_mini.py --workdir=runs/x --config.reward.tool_weight=0
  python -m launch.eval --config=configs/vstar_mini.py --checkpoint=runs/vstar_mini/export [--config.vstar_mini.test_seed=7]

The scene is shown under `data.max_pixels` (448 px -> 112 px: a small target is ~7 px, below one 14 px
patch), a zoomed crop under `rollout.crop.*_pixels` (a 56-112 px box on the `vstar_mini.sft.box_grid`
-> 112 px: the target spans 2-4 patches). `arg` "smoke" shrinks everything for a quick plumbing run
(tests use it). Every section is the dataclass it configures (`train.config_lib`).
"""

import ml_collections

from deepeyes_jax.eval.evaluator import EvalConfig
from deepeyes_jax.rl.grpo import GRPOConfig
from deepeyes_jax.rl.judge import JudgeConfig
from deepeyes_jax.rl.rewards import RewardConfig
from deepeyes_jax.rl.train_step import ActorConfig, OptimConfig
from deepeyes_jax.rollout.config import RolloutConfig
from deepeyes_jax.rollout.zoom import CropSpec
from deepeyes_jax.train.checkpoints import CheckpointConfig
from deepeyes_jax.train.config_lib import section
from deepeyes_jax.train.input_pipeline import DataConfig
from deepeyes_jax.train.model_spec import ModelSpec
from deepeyes_jax.vstar_mini.experiment import BaseModelConfig, SFTConfig, VStarMiniConfig
from deepeyes_jax.vstar_mini.world import WorldConfig


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "vstar_mini"
    c.seed = 0
    c.steps = 60  # GRPO steps
    c.prompts = 4  # prompts per step (x grpo.group_size rows)
    c.mesh = (-1, 1, 1)  # (data, fsdp, tensor)
    c.export_hf = True

    c.model = section(ModelSpec())  # empty checkpoint: the V*-mini base model (vstar_mini.base_model_dir)
    c.vstar_mini = section(VStarMiniConfig(
        # The question kinds asked (see vstar_mini/world.py); colour ones are what a model this small learns
        # to see within the supervised budget (shapes and letters stay at chance after 250 steps).
        world=WorldConfig(size=448, hard_fraction=0.75, kinds=("letter_colour", "large_colour"), letter_stroke=0.25)))
    c.data = section(DataConfig(seed=0, prompt_len=192, num_patches=64, max_pixels=112 * 112, answer_bytes=64))
    c.rollout = section(RolloutConfig(
        max_total_len=576, max_turns=3, max_turn_tokens=80, temperature=1.0,
        crop=CropSpec(image_height=448, image_width=448, min_pixels=112 * 112, max_pixels=112 * 112)))
    c.grpo = section(GRPOConfig(group_size=8, clip_ratio_low=0.2, clip_ratio_high=0.28))
    c.reward = section(RewardConfig(acc_weight=0.8, format_weight=0.2, tool_weight=1.2))
    c.actor = section(ActorConfig(logprob_chunk=256))
    c.optim = section(OptimConfig(learning_rate=1e-4, warmup_steps=5, weight_decay=0.0, max_grad_norm=1.0))
    c.judge = section(JudgeConfig())  # base_url set: the LLM judge decides accuracy (rollout -> judge -> update)
    c.eval = section(EvalConfig(every=20, batch=64, examples=128, final_examples=256))
    c.checkpoint = section(CheckpointConfig(save_every=20, keep=2))

    if arg == "smoke":
        c.steps, c.prompts = 2, 2
        c.vstar_mini.update(num_train=32, num_test=16, probe_examples=4, render=2)
        c.vstar_mini.base_model.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, mrope_section=(2, 3, 3), vision_depth=2,
                                       vision_hidden_size=32, vision_heads=2)
        c.vstar_mini.sft.update(steps=4, batch=8)
        c.grpo.group_size = 4
        c.eval.update(every=1, examples=8, final_examples=8, batch=8)
        c.checkpoint.save_every = 1
    elif arg:
        raise ValueError(f"unknown config argument {arg!r} (known: smoke)")
    return c
