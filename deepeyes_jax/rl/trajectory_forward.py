"""Teacher-forced pass over finished trajectories, on device: what the GRPO update differentiates.

Each row's images (its prompt image, then its crops in order) are encoded at their static buffer
sizes and matched to the row's image tokens in order, so the whole batch runs as one program
with the positions the rollout recorded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepeyes_jax.rl import grpo
from deepeyes_jax.rollout.sampler import Trajectories
from deepeyes_jax.rollout.zoom import pixel_values_from_frames


def _encode(model, pixel_values, grid):
    # Unused crop slots carry grid 0: give them a minimal valid grid (their features are never read).
    grid = jnp.where(jnp.all(grid == 0), jnp.array([1, 2, 2], grid.dtype), grid)
    return model.encode_images(pixel_values, grid[None])


def trajectory_embeddings(model, traj: Trajectories) -> jax.Array:
    """Input embeddings float[B, S, D] of the final trajectories with every image merged in."""
    b, k = traj.crop_grid_thw.shape[:2]
    first = jax.vmap(lambda pv, g: _encode(model, pv, g))(traj.prompt_pixel_values, traj.prompt_grid_thw)
    crops = jax.vmap(jax.vmap(lambda f, g: _encode(model, pixel_values_from_frames(f), g)))(traj.crop_frames,
                                                                                          traj.crop_grid_thw)
    table = jnp.concatenate([first, crops.reshape(b, -1, crops.shape[-1])], axis=1)  # [B, U0 + K * Uc, D]
    unit = model.config.vision.merge_unit
    grids = jnp.concatenate([traj.prompt_grid_thw[:, None], traj.crop_grid_thw], axis=1)  # [B, 1 + K, 3]
    used = jnp.arange(k + 1)[None, :] <= traj.num_crops[:, None]
    counts = jnp.where(used, jnp.prod(grids, axis=-1) // unit, 0)  # image tokens per image
    ends = jnp.cumsum(counts, axis=1)
    offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), first.shape[1] + crops.shape[2] * jnp.arange(k)])
    is_img = traj.tokens == model.config.image_token_id
    count = jnp.cumsum(is_img, axis=1, dtype=jnp.int32) - 1
    image = jax.vmap(lambda e, c: jnp.searchsorted(e, c, side="right"))(ends, count)
    image = jnp.clip(image, 0, k)
    start = jnp.take_along_axis(ends - counts, image, axis=1)
    row = jnp.clip(offsets[image] + count - start, 0, table.shape[1] - 1)
    features = jnp.take_along_axis(table, row[..., None], axis=1)
    embeds = model.model.embed_tokens(traj.tokens)
    return jnp.where(is_img[..., None], features.astype(embeds.dtype), embeds)


def trajectory_hidden(model, traj: Trajectories) -> jax.Array:
    """Final hidden states float[B, S, D]; position t predicts token t + 1."""
    return model.hidden_states(trajectory_embeddings(model, traj), traj.attention_mask, traj.position_ids)


def trajectory_logprobs(model, traj: Trajectories, *, chunk: int, temperature: float = 1.0):
    """(logp, entropy) float32[B, S - 1] of tokens 1..S-1 under the model (chunked, no [B, S, V] logits)."""
    return grpo.token_logprobs_and_entropy(trajectory_hidden(model, traj)[:, :-1], grpo.lm_head_matrix(model),
                                           traj.tokens[:, 1:], chunk=chunk, temperature=temperature)
