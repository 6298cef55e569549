"""The Qwen2.5-VL vision tower on a static-shaped patch buffer.

Input is the processor's patch buffer float[N, 1176] (several images concatenated, in
the processor's 2x2-merge-unit order) plus the true grids int[I, 3]; N may exceed the
patches the grids cover, so a crop of any size can be encoded at one static shape. The
layout (which window each patch belongs to, its row/col) is computed on device from the
grids. Patches are reordered window-major as in transformers, which makes every window a
contiguous run of at most `block = (window_size / patch_size)^2` patches; window
attention is then exact and O(N * 3 * block) with a three-block local band, and windows
that the image edge cuts short simply have fewer members. Full attention is the flash
segment attention (per image, O(N) memory in both passes).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepeyes_jax.models.flash_attention import segment_attention
from deepeyes_jax.models.layers import (Dense, GatedMLP, LayerStack, RMSNorm, activation, apply_rope, masked_attention,
                                        remat_call)
from deepeyes_jax.models.qwen2_5_vl.config import VisionConfig
from deepeyes_jax.models.qwen2_5_vl.rope import vision_cos_sin
from deepeyes_jax.sharding import Sharder

_PAD_KEY = jnp.iinfo(jnp.int32).max


class VisionLayout(NamedTuple):
    """Where every patch goes. Patch-level arrays are in window-major order."""

    order: jax.Array  # int32[N/4]: window-major slot -> processor-order merge unit
    rows: jax.Array  # int32[N]: patch row in its image
    cols: jax.Array  # int32[N]
    window_seg: jax.Array  # int32[N]: window id, non-decreasing; padding = int32 max
    frame_seg: jax.Array  # int32[N]: (image, frame) id, non-decreasing; padding = int32 max


def vision_layout(grid_thw: jax.Array, num_patches: int, cfg: VisionConfig) -> VisionLayout:
    m, vws = cfg.spatial_merge_size, cfg.window_units
    if num_patches % cfg.merge_unit:
        raise ValueError(f"pixel_values has {num_patches} patches, not a multiple of {cfg.merge_unit}")
    grid = jnp.asarray(grid_thw, jnp.int32)
    frames, lh, lw = grid[:, 0], grid[:, 1] // m, grid[:, 2] // m
    counts = frames * lh * lw
    ends = jnp.cumsum(counts)
    wins_h, wins_w = -(-lh // vws), -(-lw // vws)
    # Key space per image with every window padded to vws*vws slots: keys of different
    # images, frames and windows never collide, and sorting them gives transformers' order.
    padded = frames * wins_h * wins_w * vws * vws
    base = jnp.cumsum(padded) - padded

    u = jnp.arange(num_patches // cfg.merge_unit, dtype=jnp.int32)
    img = jnp.clip(jnp.searchsorted(ends, u, side="right"), 0, grid.shape[0] - 1)
    valid = u < ends[-1]
    local = u - (ends[img] - counts[img])
    per_frame = lh[img] * lw[img]
    f, r, c = local // per_frame, (local % per_frame) // lw[img], local % lw[img]
    window = (f * wins_h[img] + r // vws) * wins_w[img] + c // vws
    key = base[img] + window * vws * vws + (r % vws) * vws + c % vws
    order = jnp.argsort(jnp.where(valid, key, _PAD_KEY), stable=True)

    def per_patch(x, fill=None):
        x = x[order] if fill is None else jnp.where(valid, x, fill)[order]
        return jnp.repeat(x, cfg.merge_unit)

    sub = jnp.arange(cfg.merge_unit, dtype=jnp.int32)
    rows = (r[order][:, None] * m + (sub // m)[None, :]).reshape(-1)
    cols = (c[order][:, None] * m + (sub % m)[None, :]).reshape(-1)
    return VisionLayout(
        order=order,
        rows=rows,
        cols=cols,
        window_seg=per_patch(base[img] + window, _PAD_KEY),
        frame_seg=per_patch(base[img] + f, _PAD_KEY),
    )


def _blocks(x: jax.Array, block: int, fill) -> jax.Array:
    """[N, ...] -> [ceil(N / block), block, ...], the tail filled with `fill`."""
    nb = -(-x.shape[0] // block)
    x = jnp.pad(x, [(0, nb * block - x.shape[0])] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape(nb, block, *x.shape[1:])


def band_attention(q, k, v, seg, block: int):
    """Attention within equal-`seg` runs no longer than `block`: q/k/v float[N, H, D], seg int32[N]."""
    n, h, d = q.shape

    def band(x, fill):
        edge = jnp.full_like(x[:1], fill)
        prev = jnp.concatenate([edge, x[:-1]], axis=0)
        nxt = jnp.concatenate([x[1:], edge], axis=0)
        return jnp.concatenate([prev, x, nxt], axis=1)

    qb, segb = _blocks(q, block, 0), _blocks(seg, block, -1)
    kb, vb, segk = band(_blocks(k, block, 0), 0), band(_blocks(v, block, 0), 0), band(segb, -1)
    out = masked_attention(qb, kb, vb, segb[:, :, None] == segk[:, None, :])
    return out.reshape(-1, h, d)[:n]


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs, param_dtype, dtype, shard: Sharder):
        d = cfg.hidden_size
        kw = dict(use_bias=True, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.qkv = Dense(d, (3, d), logical_axes=("embed", "qkv", "heads"), **kw)
        self.proj = Dense(d, d, logical_axes=("heads", "embed"), **kw)
        self.num_heads = cfg.num_heads
        self.shard = shard

    def __call__(self, x, cos, sin, attend):
        n, d = x.shape
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, d // self.num_heads)
        qkv = self.shard(qkv, ("activation_patches", None, "activation_heads", None))
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        # transformers applies the vision rope in fp32 whatever the compute dtype.
        q = apply_rope(q.astype(jnp.float32), cos, sin).astype(x.dtype)
        k = apply_rope(k.astype(jnp.float32), cos, sin).astype(x.dtype)
        return self.proj(attend(q, k, v).reshape(n, d))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs, param_dtype, dtype, shard: Sharder):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.norm1 = RMSNorm(cfg.hidden_size, eps=1e-6, **kw)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=1e-6, **kw)
        self.attn = VisionAttention(cfg, shard=shard, **kw)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, use_bias=True,
                            shard=shard, **kw)
        self.shard = shard

    def __call__(self, x, cos, sin, attend):
        x = x + self.attn(self.norm1(x), cos, sin, attend)
        x = x + self.mlp(self.norm2(x), ("activation_patches", "activation_mlp"))
        return self.shard(x, ("activation_patches", "activation_embed"))


class PatchMerger(nnx.Module):
    """RMSNorm, then each 2x2 unit's 4 patch vectors concatenated -> MLP -> LLM width."""

    def __init__(self, cfg: VisionConfig, *, rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        wide = cfg.hidden_size * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6, **kw)
        self.fc1 = Dense(wide, wide, logical_axes=("embed", "mlp"), use_bias=True, **kw)
        self.fc2 = Dense(wide, cfg.out_hidden_size, logical_axes=("mlp", "embed"), use_bias=True, **kw)
        self.wide = wide

    def __call__(self, x):
        x = self.ln_q(x).reshape(-1, self.wide)
        return self.fc2(activation("gelu")(self.fc1(x)))


class VisionTower(nnx.Module):
    FULL_ATTENTION_BLOCK = 256  # patches per query / key block of the full-attention layers

    def __init__(self, cfg: VisionConfig, *, rngs, param_dtype, dtype, shard: Sharder, remat: bool = False,
                 scan: bool = False):
        self.remat, self.scan = remat, scan
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.patch_embed = Dense(cfg.patch_dim, cfg.hidden_size, logical_axes=("patch", "embed"), use_bias=False,
                                 **kw)
        self.blocks = nnx.List([VisionBlock(cfg, shard=shard, **kw) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, **kw)
        self.cfg = cfg
        self.shard = shard

    def __call__(self, pixel_values: jax.Array, grid_thw: jax.Array) -> jax.Array:
        """pixel_values float[N, C*T*P*P], grid_thw int[I, 3] -> float[N/4, out_hidden] (processor order).

        Rows past the patches the grids cover are finite garbage.
        """
        cfg = self.cfg
        n = pixel_values.shape[0]
        lay = vision_layout(grid_thw, n, cfg)
        x = self.patch_embed(pixel_values)
        x = x.reshape(n // cfg.merge_unit, cfg.merge_unit, -1)[lay.order].reshape(n, -1)
        x = self.shard(x, ("activation_patches", "activation_embed"))
        cos, sin = vision_cos_sin(lay.rows, lay.cols, head_dim=cfg.head_dim, theta=cfg.rope_theta)
        block = cfg.window_units**2 * cfg.merge_unit

        def window_attend(q, k, v):
            return band_attention(q, k, v, lay.window_seg, block)

        def full_attend(q, k, v):
            return segment_attention(q, k, v, lay.frame_seg, block=self.FULL_ATTENTION_BLOCK)

        if self.scan:  # one scan per run of blocks with the same attention (7B: 8 runs of 32 blocks)
            for start, stop in _runs([i in cfg.fullatt_block_indexes for i in range(cfg.depth)]):
                attend = full_attend if start in cfg.fullatt_block_indexes else window_attend
                x = LayerStack(self.blocks[start:stop])(x, cos, sin, remat=self.remat, attend=attend)
        else:
            for i, blk in enumerate(self.blocks):
                attend = full_attend if i in cfg.fullatt_block_indexes else window_attend
                x = remat_call(blk, x, cos, sin, attend=attend) if self.remat else blk(x, cos, sin, attend)
        merged = self.merger(x)
        return jnp.zeros_like(merged).at[lay.order].set(merged)


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """[start, stop) of each run of equal flags."""
    edges = [0] + [i for i in range(1, len(flags)) if flags[i] != flags[i - 1]] + [len(flags)]
    return list(zip(edges[:-1], edges[1:]))
