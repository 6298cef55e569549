"""Teacher-forced pass over finished trajectories, on device: what the GRPO update differentiates.

Each row's images (its prompt image, then the crops it really received, in order) are packed back to back
into one patch buffer and encoded by one call of the vision tower (per-image windows and full attention, as
transformers encodes several images); the k-th image token of the row takes the k-th feature. The buffer
holds `merge_unit * S` patches at most (a row's image tokens fit in its S slots), so the vision work
follows the trajectory's length, not the number of crop slots times the largest crop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepeyes_jax.models.qwen2_5_vl.model import merge_image_features
from deepeyes_jax.rl import grpo
from deepeyes_jax.rollout.sampler import Trajectories
from deepeyes_jax.rollout.zoom import pixel_values_from_frames


def packed_patches(traj: Trajectories, merge_unit: int) -> tuple[jax.Array, jax.Array]:
    """-> (pixel_values float[B, P, 1176], grids int32[B, 1 + K, 3]): each row's prompt image and used crops,
    back to back (unused crop slots get grid 0). P = min(N0 + K * Pc, merge_unit * S); the patches past a
    row's images hold finite values from its buffers, never read."""
    b, k, pc = traj.crop_frames.shape[:3]
    n0 = traj.prompt_pixel_values.shape[1]
    size = min(n0 + k * pc, merge_unit * traj.tokens.shape[1])
    used = jnp.arange(k)[None, :] < traj.num_crops[:, None]
    grids = jnp.concatenate([traj.prompt_grid_thw[:, None], jnp.where(used[..., None], traj.crop_grid_thw, 0)],
                            axis=1).astype(jnp.int32)  # [B, 1 + K, 3]
    counts = jnp.prod(grids, axis=-1)
    ends = jnp.cumsum(counts, axis=1)

    def row(prompt, frames, ends, counts):
        j = jnp.arange(size)
        image = jnp.clip(jnp.searchsorted(ends, j, side="right"), 0, k)
        local = j - (ends - counts)[image]
        first = jnp.take(prompt, jnp.clip(local, 0, n0 - 1), axis=0)
        crop = jnp.take(frames.reshape(k * pc, -1), jnp.clip((image - 1) * pc + local, 0, k * pc - 1), axis=0)
        return jnp.where((image == 0)[:, None], first, pixel_values_from_frames(crop).astype(first.dtype))

    return jax.vmap(row)(traj.prompt_pixel_values, traj.crop_frames, ends, counts), grids


def trajectory_embeddings(model, traj: Trajectories) -> jax.Array:
    """Input embeddings float[B, S, D] of the final trajectories with every image merged in."""
    pixel_values, grids = packed_patches(traj, model.config.vision.merge_unit)
    features = model.encode_rows(pixel_values, grids)  # [B, P / 4, D]
    embeds = model.model.embed_tokens(traj.tokens)
    merge = lambda e, ids, f: merge_image_features(e[None], ids[None], f, model.config.image_token_id)[0]  # noqa: E731
    return jax.vmap(merge)(embeds, traj.tokens, features)


def trajectory_hidden(model, traj: Trajectories) -> jax.Array:
    """Final hidden states float[B, S, D]; position t predicts token t + 1."""
    return model.hidden_states(trajectory_embeddings(model, traj), traj.attention_mask, traj.position_ids)


def trajectory_logprobs(model, traj: Trajectories, *, chunk: int, temperature: float = 1.0):
    """(logp, entropy) float32[B, S - 1] of tokens 1..S-1 under the model (chunked, no [B, S, V] logits)."""
    return grpo.token_logprobs_and_entropy(trajectory_hidden(model, traj)[:, :-1], grpo.lm_head_matrix(model),
                                           traj.tokens[:, 1:], chunk=chunk, temperature=temperature)
