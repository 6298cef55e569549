"""The one factory of tiny Qwen2.5-VL models for tests and benchmarks.

    config = tiny_config(tokenizer)              # vocabulary and special ids from the tokenizer
    model = tiny_model(tokenizer, width=128)     # random weights, optionally on a mesh

Every mechanism of the real architecture is present (GQA with 4 query / 2 KV heads, M-RoPE, a vision tower
whose last block uses full attention, real 112 px windows); only the widths and depths are small.
"""

from __future__ import annotations

from flax import nnx

from deepeyes_jax.models.qwen2_5_vl import ModelConfig, Qwen2_5_VL, TextConfig, VisionConfig
from deepeyes_jax.models.qwen2_5_vl.presets import for_tokenizer


def tiny_config(tokenizer=None, *, width: int = 64, layers: int = 2, vision_width: int = 32, vision_depth: int = 2,
                vocab_size: int = 512, **runtime) -> ModelConfig:
    """width: text hidden size (4 heads, 2 KV heads, MLP 2x); vision_width: vision hidden size (2 heads).
    With a tokenizer the vocabulary and special ids are its own (`presets.for_tokenizer`)."""
    head = width // 4
    config = ModelConfig(
        text=TextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        mrope_section=(head // 8, 3 * head // 16, 3 * head // 16)),
        vision=VisionConfig(depth=vision_depth, hidden_size=vision_width, intermediate_size=2 * vision_width,
                            num_heads=2, out_hidden_size=width, fullatt_block_indexes=(vision_depth - 1,)),
        **runtime)
    return config if tokenizer is None else for_tokenizer(config, tokenizer)


def tiny_model(tokenizer=None, *, seed: int = 0, mesh=None, **kw) -> Qwen2_5_VL:
    return Qwen2_5_VL(tiny_config(tokenizer, **kw), rngs=nnx.Rngs(seed), mesh=mesh)
