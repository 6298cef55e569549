"""Flash attention (custom VJP, block skipping) vs the previous paths, forward + backward, time and memory.

  python -m benchmarks.attention [--lengths=2048,4096,8192] [--repeats=3]

Vision full attention: `flash_attention.segment_attention` vs the previous scan-based flash forward whose
backward keeps every visited block's carry. Text training attention: `flash_attention.causal_attention` vs the
previous query-blocked attention over a materialised bool[B, T, T] mask (each query block rematerialised).
Memory is the compiled gradient program's temporaries (`memory_analysis`), time the median wall time of the
jitted gradient on this CPU; ratios are previous / new (> 1: the new path is better).
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.timing import median_seconds
from deepeyes_jax.models.flash_attention import causal_attention, segment_attention
from deepeyes_jax.models.layers import chunked_attention

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


def previous_causal_attention(q, k, v, valid, block=256):
    """The decoder's training attention before: query blocks over a bool[B, T, T] mask."""
    t = valid.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
    return chunked_attention(q, k, v, mask, block)


def measure(attend, shapes, repeats):
    """-> (median seconds, compiled temp bytes) of the gradient of sum(attend(q, k, v)) w.r.t. q, k, v."""
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v)), argnums=(0, 1, 2)))
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
        for name, shapes, previous, flash in cases:
            t0, m0 = measure(previous, shapes, FLAGS.repeats)
            t1, m1 = measure(flash, shapes, FLAGS.repeats)
            print(f"{name:<28}{t0:>11.3f}{t1:>9.3f}{t0 / t1:>8.2f}{m0 / 2**20:>14.1f}{m1 / 2**20:>11.1f}"
                  f"{m0 / m1:>10.1f}", flush=True)


if __name__ == "__main__":
    app.run(main)
