"""Config sections are the dataclasses they configure (one source of truth, unknown keys refused, every
field overridable from the command line), and the 7B recipe config carries DeepEyes' values (spec 4.1, 2.1)."""

import dataclasses

import pytest

from configs import deepeyes_7b, vstar_mini
from deepeyes_jax.eval.evaluator import EvalConfig
from deepeyes_jax.rl.judge import JudgeConfig
from deepeyes_jax.rl.train_step import OptimConfig
from deepeyes_jax.rollout.config import RolloutConfig
from deepeyes_jax.rollout.tools import ToolConfig
from deepeyes_jax.rollout.zoom import CropSpec
from deepeyes_jax.train import trainer
from deepeyes_jax.train.checkpoints import CheckpointConfig
from deepeyes_jax.train.config_lib import build, section
from deepeyes_jax.train.input_pipeline import DataConfig
from deepeyes_jax.train.model_spec import ModelSpec
from deepeyes_jax.vstar_mini.experiment import VStarMiniConfig

SECTIONS = {"model": ModelSpec, "data": DataConfig, "optim": OptimConfig, "judge": JudgeConfig, "eval": EvalConfig,
            "checkpoint": CheckpointConfig}


def test_section_build_round_trip_with_nested_dataclasses():
    rollout = RolloutConfig(max_total_len=64, crop=CropSpec(40, 50, 3136, 12544), tool=ToolConfig(max_depth=5))
    assert build(RolloutConfig, section(rollout)) == rollout
    c = section(rollout)
    c.crop.max_pixels = 6272
    c.tool.max_turn_bytes = 4096  # an optional field left at None takes a value of its type
    got = build(RolloutConfig, c)
    assert got.crop.max_pixels == 6272 and got.tool.max_turn_bytes == 4096 and got.tool.max_depth == 5
    v = build(VStarMiniConfig, section(VStarMiniConfig()))
    assert v == VStarMiniConfig() and isinstance(v.world.kinds, tuple)


def test_unknown_keys_are_refused_naming_them():
    c = section(OptimConfig())
    c.unlock()
    c.learnig_rate = 1.0
    with pytest.raises(ValueError, match=r"optim: unknown key\(s\) \['learnig_rate'\]"):
        build(OptimConfig, c, where="optim")


@pytest.mark.parametrize("module", [deepeyes_7b, vstar_mini])
def test_every_section_builds_its_dataclass(module):
    cfg = module.get_config()
    config = trainer.train_config(cfg)
    assert config.rollout.crop.image_height > 0
    for name, cls in SECTIONS.items():
        assert dataclasses.is_dataclass(build(cls, cfg[name], where=name))
    assert set(cfg) >= set(SECTIONS) | {"rollout", "grpo", "reward", "actor", "experiment", "steps", "prompts"}


def test_recipe_values():
    cfg = deepeyes_7b.get_config()
    c = trainer.train_config(cfg)
    assert (cfg.prompts, c.grpo.group_size, cfg.steps) == (256, 16, 80)
    assert (c.rollout.max_total_len, c.rollout.max_turns, c.rollout.max_turn_tokens) == (28672, 5, 10240)
    assert (c.rollout.temperature, c.rollout.top_p, c.rollout.top_k, c.rollout.bbox_frame) == (1.0, 1.0, -1, "original")
    assert (c.rollout.crop.min_pixels, c.rollout.crop.max_pixels) == (3136, 12845056)
    assert (c.grpo.clip_ratio_low, c.grpo.clip_ratio_high, c.grpo.clip_ratio_c) == (0.2, 0.2, 3.0)
    assert (c.grpo.loss_agg_mode, c.grpo.kl_coef, c.grpo.entropy_coef) == ("token-mean", 0.0, 0.0)
    assert (c.reward.acc_weight, c.reward.format_weight, c.reward.tool_weight) == (0.8, 0.2, 1.2)
    assert c.actor.mini_batches == 1  # ppo_mini_batch_size = the whole batch: one optimizer step per batch
    o = build(OptimConfig, cfg.optim)
    assert (o.learning_rate, o.warmup_steps, o.weight_decay, o.max_grad_norm, o.b1, o.b2) == (
        1e-6, 0, 0.01, 1.0, 0.9, 0.999)
    m, d = build(ModelSpec, cfg.model), build(DataConfig, cfg.data)
    assert (m.param_dtype, m.compute_dtype, m.remat) == ("float32", "bfloat16", True)
    assert (d.prompt_len, d.min_pixels, d.max_pixels, d.seed) == (8192, 3136, 12845056, 1)


def test_optional_fields_are_typed_placeholders():
    """A None default becomes a placeholder of its type: an override of that type is taken (what `--config.x=`
    parses to), another type is refused by ml-collections."""
    cfg = deepeyes_7b.get_config()
    cfg.judge.model = "judge"
    cfg.rollout.tool.max_turn_bytes = 2048
    assert build(JudgeConfig, cfg.judge).model == "judge"
    assert trainer.train_config(cfg).rollout.tool.max_turn_bytes == 2048
    with pytest.raises(TypeError):
        cfg.rollout.tool.max_turn_bytes = "many"
