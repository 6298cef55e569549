"""Linear read-outs of image tokens: a position tint in the world makes token positions readable; the
read-out of small objects is scored against the majority class."""

import numpy as np
import pytest
from flax import nnx

from deepeyes_jax.data import vstar_mini
from deepeyes_jax.eval.feature_probe import linear_readout
from deepeyes_jax.models.qwen2_5_vl import ModelConfig, Qwen2_5_VL, TextConfig, VisionConfig
from deepeyes_jax.sft.base_model import fan_in_init


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(
        text=TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, mrope_section=(2, 3, 3), vocab_size=64),
        vision=VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64,
                            fullatt_block_indexes=(1,)))
    m = Qwen2_5_VL(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(m)
    return nnx.merge(graphdef, fan_in_init(state, 0))


def _scenes(tint):
    world = vstar_mini.WorldConfig(position_tint=tint)
    return [vstar_mini.make_scene(i, seed=2, split="train", config=world) for i in range(60)]


def test_tint_makes_token_positions_linearly_readable(model):
    tinted = linear_readout(model, _scenes(80), 112 * 112, put=lambda t: t)
    plain = linear_readout(model, _scenes(0), 112 * 112, put=lambda t: t)
    assert tinted["position_r2"] > 0.6 and plain["position_r2"] < 0.3, (tinted, plain)
    for out in (tinted, plain):
        assert 0.5 <= out["small_object_majority"] <= 1 and 0 <= out["small_object_accuracy"] <= 1


def test_needs_three_scenes_of_one_size(model):
    with pytest.raises(ValueError, match="at least 3 scenes"):
        linear_readout(model, _scenes(0)[:2], 112 * 112, put=lambda t: t)
    scenes = _scenes(0)[:4]
    scenes[3] = dict(scenes[3], image=scenes[3]["image"][:, :224])  # a 448 x 224 image: another token grid
    with pytest.raises(ValueError, match="share one size"):
        linear_readout(model, scenes, 112 * 112, put=lambda t: t)
