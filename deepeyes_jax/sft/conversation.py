"""Chat conversations with images -> fixed-shape `Trajectories`, the layout the GRPO update reads.

A conversation is a list of segments, each tokenized on its own exactly as the rollout tokenizes
it (the prompt as one string, each assistant turn as one string, observation templates as their
own token ids), so a supervised example and a sampled trajectory of the same text are the same
token sequence:

  Text(str)       context, not trained
  Ids(tuple)      context given as token ids (e.g. the rollout's observation templates)
  Reply(str)      an assistant turn: its tokens and <|im_end|> are trained
  Image(uint8[H, W, 3], min_pixels, max_pixels)  an image block <|vision_start|> pads <|vision_end|>

The first image of a row goes to `prompt_pixel_values`, later ones to the crop slots, so one
teacher-forced pass (`rl.trajectory_forward.trajectory_hidden`) serves supervised training,
option scoring and the RL update alike.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from deepeyes_jax.data import image_processing as ip
from deepeyes_jax.rollout.sampler import Trajectories


class Text(NamedTuple):
    text: str


class Ids(NamedTuple):
    ids: tuple


class Reply(NamedTuple):
    text: str


class Image(NamedTuple):
    image: np.ndarray
    min_pixels: int
    max_pixels: int


class Shapes(NamedTuple):
    """Static sizes: tokens per row, patches of the first image, patches of each later image, later images."""
    seq_len: int
    prompt_patches: int
    crop_patches: int
    max_crops: int


def pack(tokenizer, conversations, shapes: Shapes) -> Trajectories:
    """list of conversations (segment lists) -> numpy Trajectories [B, seq_len], right padded.

    position_ids are left zero: `with_positions` fills them on device. Raises ValueError naming the
    row whose tokens or images do not fit `shapes`.
    """
    b, (s, np_, nc, k) = len(conversations), shapes
    tokens = np.zeros((b, s), np.int32)
    valid = np.zeros((b, s), bool)
    trained = np.zeros((b, s), bool)
    prompt_pv = np.zeros((b, np_, ip.PATCH_DIM), np.float32)
    prompt_grid = np.zeros((b, 3), np.int32)
    crop_frames = np.zeros((b, k, nc, ip.PATCH_VALUES), np.uint8)
    crop_grid = np.zeros((b, k, 3), np.int32)
    num_crops = np.zeros((b,), np.int32)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    for i, conv in enumerate(conversations):
        ids, mask, images = [], [], 0
        for seg in conv:
            if isinstance(seg, Text):
                piece, learn = encode(seg.text), False
            elif isinstance(seg, Ids):
                piece, learn = list(seg.ids), False
            elif isinstance(seg, Reply):
                piece, learn = encode(seg.text) + [im_end], True
            elif isinstance(seg, Image):
                frames, grid = ip.preprocess_frames(seg.image, min_pixels=seg.min_pixels, max_pixels=seg.max_pixels)
                limit = np_ if images == 0 else nc
                if images > k:
                    raise ValueError(f"row {i}: more than {k + 1} images")
                if len(frames) > limit:
                    raise ValueError(f"row {i}: image {images} needs {len(frames)} patches, the slot holds {limit}")
                if images == 0:
                    prompt_pv[i, :len(frames)], prompt_grid[i] = ip.pixel_values_from_frames(frames), grid
                else:
                    crop_frames[i, images - 1, :len(frames)], crop_grid[i, images - 1] = frames, grid
                images += 1
                piece = (encode("<|vision_start|>") + encode("<|image_pad|>") * ip.num_image_tokens(grid)
                         + encode("<|vision_end|>"))
                learn = False
            else:
                raise TypeError(f"row {i}: unknown segment {type(seg).__name__}")
            ids += piece
            mask += [learn] * len(piece)
        if len(ids) > s:
            raise ValueError(f"row {i}: {len(ids)} tokens, seq_len is {s}")
        if images == 0:
            raise ValueError(f"row {i}: a conversation needs at least one image")
        tokens[i, :len(ids)], valid[i, :len(ids)], trained[i, :len(ids)] = ids, True, mask
        num_crops[i] = images - 1
    zeros = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
    return Trajectories(
        tokens=tokens, attention_mask=valid, loss_mask=trained, logprobs=np.zeros((b, s), np.float32),
        position_ids=zeros(3, b, s), prompt_pixel_values=prompt_pv, prompt_grid_thw=prompt_grid,
        crop_frames=crop_frames, crop_grid_thw=crop_grid, num_crops=num_crops,
        turn_status=zeros(b, 1), turn_error=zeros(b, 1), turn_bbox=np.zeros((b, 1, 4), np.float32),
        num_turns=zeros(b), num_zooms=num_crops.copy(), response_length=trained.sum(1).astype(np.int32),
        end_reason=zeros(b), length=valid.sum(1).astype(np.int32))


def concat(rows: list[Trajectories]) -> Trajectories:
    """Packed batches -> one batch with their rows in order (position_ids keep rows on axis 1)."""
    return Trajectories(*(np.concatenate(parts, axis=1 if name == "position_ids" else 0)
                          for name, parts in zip(Trajectories._fields, zip(*rows))))


def with_positions(model, traj: Trajectories) -> Trajectories:
    """Fill M-RoPE positions on device (jittable): every row's images in order, unused slots empty."""
    used = jnp.arange(traj.crop_grid_thw.shape[1])[None, :] < traj.num_crops[:, None]
    crops = jnp.where(used[..., None], traj.crop_grid_thw, 0)
    grid = jnp.concatenate([traj.prompt_grid_thw[:, None], crops], axis=1).reshape(-1, 3)
    pos, _ = model.position_ids(traj.tokens, traj.attention_mask, grid)
    return traj._replace(position_ids=pos)
