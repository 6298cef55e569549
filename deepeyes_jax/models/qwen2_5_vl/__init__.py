"""Qwen2.5-VL in Flax NNX.

    model = from_pretrained("/path/to/Qwen2.5-VL-7B-Instruct", dtype=jnp.float32, mesh=mesh)
    logits = model(input_ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)
    save_pretrained(model, "/path/to/out")  # loadable by transformers / vLLM
"""

from deepeyes_jax.models.qwen2_5_vl.checkpoint import CheckpointError, from_pretrained, save_pretrained
from deepeyes_jax.models.qwen2_5_vl.config import ModelConfig, TextConfig, VisionConfig
from deepeyes_jax.models.qwen2_5_vl.model import Qwen2_5_VL, merge_image_features
from deepeyes_jax.models.qwen2_5_vl.presets import PRESETS, get_preset
from deepeyes_jax.models.qwen2_5_vl.rope import mrope_position_ids

__all__ = [
    "CheckpointError", "ModelConfig", "PRESETS", "Qwen2_5_VL", "TextConfig", "VisionConfig",
    "from_pretrained", "get_preset", "merge_image_features", "mrope_position_ids", "save_pretrained",
]
