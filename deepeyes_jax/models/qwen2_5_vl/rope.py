"""Rotary embeddings of Qwen2.5-VL and its 3-D (M-RoPE) position ids, all jittable.

`mrope_position_ids` is transformers' `get_rope_index` without its host loop over
tokens: one pass of cumulative sums, so the rollout can call it inside its compiled loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _inv_freq(dim: int, theta: float) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))


def mrope_position_ids(
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    image_grid_thw: jax.Array | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
) -> tuple[jax.Array, jax.Array]:
    """3-D positions of a batch: (position_ids int32[3, B, T], deltas int32[B, 1]).

    Text tokens get (i, i, i); the tokens of an image starting at position s get
    (s + frame, s + row, s + col) and the text after it resumes at s + max(rows, cols).
    Images are the runs of `image_token_id`, matched in order (row-major over the batch)
    to `image_grid_thw` int[I, 3] (patch grid, before merging). Padding gets 0, as in
    transformers 5 (verl's copy used 1; padding positions never reach a valid token).
    deltas = max position + 1 - number of valid tokens (for decoding).
    """
    b, t = input_ids.shape
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    text_pos = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
    if image_grid_thw is None or image_grid_thw.shape[0] == 0:
        pos = jnp.broadcast_to(text_pos, (3, b, t))
    else:
        grid = jnp.asarray(image_grid_thw, jnp.int32)
        rows, cols = grid[:, 1] // spatial_merge_size, grid[:, 2] // spatial_merge_size
        tokens = grid[:, 0] * rows * cols
        ends = jnp.cumsum(tokens)
        is_img = (input_ids == image_token_id) & valid
        # Global index of each image token across the batch, then its image and offset in it.
        count = jnp.cumsum(is_img.reshape(-1), dtype=jnp.int32).reshape(b, t) - 1
        img = jnp.clip(jnp.searchsorted(ends, count, side="right"), 0, grid.shape[0] - 1)
        j = count - (ends[img] - tokens[img])
        r, c = rows[img], cols[img]
        span = jnp.maximum(r, c)
        first = is_img & (j == 0)
        advance = jnp.where(is_img, jnp.where(first, span, 0), valid.astype(jnp.int32))
        before = jnp.cumsum(advance, axis=1, dtype=jnp.int32) - advance
        start = jnp.where(first | ~is_img, before, before - span)
        frame, row, col = j // (r * c), (j // c) % r, j % c
        pos = jnp.stack([
            jnp.where(is_img, start + frame, before),
            jnp.where(is_img, start + row, before),
            jnp.where(is_img, start + col, before),
        ])
    pos = jnp.where(valid[None], pos, 0).astype(jnp.int32)
    top = jnp.max(jnp.where(valid[None], pos, -1), axis=(0, 2))
    deltas = (top + 1 - jnp.sum(valid, axis=1, dtype=jnp.int32))[:, None]
    return pos, deltas


def mrope_cos_sin(position_ids: jax.Array, *, head_dim: int, theta: float, mrope_section, dtype):
    """position_ids int[3, B, T] -> cos, sin float[B, T, head_dim].

    Frequency f uses the temporal, height or width position according to which
    `mrope_section` chunk it falls in; the half is then duplicated (rotate-half layout).
    """
    inv = _inv_freq(head_dim, theta)
    component = np.repeat(np.arange(3), mrope_section)  # [head_dim/2]
    pos = jnp.take(position_ids.astype(jnp.float32), jnp.asarray(component), axis=0)  # [hd/2, B, T]
    freqs = jnp.moveaxis(pos, 0, -1) * inv.reshape(1, 1, -1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def vision_cos_sin(rows: jax.Array, cols: jax.Array, *, head_dim: int, theta: float):
    """2-D axial rope of the vision tower: rows/cols int[N] -> cos, sin float32[N, head_dim]."""
    inv = _inv_freq(head_dim // 2, theta)
    inv = inv[None, :]
    freqs = jnp.concatenate([rows[:, None] * inv, cols[:, None] * inv], axis=-1).astype(jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)
