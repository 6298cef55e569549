"""The vision tower's two sparse attentions against a dense numpy reference."""

import numpy as np
import pytest

from deepeyes_jax.models.qwen2_5_vl.vision import band_attention, segment_attention


def dense_reference(q, k, v, seg):
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where((seg[:, None] == seg[None, :])[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v)


def _qkv(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, 2, 8)).astype(np.float32) for _ in range(3)]


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


def test_segment_attention_is_differentiable_and_matches_dense_gradient():
    """The whole vision tower is trained (as in DeepEyes), so gradients must flow through it."""
    import jax
    import jax.numpy as jnp

    from deepeyes_jax.models.layers import masked_attention

    seg = np.repeat(np.arange(4), [70, 3, 130, 40]).astype(np.int32)
    q, k, v = _qkv(len(seg), 9)

    def loss(fn, q):
        return jnp.sum(jnp.sin(fn(q, k, v)))

    dense = lambda a, b, c: masked_attention(a, b, c, seg[:, None] == seg[None, :])  # noqa: E731
    got = jax.grad(lambda x: loss(lambda a, b, c: segment_attention(a, b, c, seg, block=64), x))(q)
    want = jax.grad(lambda x: loss(dense, x))(q)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_chunked_text_attention_equals_dense_with_gradients():
    """The decoder's query-blocked attention (rematerialised per block) vs one dense softmax."""
    import jax
    import jax.numpy as jnp

    from deepeyes_jax.models.layers import chunked_attention, masked_attention

    rng = np.random.default_rng(4)
    q = rng.normal(size=(2, 37, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, 37, 2, 8)).astype(np.float32) for _ in range(2))
    valid = np.ones((2, 37), bool)
    valid[1, :5] = False  # left padding
    mask = np.tril(np.ones((37, 37), bool))[None] & valid[:, None, :]

    def loss(fn, q):
        return jnp.sum(jnp.sin(fn(q, k, v, mask)) * valid[:, :, None, None])

    dense = jax.value_and_grad(lambda x: loss(masked_attention, x))(q)
    for chunk in (8, 10, 37, 64):
        got = jax.value_and_grad(lambda x: loss(lambda *a: chunked_attention(*a, chunk), x))(q)
        np.testing.assert_allclose(float(got[0]), float(dense[0]), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(dense[1]), atol=1e-5)
