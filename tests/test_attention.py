"""The attentions against dense references, forward and gradients (fp32 tolerances stated per test).

Flash attention (vision full attention and the decoder's training-time causal attention) must equal one dense
softmax in value and in all three gradients, keep O(L) memory in the backward pass (read from the compiled
program), and skip the key blocks its ranges exclude.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepeyes_jax.models.flash_attention import (block_ranges_causal, cache_attention, causal_attention,
                                                 flash_attention, segment_attention)
from deepeyes_jax.models.layers import masked_attention
from deepeyes_jax.models.qwen2_5_vl.vision import band_attention


def dense_reference(q, k, v, seg):
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where((seg[:, None] == seg[None, :])[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v)


def _qkv(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, 2, 8)).astype(np.float32) for _ in range(3)]


def _grads(fn, q, k, v, weight):
    """Value and d/d(q, k, v) of sum(sin(fn(q, k, v)) * weight)."""
    return jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(fn(*a)) * weight), argnums=(0, 1, 2))(q, k, v)


def _assert_same(got, want, atol):
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5, atol=atol)
    for g, w, name in zip(got[1], want[1], "qkv"):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, err_msg=f"d{name}")


@pytest.mark.parametrize("lengths", [
    [300],  # one segment over several blocks, ragged tail
    [1, 700, 3, 64, 65, 1],  # a row whose first visited key block holds none of its keys
    [17] * 40,  # many short segments, block boundaries inside segments
    [256, 256],  # exactly on block boundaries
])
def test_segment_attention_equals_dense(lengths):
    seg = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
    q, k, v = _qkv(len(seg), len(lengths))
    got = np.asarray(segment_attention(q, k, v, seg, block=64))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, dense_reference(q, k, v, seg), atol=2e-5)


@pytest.mark.parametrize("lengths", [[64] * 5, [3, 64, 1, 40, 64, 20], [1] * 70])
def test_band_attention_equals_dense(lengths):
    seg = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
    q, k, v = _qkv(len(seg), 3)
    got = np.asarray(band_attention(q, k, v, seg, 64))
    np.testing.assert_allclose(got, dense_reference(q, k, v, seg), atol=2e-5)


def test_segment_attention_gradients_equal_dense():
    """The whole vision tower is trained (as in DeepEyes): d(q, k, v) through the custom VJP, atol 2e-5."""
    seg = np.repeat(np.arange(4), [70, 3, 130, 40]).astype(np.int32)
    q, k, v = _qkv(len(seg), 9)
    weight = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)
    dense = lambda a, b, c: masked_attention(a, b, c, seg[:, None] == seg[None, :])  # noqa: E731
    _assert_same(_grads(lambda a, b, c: segment_attention(a, b, c, seg, block=64), q, k, v, weight),
                 _grads(dense, q, k, v, weight), atol=2e-5)


@pytest.mark.parametrize("block", [8, 10, 37, 64])
def test_causal_attention_equals_dense_with_gradients(block):
    """The decoder's training attention (grouped KV heads, left and right padding) vs a dense masked softmax;
    padded query rows are excluded from the loss, as the GRPO loss mask does. atol 1e-5."""
    rng = np.random.default_rng(4)
    q = rng.normal(size=(2, 37, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, 37, 2, 8)).astype(np.float32) for _ in range(2))
    valid = np.ones((2, 37), bool)
    valid[1, :5] = False  # left padding
    valid[0, 30:] = False  # right padding
    mask = np.tril(np.ones((37, 37), bool))[None] & valid[:, None, :]
    weight = valid[:, :, None, None] * rng.normal(size=q.shape).astype(np.float32)
    _assert_same(_grads(lambda a, b, c: causal_attention(a, b, c, valid, block=block), q, k, v, weight),
                 _grads(lambda a, b, c: masked_attention(a, b, c, mask), q, k, v, weight), atol=1e-5)


@pytest.mark.parametrize("t,block", [(37, 8), (37, 16), (1, 16), (20, 64)])
def test_cache_attention_equals_dense(t, block):
    """The rollout's attention over a KV cache (prefill chunks and single decode steps): slot start + i sees the
    filled slots up to its own, vs a dense masked softmax, atol 1e-5. For chunks, the slots after the batch's
    last query are NaN: they are never visited (a visited block would turn the output NaN)."""
    rng = np.random.default_rng(5)
    s = 96
    start = np.array([3, 40])
    q = rng.normal(size=(2, t, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, s, 2, 8)).astype(np.float32) for _ in range(2))
    slots = start[:, None] + np.arange(t)[None]
    kv_valid = rng.random((2, s)) < 0.7
    kv_valid[np.arange(2)[:, None], slots] = True
    mask = kv_valid[:, None, :] & (np.arange(s)[None, None, :] <= slots[:, :, None])
    want = np.asarray(masked_attention(q, k, v, mask))
    if t > 1:
        after = np.arange(s) > start.max() + t - 1 + block  # past the last visited key block
        k[:, after], v[:, after] = np.nan, np.nan
    got = np.asarray(cache_attention(q, k, v, kv_valid, start, block=block))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_bf16_flash_attention_stays_close_to_fp32():
    """bf16 inputs (TPU compute dtype): fp32 scores and statistics keep the output within bf16 rounding."""
    rng = np.random.default_rng(6)
    q, k, v = (rng.normal(size=(1, 300, 2, 64)).astype(np.float32) for _ in range(3))
    valid = np.ones((1, 300), bool)
    want = causal_attention(q, k, v, valid, block=64)
    got = causal_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), valid, block=64)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=3e-2)


def test_ranges_decide_which_key_blocks_are_visited():
    """A query block whose run is empty sees nothing (output 0); the causal runs end at the diagonal."""
    np.testing.assert_array_equal(np.asarray(block_ranges_causal(10, 10, 4, 4)), [[0, 0, 0], [1, 2, 3]])
    q, k, v = (jnp.ones((1, 8, 1, 4)) for _ in range(3))
    ids = jnp.zeros((1, 8, 2), jnp.int32)
    out = flash_attention(q, k, v, ids, ids, jnp.array([[0, 0], [2, 0]]), causal=False, block_q=4, block_k=4)
    np.testing.assert_array_equal(np.asarray(out[0, 4:]), 0.0)
    np.testing.assert_allclose(np.asarray(out[0, :4]), 1.0)


def test_flash_backward_memory_is_linear_in_length():
    """The compiled gradient's temporaries at L = 4096 stay far below one dense [H, L, L] fp32 score matrix
    (which the dense path and a differentiated scan hold), and grow about linearly from L = 2048."""
    def temp_bytes(n):
        seg = jnp.zeros(n, jnp.int32)
        x = jax.ShapeDtypeStruct((n, 4, 32), jnp.float32)
        grad = jax.grad(lambda q, k, v: jnp.sum(segment_attention(q, k, v, seg, block=256)), argnums=(0, 1, 2))
        return jax.jit(grad).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(2048), temp_bytes(4096)
    dense_scores = 4 * 4096 * 4096 * 4
    assert large < dense_scores / 20, (large, dense_scores)
    assert large < 2.5 * small, (small, large)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)])
def test_splash_attention_equals_flash_on_the_mesh(heads, kv_heads):
    """`attention_impl="splash"`: the Pallas TPU kernel (interpret mode here) in shard_map over the 8-device mesh
    (rows over data x fsdp, heads over tensor; one KV head cannot split, so whole heads stay per device) vs the
    JAX flash path, value and d(q, k, v) over valid query rows (ragged length, left and right padding),
    atol 1e-5."""
    from deepeyes_jax.models import splash_attention
    from deepeyes_jax.sharding import Sharder, make_mesh

    rng = np.random.default_rng(8)
    b, t = 4, 200
    q = rng.normal(size=(b, t, heads, 16)).astype(np.float32)
    k, v = (rng.normal(size=(b, t, kv_heads, 16)).astype(np.float32) for _ in range(2))
    valid = np.ones((b, t), bool)
    valid[1, :7], valid[2, 150:] = False, False
    weight = valid[:, :, None, None] * rng.normal(size=q.shape).astype(np.float32)
    shard = Sharder(make_mesh((2, 2, 2)))
    splash = jax.jit(lambda a, b_, c: _grads(
        lambda *x: splash_attention.causal_attention(*x, valid, block=128, shard=shard), a, b_, c, weight))
    _assert_same(splash(q, k, v), _grads(lambda *x: causal_attention(*x, valid, block=64), q, k, v, weight),
                 atol=1e-5)
