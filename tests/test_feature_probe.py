"""Linear read-outs of image tokens: a position tint in the world makes token positions readable; the
read-out of small objects is scored against the majority class."""

import numpy as np
import pytest
from flax import nnx

from deepeyes_jax.testing.factory import tiny_model
from deepeyes_jax.vstar_mini import world as vstar_mini
from deepeyes_jax.vstar_mini.base_model import fan_in_init
from deepeyes_jax.vstar_mini.feature_probe import linear_readout

HOST = dict(put=lambda t: t, fetch=np.asarray)


@pytest.fixture(scope="module")
def model():
    m = tiny_model(width=64, layers=1, vision_width=64, vocab_size=64)
    graphdef, state = nnx.split(m)
    return nnx.merge(graphdef, fan_in_init(state, 0))


def _scenes(tint):
    world = vstar_mini.WorldConfig(position_tint=tint)
    return [vstar_mini.make_scene(i, seed=2, split="train", config=world) for i in range(60)]


def test_tint_makes_token_positions_linearly_readable(model):
    tinted = linear_readout(model, _scenes(80), 112 * 112, **HOST)
    plain = linear_readout(model, _scenes(0), 112 * 112, **HOST)
    assert tinted["position_r2"] > 0.6 and plain["position_r2"] < 0.3, (tinted, plain)
    for out in (tinted, plain):
        assert 0.5 <= out["small_object_majority"] <= 1 and 0 <= out["small_object_accuracy"] <= 1


def test_needs_three_scenes_of_one_size(model):
    with pytest.raises(ValueError, match="at least 3 scenes"):
        linear_readout(model, _scenes(0)[:2], 112 * 112, **HOST)
    scenes = _scenes(0)[:4]
    scenes[3] = dict(scenes[3], image=scenes[3]["image"][:, :224])  # a 448 x 224 image: another token grid
    with pytest.raises(ValueError, match="share one size"):
        linear_readout(model, scenes, 112 * 112, **HOST)
