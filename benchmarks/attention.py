"""Flash attention (custom VJP, block skipping) vs the previous paths, forward + backward, time and memory.

  python -m benchmarks.attention [--lengths=2048,4096,8192] [--repeats=3]

Vision full attention: `flash_attention.segment_attention` vs the previous scan-based flash forward whose
backward keeps every visited block's carry. Text training attention: `flash_attention.causal_attention` vs the
previous query-blocked attention over a materialised bool[B, T, T] mask (each query block rematerialised).
Both: memory is the compiled gradient program's temporaries (`memory_analysis`), time the median wall time of
the jitted gradient on this CPU. Rollout prefill over a KV cache (forward only, as the rollout runs it): a chunk
of n tokens written after n / 2 filled slots of a 2n-slot cache, `flash_attention.cache_attention` vs the
previous query-blocked attention over a bool[B, T, S] mask. Ratios are previous / new (> 1: the new path is
better).
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.timing import median_seconds
from deepeyes_jax.models.flash_attention import cache_attention, causal_attention, segment_attention
from deepeyes_jax.models.layers import masked_attention

flags.DEFINE_list("lengths", ["2048", "4096", "8192"], "Sequence lengths (patches / tokens).")
flags.DEFINE_integer("repeats", 3, "Timed runs per side (median reported).")
FLAGS = flags.FLAGS

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 16, 2, 80, 256  # Qwen2.5-VL-7B's vision head size; 7B text GQA ratio 8


def previous_segment_attention(q, k, v, seg, block=256):
    """The vision full attention before the custom VJP (a differentiated scan over every key block)."""
    n, h, d = q.shape

    def blocks(x, fill):
        nb = -(-n // block)
        x = jnp.pad(x, [(0, nb * block - n)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
        return x.reshape(nb, block, *x.shape[1:])

    qb, kb, vb, sb = blocks(q, 0), blocks(k, 0), blocks(v, 0), blocks(seg, jnp.iinfo(jnp.int32).max)
    nb = qb.shape[0]
    lo = jnp.searchsorted(sb[:, -1], sb[:, 0], side="left")
    hi = jnp.searchsorted(sb[:, 0], sb[:, -1], side="right")

    def query_block(i):
        qi, si = qb[i], sb[i]

        def update(j, carry):
            m, l, acc = carry
            s = jnp.einsum("qhd,khd->hqk", qi, kb[j]) * d**-0.5
            mask = (si[:, None] == sb[j][None, :])[None]
            m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1))
            p = jnp.exp(jnp.where(mask, s - m_new[..., None], -jnp.inf))
            corr = jnp.exp(m - m_new)
            return m_new, l * corr + jnp.sum(p, -1), acc * corr[..., None] + jnp.einsum("hqk,khd->hqd", p, vb[j])

        def visit(carry, j):
            return jax.lax.cond((j >= lo[i]) & (j < hi[i]), update, lambda _, c: c, j, carry), None

        init = (jnp.full((h, block), jnp.finfo(jnp.float32).min), jnp.zeros((h, block)), jnp.zeros((h, block, d)))
        (_, l, acc), _ = jax.lax.scan(visit, init, jnp.arange(nb))
        return jnp.transpose(acc / l[..., None], (1, 0, 2))

    return jax.lax.map(query_block, jnp.arange(nb)).reshape(nb * block, h, d)[:n]


def previous_chunked_attention(q, k, v, mask, chunk):
    """The previous text attention: `masked_attention` over query blocks of a bool[B, Lq, Lk] mask, each
    block rematerialised in the backward pass."""
    b, lq = q.shape[:2]
    if lq <= chunk:
        return masked_attention(q, k, v, mask)
    n = -(-lq // chunk)
    pad = n * chunk - lq
    qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, chunk, *q.shape[2:])
    mb = jnp.pad(mask, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, mask.shape[-1])
    block = jax.checkpoint(lambda qc, mc: masked_attention(qc, k, v, mc))
    out = jax.lax.map(lambda xs: block(*xs), (jnp.moveaxis(qb, 1, 0), jnp.moveaxis(mb, 1, 0)))
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, *q.shape[2:])[:, :lq]


def previous_cache_attention(q, k, v, kv_valid, start, block=256):
    """The rollout's prefill attention before: the same query blocks over a bool[B, T, S] mask."""
    t, s = q.shape[1], k.shape[1]
    slots = start[:, None] + jnp.arange(t)[None]
    mask = kv_valid[:, None, :] & (jnp.arange(s)[None, None, :] <= slots[:, :, None])
    return previous_chunked_attention(q, k, v, mask, block)


def previous_causal_attention(q, k, v, valid, block=256):
    """The decoder's training attention before: query blocks over a bool[B, T, T] mask."""
    t = valid.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
    return previous_chunked_attention(q, k, v, mask, block)


def measure(attend, shapes, repeats, backward=True):
    """-> (median seconds, compiled temp bytes) of the gradient of sum(attend(q, k, v)) w.r.t. q, k, v (or of
    attend itself)."""
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v)), argnums=(0, 1, 2)) if backward else attend)
    temp = grad.lower(*shapes).compile().memory_analysis().temp_size_in_bytes
    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.normal(size=s.shape).astype(np.float32)) for s in shapes]
    seconds, _ = median_seconds(lambda i: grad(*args), repeats)
    return seconds, temp


def main(argv):
    del argv
    print(f"{'case':<28}{'previous s':>11}{'flash s':>9}{'time x':>8}{'previous MiB':>14}{'flash MiB':>11}"
          f"{'memory x':>10}")
    for n in map(int, FLAGS.lengths):
        # Vision: two images of n/2 patches each (per-image attention), all heads.
        seg = jnp.repeat(jnp.arange(2, dtype=jnp.int32), n // 2)
        x = jax.ShapeDtypeStruct((n, HEADS, HEAD_DIM), jnp.float32)
        cases = [(f"vision full, {n} patches", (x, x, x),
                  lambda q, k, v: previous_segment_attention(q, k, v, seg, BLOCK),
                  lambda q, k, v: segment_attention(q, k, v, seg, block=BLOCK))]
        # Text: one row of n tokens, the last eighth padding.
        valid = jnp.arange(n)[None] < n - n // 8
        qs = jax.ShapeDtypeStruct((1, n, HEADS, HEAD_DIM), jnp.float32)
        ks = jax.ShapeDtypeStruct((1, n, KV_HEADS, HEAD_DIM), jnp.float32)
        cases.append((f"text causal, {n} tokens", (qs, ks, ks),
                      lambda q, k, v: previous_causal_attention(q, k, v, valid, BLOCK),
                      lambda q, k, v: causal_attention(q, k, v, valid, block=BLOCK)))
        # Rollout prefill: n new tokens at slots [n / 2, 3n / 2) of a 2n-slot cache (forward only).
        start, kv_valid = jnp.full((1,), n // 2), jnp.arange(2 * n)[None] < 3 * n // 2
        cs = jax.ShapeDtypeStruct((1, 2 * n, KV_HEADS, HEAD_DIM), jnp.float32)
        cases.append((f"cache prefill, {n} tokens", (qs, cs, cs),
                      lambda q, k, v: previous_cache_attention(q, k, v, kv_valid, start, BLOCK),
                      lambda q, k, v: cache_attention(q, k, v, kv_valid, start, block=BLOCK)))
        for name, shapes, previous, flash in cases:
            backward = not name.startswith("cache")
            t0, m0 = measure(previous, shapes, FLAGS.repeats, backward)
            t1, m1 = measure(flash, shapes, FLAGS.repeats, backward)
            print(f"{name:<28}{t0:>11.3f}{t1:>9.3f}{t0 / t1:>8.2f}{m0 / 2**20:>14.1f}{m1 / 2**20:>11.1f}"
                  f"{m0 / m1:>10.1f}", flush=True)


if __name__ == "__main__":
    app.run(main)
