"""Blocked softmax attention with O(L) memory in the forward AND the backward pass (FlashAttention-2).

    out = flash_attention(q, k, v, q_ids, k_ids, ranges, causal=..., block_q=..., block_k=...)

q float[B, Lq, H, D], k/v float[B, Lk, KV, D] (grouped KV heads); q_ids int32[B, Lq, 2] and k_ids int32[B, Lk, 2]
hold each position's (segment, position): a query sees a key iff their segments are equal and, when causal, the
key's position is not after the query's. `ranges` int32[2, Lq / block_q] is the half-open run of key blocks each
query block may see (shared by the batch); blocks outside it are never visited, which is where the causal and
the per-image savings come from (`visits`, the mean run length, is declared for FLOP counting). The forward
keeps only the output and the row log-sum-exp; the backward (a custom VJP) recomputes each score block from
them, so neither pass holds more than one [B, heads, block_q, block_k] block of scores, and nothing is kept per
visited block (a differentiated scan would keep its carry for every step: the 806 GB of one vision layer at 8k
tokens).

Users: `causal_attention` (teacher-forced decoder passes), `cache_attention` (the rollout's prefill and
observation chunks over the KV cache), `segment_attention` (the vision tower's full attention, per image).
Rows that see no key give 0. Scores and statistics are fp32 whatever the input dtype (einsums accumulate in fp32)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from deepeyes_jax.flops import loop_trips
from deepeyes_jax.models.layers import masked_attention

_FLOOR = jnp.finfo(jnp.float32).min  # finite: a row with no key yet never computes inf - inf


def block_ranges_causal(lq: int, lk: int, block_q: int, block_k: int) -> jax.Array:
    """Key-block runs of causal attention by slot index (query i sees keys j <= i): int32[2, nq]."""
    nq = -(-lq // block_q)
    last = jnp.minimum((jnp.arange(nq) + 1) * block_q - 1, lk - 1)
    return jnp.stack([jnp.zeros(nq, jnp.int32), (last // block_k + 1).astype(jnp.int32)])


def block_ranges_segments(seg: jax.Array, block: int) -> jax.Array:
    """Key-block runs for non-decreasing segment ids seg int32[L] (queries and keys alike): int32[2, nb]."""
    sb = _blocks(seg, block, jnp.iinfo(jnp.int32).max, axis=0)
    lo = jnp.searchsorted(sb[:, -1], sb[:, 0], side="left")
    hi = jnp.searchsorted(sb[:, 0], sb[:, -1], side="right")
    return jnp.stack([lo, hi]).astype(jnp.int32)


def _blocks(x: jax.Array, block: int, fill, axis: int = 1) -> jax.Array:
    """Split `axis` of x into [n, block] (the tail padded with `fill`)."""
    n = -(-x.shape[axis] // block)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n * block - x.shape[axis])
    x = jnp.pad(x, pad, constant_values=fill)
    return x.reshape(*x.shape[:axis], n, block, *x.shape[axis + 1:])


def _visible(qi, kj, causal: bool):
    """q ids int32[B, bq, 2], k ids int32[B, bk, 2] -> bool[B, 1, 1, bq, bk]."""
    see = qi[:, :, None, 0] == kj[:, None, :, 0]
    if causal:
        see &= kj[:, None, :, 1] <= qi[:, :, None, 1]
    return see[:, None, None]


def _scores(qi, kj, scale):
    """qi [B, bq, KV, G, D], kj [B, bk, KV, D] -> fp32 [B, KV, G, bq, bk]."""
    return jnp.einsum("bqkgd,btkd->bkgqt", qi, kj, preferred_element_type=jnp.float32) * scale


def _prepare(q, k, v, q_ids, k_ids, block_q, block_k):
    b, lq, h, d = q.shape
    kv = k.shape[2]
    qb = _blocks(q.reshape(b, lq, kv, h // kv, d), block_q, 0)  # [B, nq, bq, KV, G, D]
    kb, vb = _blocks(k, block_k, 0), _blocks(v, block_k, 0)  # [B, nk, bk, KV, D]
    # Padded keys get a segment no query has; padded queries are cut off at the end.
    qib, kib = _blocks(q_ids, block_q, 0), _blocks(k_ids, block_k, jnp.iinfo(jnp.int32).min)
    return qb, kb, vb, qib, kib


def _forward(q, k, v, q_ids, k_ids, ranges, causal, block_q, block_k, visits):
    b, lq, h, d = q.shape
    qb, kb, vb, qib, kib = _prepare(q, k, v, q_ids, k_ids, block_q, block_k)
    kv, g = qb.shape[3], qb.shape[4]
    scale = d**-0.5

    def query_block(i):
        qi, ii = qb[:, i], qib[:, i]

        def visit(j, carry):
            m, l, acc = carry
            see = _visible(ii, kib[:, j], causal)
            s = _scores(qi, kb[:, j], scale)
            m_new = jnp.maximum(m, jnp.max(jnp.where(see, s, _FLOOR), axis=-1))
            p = jnp.where(see, jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgqt,btkd->bkgqd", p.astype(v.dtype), vb[:, j], preferred_element_type=jnp.float32)
            return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

        init = (jnp.full((b, kv, g, block_q), _FLOOR), jnp.zeros((b, kv, g, block_q)),
                jnp.zeros((b, kv, g, block_q, d)))
        with loop_trips(visits):
            m, l, acc = jax.lax.fori_loop(ranges[0, i], ranges[1, i], visit, init)
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return out, lse

    out, lse = jax.lax.map(query_block, jnp.arange(qb.shape[1]))  # [nq, B, KV, G, bq, (D)]
    out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(b, -1, h, d)[:, :lq]
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q, k, v, q_ids, k_ids, ranges, causal, block_q, block_k, visits):
    return _forward(q, k, v, q_ids, k_ids, ranges, causal, block_q, block_k, visits)[0]


def _flash_fwd(q, k, v, q_ids, k_ids, ranges, causal, block_q, block_k, visits):
    out, lse = _forward(q, k, v, q_ids, k_ids, ranges, causal, block_q, block_k, visits)
    return out, (q, k, v, q_ids, k_ids, ranges, out, lse)


def _flash_bwd(causal, block_q, block_k, visits, res, dout):
    q, k, v, q_ids, k_ids, ranges, out, lse = res
    b, lq, h, d = q.shape
    lk = k.shape[1]
    qb, kb, vb, qib, kib = _prepare(q, k, v, q_ids, k_ids, block_q, block_k)
    kv, g = qb.shape[3], qb.shape[4]
    dob = _blocks(dout.reshape(b, lq, kv, g, d), block_q, 0)
    # D_i = rowsum(dO_i * O_i): the softmax-Jacobian term of every query row.
    delta = _blocks(jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).reshape(b, lq, kv, g),
                    block_q, 0)  # [B, nq, bq, KV, G]
    scale = d**-0.5

    def query_block(carry, i):
        dk, dv = carry  # fp32 [B, nk, bk, KV, D]
        qi, ii, doi = qb[:, i], qib[:, i], dob[:, i]
        li = lse[i][..., None]  # [B, KV, G, bq, 1]
        di = jnp.moveaxis(delta[:, i], 1, -1)[..., None]  # [B, KV, G, bq, 1]

        def visit(j, inner):
            dq, dk, dv = inner
            see = _visible(ii, kib[:, j], causal)
            p = jnp.where(see, jnp.exp(_scores(qi, kb[:, j], scale) - li), 0.0)  # [B, KV, G, bq, bk]
            dv = dv.at[:, j].add(jnp.einsum("bkgqt,bqkgd->btkd", p, doi, preferred_element_type=jnp.float32))
            dp = jnp.einsum("bqkgd,btkd->bkgqt", doi, vb[:, j], preferred_element_type=jnp.float32)
            ds = p * (dp - di) * scale
            dq = dq + jnp.einsum("bkgqt,btkd->bqkgd", ds, kb[:, j], preferred_element_type=jnp.float32)
            dk = dk.at[:, j].add(jnp.einsum("bkgqt,bqkgd->btkd", ds, qi, preferred_element_type=jnp.float32))
            return dq, dk, dv

        dq0 = jnp.zeros(qi.shape, jnp.float32)
        with loop_trips(visits):
            dq, dk, dv = jax.lax.fori_loop(ranges[0, i], ranges[1, i], visit, (dq0, dk, dv))
        return (dk, dv), dq

    zeros = jnp.zeros(kb.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros), jnp.arange(qb.shape[1]))
    dq = jnp.moveaxis(dq, 0, 1).reshape(b, -1, h, d)[:, :lq]
    dk = dk.reshape(b, -1, kv, d)[:, :lk]
    dv = dv.reshape(b, -1, kv, d)[:, :lk]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, q_ids, k_ids, ranges, *, causal: bool, block_q: int, block_k: int,
                    visits: float | None = None) -> jax.Array:
    """See the module docstring; -> float[B, Lq, H, D] in q's dtype. visits: mean key blocks per query block
    (FLOP counting only; default every key block, an upper bound)."""
    nq = -(-q.shape[1] // block_q)
    if ranges.shape != (2, nq):
        raise ValueError(f"ranges must be int32[2, {nq}] (one key-block run per query block), got {ranges.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads do not group over {k.shape[2]} KV heads")
    return _flash(q, k, v, q_ids.astype(jnp.int32), k_ids.astype(jnp.int32), ranges.astype(jnp.int32),
                  causal, block_q, block_k, float(visits or -(-k.shape[1] // block_k)))


def causal_attention(q, k, v, valid, *, block: int) -> jax.Array:
    """Training-time decoder attention: slot i sees valid slots j <= i. valid bool[B, T]; no [B, T, T] mask,
    and the key blocks after each query block are skipped (about half the work of full attention)."""
    b, t = valid.shape
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    k_ids = jnp.stack([jnp.where(valid, 0, -1), slots], axis=-1)
    q_ids = jnp.stack([jnp.zeros_like(slots), slots], axis=-1)
    block = min(block, t)
    nb = -(-t // block)
    visits = np.mean(np.minimum((np.arange(nb) + 1) * block - 1, t - 1) // block + 1)
    return flash_attention(q, k, v, q_ids, k_ids, block_ranges_causal(t, t, block, block), causal=True,
                           block_q=block, block_k=block, visits=visits)


def cache_attention(q, k, v, kv_valid, start, *, block: int) -> jax.Array:
    """Attention of a chunk of T new tokens over a KV cache: query i of row b sits at slot start[b] + i and sees
    the filled slots (kv_valid bool[B, S]) up to its own. q float[B, T, H, D]; k/v float[B, S, KV, D], the cache
    with this chunk already written. No [B, T, S] mask is built and the key blocks after the batch's last query
    slot are never visited (counted as visited: the slots are data). A single new token (a decode step) takes
    one dense [B, H, 1, S] score row instead: small, and one fused op."""
    b, t = q.shape[:2]
    s = k.shape[1]
    key_slots = jnp.arange(s, dtype=jnp.int32)
    if t == 1:
        return masked_attention(q, k, v, (kv_valid & (key_slots[None] <= start[:, None]))[:, None])
    slots = start[:, None].astype(jnp.int32) + jnp.arange(t, dtype=jnp.int32)[None]
    q_ids = jnp.stack([jnp.zeros_like(slots), slots], axis=-1)
    k_ids = jnp.stack([jnp.where(kv_valid, 0, -1), jnp.broadcast_to(key_slots, (b, s))], axis=-1)
    block_q, block_k = min(block, t), min(block, s)
    nq, nk = -(-t // block_q), -(-s // block_k)
    last = jnp.max(start) + jnp.minimum((jnp.arange(nq) + 1) * block_q, t) - 1
    ranges = jnp.stack([jnp.zeros(nq, jnp.int32), jnp.minimum(last // block_k + 1, nk)])
    return flash_attention(q, k, v, q_ids, k_ids, ranges, causal=True, block_q=block_q, block_k=block_k,
                           visits=nk)


def segment_attention(q, k, v, seg, *, block: int) -> jax.Array:
    """Attention within equal-`seg` runs (images, frames) of any length: q/k/v float[N, H, D], seg int32[N]
    non-decreasing. The cost is about sum(len^2) over the runs, not N^2 (counted as N^2: one image may fill
    the buffer)."""
    n = seg.shape[0]
    block = min(block, n)
    ids = jnp.stack([seg, jnp.zeros_like(seg)], axis=-1)[None]
    out = flash_attention(q[None], k[None], v[None], ids, ids, block_ranges_segments(seg, block), causal=False,
                          block_q=block, block_k=block)
    return out[0]
