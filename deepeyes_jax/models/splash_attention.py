"""The decoder's training attention through JAX's Pallas splash attention kernel (TPU), chosen by
`ModelConfig.attention_impl = "splash"`; `flash_attention.causal_attention` is the portable path it replaces.

    out = causal_attention(q, k, v, valid, block=512, shard=shard)  # q float[B, T, H, D], k/v float[B, T, KV, D]

Same contract on the valid query rows: slot i sees the valid slots j <= i (a causal mask plus segment ids: valid
slots are segment 0, padding segment 1, so a padding query sees only padding and no row is ever empty). Rows
of padding get other values than the portable path's; nothing reads them. The kernel is a custom call that
GSPMD cannot partition, so under a mesh it runs in `shard_map`: rows split like `activation_batch`, heads like
`activation_heads` where both the query and the KV heads divide (each device keeps whole GQA groups). Off TPU
(tests on the CPU mesh) the same kernel runs in Pallas' interpret mode."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from deepeyes_jax.flops import grid_share
from deepeyes_jax.sharding import Sharder

LANES = 128  # the kernel's blocks are multiples of the TPU lane width


@functools.lru_cache(maxsize=None)
def _kernel(heads: int, length: int, block: int, interpret: bool):
    """The splash kernel for one row: q float[heads, length, D], k/v float[kv_heads, length, D] (GQA)."""
    mask = sm.MultiHeadMask([sm.CausalMask((length, length))] * heads)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _platform(shard: Sharder) -> str:
    return shard.mesh.devices.flat[0].platform if shard.mesh is not None else jax.default_backend()


def causal_attention(q, k, v, valid, *, block: int, shard: Sharder) -> jax.Array:
    """See the module docstring; -> float[B, T, H, D] in q's dtype. block: query / key block, rounded up to a
    multiple of 128 (T is padded to a multiple of it)."""
    t, d = q.shape[1], q.shape[3]
    block = min(-(-block // LANES), -(-t // LANES)) * LANES
    pad = -t % block
    interpret = _platform(shard) != "tpu"

    def heads_first(x):  # [B, T, N, D] -> [B, N, T + pad, D]
        return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))

    seg = jnp.pad(jnp.where(valid, 0, 1).astype(jnp.int32), ((0, 0), (0, pad)), constant_values=1)
    args = (heads_first(q * jnp.asarray(d**-0.5, q.dtype)), heads_first(k), heads_first(v), seg)

    def rows(q, k, v, seg):
        kernel = _kernel(q.shape[1], t + pad, block, interpret)
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(s, s)))(q, k, v, seg)

    blocks = (t + pad) // block
    with grid_share((blocks + 1) / (2 * blocks)):  # the kernel skips the key blocks above the diagonal
        out = rows(*args) if shard.mesh is None else _on_mesh(rows, args, k.shape[2], shard)
    return jnp.swapaxes(out[:, :, :t], 1, 2).astype(q.dtype)


def _on_mesh(rows, args, kv_heads: int, shard: Sharder):
    """rows(q, k, v, seg) in shard_map: rows split like activation_batch, heads like activation_heads."""
    b, h = args[0].shape[:2]
    batch = shard.sharding(("activation_batch",), (b,)).spec[0]
    layout = shard.sharding(("activation_heads",), (h,))
    heads = layout.spec[0]
    if kv_heads % (h // layout.shard_shape((h,))[0]):
        heads = None  # the KV heads do not split like the query heads: whole heads on every device
    spec = P(batch, heads, None, None)
    return jax.shard_map(rows, mesh=shard.mesh, in_specs=(spec, spec, spec, P(batch, None)), out_specs=spec,
                         check_vma=False)(*args)
