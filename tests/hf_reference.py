"""transformers' PyTorch Qwen2.5-VL as the numerical reference (test-only; needs torch).

Configs are written here with transformers' own keyword names, independently of our
config code, and models go through transformers' save_pretrained -> our from_pretrained,
so every parity test also exercises the real checkpoint path.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

torch.set_num_threads(2)

IMAGE, VIDEO, VSTART, VEND = 500, 501, 498, 499
VOCAB = 512


def hf_config(*, depth=3, fullatt=(1,), window=112, mrope=(2, 3, 3), layers=2, heads=4, kv_heads=2,
              hidden=64, vision_hidden=32, vision_heads=2, tie=False) -> transformers.Qwen2_5_VLConfig:
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
            max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(mrope)},
            tie_word_embeddings=tie,
        ),
        vision_config=dict(
            depth=depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=vision_heads,
            out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            window_size=window, fullatt_block_indexes=list(fullatt),
        ),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        tie_word_embeddings=tie,
    )


def hf_model(config, seed=0) -> transformers.Qwen2_5_VLForConditionalGeneration:
    """A random model whose norms and biases are not at their trivial init (ones/zeros),
    so a transposed bias or a dropped norm weight shows up in the logits."""
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(2.0)
    return model


def image_block(grid) -> list[int]:
    t, h, w = grid
    return [VSTART] + [IMAGE] * (t * h * w // 4) + [VEND]


def make_inputs(rng: np.random.Generator, segments, *, batch_pad=None):
    """segments: per row, a list of ints (text length) and (t, h, w) tuples (images).

    Returns numpy input_ids int64[B, T], attention_mask (left padded), pixel_values, grids.
    """
    rows, grids = [], []
    for row in segments:
        ids = []
        for seg in row:
            if isinstance(seg, int):
                ids += rng.integers(0, 480, size=seg).tolist()
            else:
                ids += image_block(seg)
                grids.append(seg)
        rows.append(ids)
    length = max(len(r) for r in rows) if batch_pad is None else batch_pad
    input_ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    if not grids:
        return input_ids, mask, None, None
    grid = np.asarray(grids, np.int64)
    pixel_values = rng.normal(size=(int(grid.prod(1).sum()), 1176)).astype(np.float32)
    return input_ids, mask, pixel_values, grid


def hf_logits(model, input_ids, mask, pixel_values, grid) -> np.ndarray:
    kw = dict(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
              mm_token_type_ids=torch.from_numpy((input_ids == IMAGE).astype(np.int64)))
    if pixel_values is not None:
        kw.update(pixel_values=torch.from_numpy(pixel_values), image_grid_thw=torch.from_numpy(grid))
    with torch.no_grad():
        return model(**kw).logits.float().numpy()


def to_torch(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x).copy())


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


def save_qwen_sized_checkpoint(directory, seed: int = 0) -> str:
    """A tiny random Qwen2.5-VL in the real checkpoint layout, written by transformers' own save_pretrained,
    with Qwen2.5's vocabulary size and special-token ids and a Qwen-sized tokenizer (`testing.qwen_tokenizer`)."""
    from deepeyes_jax.testing import qwen_tokenizer

    tokenizer = qwen_tokenizer.build()
    ids = tokenizer.convert_tokens_to_ids
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=qwen_tokenizer.VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32768,
            bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(seed)
    transformers.Qwen2_5_VLForConditionalGeneration(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return str(directory)
