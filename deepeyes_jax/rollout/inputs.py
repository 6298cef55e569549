"""Host-side assembly of rollout inputs: each row's chat prompt around its image, padded to static shapes."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from deepeyes_jax.data import chat, image_processing


class RolloutBatch(NamedTuple):
    prompt_ids: np.ndarray  # int32[B, P], left padded
    prompt_mask: np.ndarray  # int32[B, P]
    pixel_values: np.ndarray  # float32[B, Np, 1176]: each row's prompt image, zero padded
    image_grid_thw: np.ndarray  # int32[B, 3]
    image: np.ndarray  # uint8[B, Hb, Wb, 3]: the original image, zero padded (what the tool crops)
    image_hw: np.ndarray  # int32[B, 2]: its true (height, width)
    # int32[B, F]: tokens forced as the start of the first assistant turn, -1 = sampled (F = 0: nothing forced).
    # Data selection uses it to hand the model a ground-truth zoom (spec 5.3); training never forces.
    first_turn: np.ndarray
    # bool[B]: the zoom tool is available (DeepEyes: a non-empty env_name); without it a row has one turn and its
    # tool calls are not executed (ThinkLite's reasoning rows).
    tool: np.ndarray


def make_batch(tokenizer, prompts, images, *, prompt_len: int, num_patches: int, image_hw: tuple[int, int],
               min_pixels: int = image_processing.DEFAULT_MIN_PIXELS,
               max_pixels: int = image_processing.DEFAULT_MAX_PIXELS, first_turns=None,
               first_turn_len: int = 0, tools=None) -> RolloutBatch:
    """prompts: list of chat messages with one `<image>` each (`data.chat`; e.g. `chat.deepeyes_prompt(q)`);
    images: list of uint8[H, W, 3]; first_turns: per row, token ids forced as the start of its first turn (or None),
    padded to `first_turn_len`; tools: per row, whether the zoom tool is available (default: all). Raises ValueError naming the row whose prompt, patches, image or forced turn do
    not fit the static shapes."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    b = len(images)
    ids = np.zeros((b, prompt_len), np.int32)
    mask = np.zeros((b, prompt_len), np.int32)
    pixels = np.zeros((b, num_patches, image_processing.PATCH_DIM), np.float32)
    grids = np.zeros((b, 3), np.int32)
    buf = np.zeros((b, *image_hw, 3), np.uint8)
    sizes = np.zeros((b, 2), np.int32)
    forced = np.full((b, first_turn_len), -1, np.int32)
    for i, ids_i in enumerate(first_turns or []):
        if ids_i is not None:
            if len(ids_i) > first_turn_len:
                raise ValueError(f"row {i}: forced first turn has {len(ids_i)} tokens, first_turn_len is "
                                 f"{first_turn_len}")
            forced[i, :len(ids_i)] = ids_i
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        image = np.asarray(image)
        if image.shape[0] > image_hw[0] or image.shape[1] > image_hw[1]:
            raise ValueError(f"row {i}: image {image.shape[:2]} exceeds the image buffer {image_hw}")
        pv, grid = image_processing.preprocess_image(image, min_pixels=min_pixels, max_pixels=max_pixels)
        if len(pv) > num_patches:
            raise ValueError(f"row {i}: image needs {len(pv)} patches, num_patches is {num_patches}")
        row = tokenizer.encode(chat.expand(prompt, image_processing.num_image_tokens(grid)), add_special_tokens=False)
        if len(row) > prompt_len:
            raise ValueError(f"row {i}: prompt has {len(row)} tokens, prompt_len is {prompt_len}")
        ids[i, prompt_len - len(row):], mask[i, prompt_len - len(row):] = row, 1
        pixels[i, :len(pv)], grids[i] = pv, grid
        buf[i, :image.shape[0], :image.shape[1]], sizes[i] = image, image.shape[:2]
    tool = np.ones(b, bool) if tools is None else np.asarray(tools, bool).reshape(b)
    return RolloutBatch(ids, mask, pixels, grids, buf, sizes, forced, tool)
