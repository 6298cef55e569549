"""Bad model inputs fail with errors that name the offending tensor."""

import numpy as np
import pytest
from flax import nnx

from deepeyes_jax.models.qwen2_5_vl import Qwen2_5_VL, get_preset
from deepeyes_jax.models.qwen2_5_vl.model import jit_forward

CFG = get_preset("tiny")
IMG = CFG.image_token_id


@pytest.fixture(scope="module")
def forward():
    return jit_forward(Qwen2_5_VL(CFG, rngs=nnx.Rngs(0)))


def _inputs(n_img_tokens=4, grid=(1, 4, 4), patches=16):
    ids = np.array([[1, 2, CFG.vision_start_token_id] + [IMG] * n_img_tokens + [CFG.vision_end_token_id, 3]])
    return ids, np.ones_like(ids), np.zeros((patches, 1176), np.float32), np.array([grid])


@pytest.mark.parametrize("make,message", [
    (lambda: _inputs(n_img_tokens=5), r"image features and image tokens do not match: input_ids have 5 image tokens, image_grid_thw implies 4"),
    (lambda: _inputs(patches=12), r"image_grid_thw covers 16 patches but pixel_values has only 12"),
    (lambda: _inputs(grid=(1, 3, 4)), r"image_grid_thw rows must be positive with h, w multiples of 2"),
    (lambda: (*_inputs()[:2], np.zeros((16, 1000), np.float32), _inputs()[3]), r"pixel_values must be float\[N, 1176\]"),
    (lambda: (*_inputs()[:2], None, None), r"input_ids contain 4 image tokens but no pixel_values"),
    (lambda: (*_inputs()[:3], None), r"pixel_values and image_grid_thw must be given together"),
    (lambda: (np.array([[1, CFG.video_token_id]]), None, None, None), r"video inputs are not supported"),
    (lambda: (np.array([[1, 9999]]), None, None, None), r"input_ids values must lie in \[0, 512\)"),
    (lambda: (np.array([1, 2]), None, None, None), r"input_ids must be int\[B, T\]"),
    (lambda: (np.array([[1, 2]]), np.ones((1, 3)), None, None), r"attention_mask shape \(1, 3\) != input_ids shape \(1, 2\)"),
])
def test_bad_inputs_are_named(forward, make, message):
    with pytest.raises(ValueError, match=message):
        forward(*make())


def test_good_inputs_pass(forward):
    out = forward(*_inputs())
    assert out.shape == (1, 9, CFG.text.vocab_size) and np.isfinite(np.asarray(out)).all()


def test_remat_gives_the_same_gradient_and_recomputes():
    """Rematerialised decoder layers and vision blocks: identical loss and gradients; the backward recomputes
    (one checkpoint per decoder layer and per vision block)."""
    import jax
    import jax.numpy as jnp

    ids, mask, pv, grid = _inputs()

    def grads(remat):
        model = Qwen2_5_VL(CFG.replace(remat=remat), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def loss(state):
            logits = nnx.merge(graphdef, state)(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 7])

        return jax.jit(jax.value_and_grad(loss)), state

    (f0, s0), (f1, s1) = grads(False), grads(True)
    (l0, g0), (l1, g1) = f0(s0), f1(s1)
    assert float(l0) == float(l1)
    # Recomputation may fuse differently: equal up to float32 rounding.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max()), g0, g1)
    remats = lambda f, s: str(jax.make_jaxpr(f)(s)).count("remat2[")  # noqa: E731
    assert remats(f0, s0) == 0 and remats(f1, s1) == CFG.text.num_hidden_layers + CFG.vision.depth
