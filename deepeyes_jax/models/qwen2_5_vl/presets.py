"""Ready configs: the published Qwen2.5-VL sizes, plus small ones for tests and benchmarks.

The published sizes follow the checkpoints' config.json; when loading a real checkpoint
`from_pretrained` reads its own config.json, so these are for planning (AOT compile,
memory estimates) and for building random models of the right shape.
"""

import dataclasses

from deepeyes_jax.models.qwen2_5_vl.config import ModelConfig, TextConfig, VisionConfig

_VISION_3B_7B = VisionConfig(intermediate_size=3420)
_VISION_32B_72B = VisionConfig(intermediate_size=3456)

PRESETS: dict[str, ModelConfig] = {
    "3b": ModelConfig(
        text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                        num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2),
        vision=dataclasses.replace(_VISION_3B_7B, out_hidden_size=2048),
        tie_word_embeddings=True,
    ),
    "7b": ModelConfig(
        text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4),
        vision=_VISION_3B_7B,
    ),
    "32b": ModelConfig(
        text=TextConfig(vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                        num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8),
        vision=dataclasses.replace(_VISION_32B_72B, out_hidden_size=5120),
    ),
    "72b": ModelConfig(
        text=TextConfig(vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
        vision=dataclasses.replace(_VISION_32B_72B, out_hidden_size=8192),
    ),
    # Unit tests: every mechanism present (GQA, several vision blocks with a full-attention
    # one, a real 112 px window) at a size that runs in milliseconds.
    "tiny": ModelConfig(
        text=TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3)),
        vision=VisionConfig(depth=3, hidden_size=32, intermediate_size=64, num_heads=2,
                            out_hidden_size=64, fullatt_block_indexes=(1,)),
        image_token_id=500, video_token_id=501, vision_start_token_id=498, vision_end_token_id=499,
    ),
    # About 100M parameters: the benchmark's "small but not toy" point.
    "100m": ModelConfig(
        text=TextConfig(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=8, num_key_value_heads=2, mrope_section=(8, 12, 12)),
        vision=VisionConfig(depth=8, hidden_size=384, intermediate_size=1536, num_heads=6,
                            out_hidden_size=512, fullatt_block_indexes=(3, 7)),
        image_token_id=31995, video_token_id=31996, vision_start_token_id=31993, vision_end_token_id=31994,
    ),
}


def get_preset(name: str, **runtime) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown Qwen2.5-VL preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**runtime)


def for_tokenizer(config: ModelConfig, tokenizer) -> ModelConfig:
    """`config` with the vocabulary (rounded up to a multiple of 64) and special-token ids of `tokenizer`."""
    ids = tokenizer.convert_tokens_to_ids
    text = dataclasses.replace(config.text, vocab_size=-(-len(tokenizer) // 64) * 64)
    return config.replace(text=text, image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                          vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                          eos_token_id=ids("<|im_end|>"))
