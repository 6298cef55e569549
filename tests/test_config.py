"""ModelConfig from Hugging Face config.json layouts, presets, and clear errors."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import hf_reference as H
from deepeyes_jax.models.qwen2_5_vl import ModelConfig, Qwen2_5_VL, get_preset

# The layout of the released Qwen2.5-VL-7B-Instruct config.json (flat text fields,
# `rope_scaling` of type mrope, `in_chans`), written before transformers 5.
RELEASED_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
    "hidden_size": 3584, "image_token_id": 151655, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 128000, "max_window_layers": 28, "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "video_token_id": 151656, "vision_end_token_id": 151653,
    "vision_start_token_id": 151652, "vision_token_id": 151654, "vocab_size": 152064,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}


def test_released_flat_layout_equals_7b_preset():
    got = ModelConfig.from_hf_dict(RELEASED_7B)
    assert got == get_preset("7b")


def test_nested_transformers5_layout_round_trips():
    d = H.hf_config(mrope=(4, 2, 2), fullatt=(0, 2), tie=True).to_dict()
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.text.mrope_section == (4, 2, 2) and cfg.vision.fullatt_block_indexes == (0, 2)
    assert cfg.tie_word_embeddings and cfg.image_token_id == H.IMAGE and cfg.text.num_key_value_heads == 2
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_eos_id_survives_the_round_trip_and_reaches_transformers():
    cfg = dataclasses.replace(ModelConfig.from_hf_dict(H.hf_config().to_dict()), eos_token_id=7)
    d = cfg.to_hf_dict()
    assert ModelConfig.from_hf_dict(d).eos_token_id == 7
    assert H.transformers.Qwen2_5_VLConfig(**d).text_config.eos_token_id == 7
    assert ModelConfig.from_hf_dict({**RELEASED_7B, "eos_token_id": [9, 151645]}).eos_token_id == 9


def test_runtime_fields_pass_through():
    cfg = ModelConfig.from_hf_dict(RELEASED_7B, param_dtype=jnp.float32, dtype=jnp.bfloat16)
    assert cfg.param_dtype == jnp.float32 and cfg.dtype == jnp.bfloat16


@pytest.mark.parametrize("edit,message", [
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope type 'yarn'"),
    (dict(model_type="qwen2_vl"), "model_type 'qwen2_vl'"),
    (dict(rope_scaling={"type": "mrope", "mrope_section": [16, 24, 20]}), "mrope_section"),
])
def test_unsupported_configs_raise_clearly(edit, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict({**RELEASED_7B, **edit})


def test_vision_out_width_must_match_text():
    with pytest.raises(ValueError, match="out_hidden_size"):
        ModelConfig.from_hf_dict({**RELEASED_7B, "vision_config": {**RELEASED_7B["vision_config"],
                                                                  "out_hidden_size": 1024}})


@pytest.mark.parametrize("name,params_b", [("3b", 3.75), ("7b", 8.29), ("32b", 33.45), ("72b", 73.41)])
def test_preset_parameter_counts(name, params_b):
    """Counted from shapes alone; the published totals (transformers' num_parameters)."""
    abstract = nnx.eval_shape(lambda: Qwen2_5_VL(get_preset(name), rngs=nnx.Rngs(0)))
    n = sum(v.size for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert abs(n / 1e9 - params_b) < 0.01, n


def test_unknown_preset():
    with pytest.raises(KeyError, match="unknown Qwen2.5-VL preset 'huge'"):
        get_preset("huge")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_preset("tiny").tie_word_embeddings = True
