"""Logits and per-block parity with transformers' PyTorch Qwen2.5-VL (fp32, CPU).

Tolerance: fp32 on both sides, different summation orders (fused vs split attention,
window-major vs per-window softmax); observed differences are ~1e-6 of the logits'
scale, the bound below is 1e-4 of it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_window_index

import hf_reference as H
from deepeyes_jax.models import qwen2_5_vl as q
from deepeyes_jax.models.qwen2_5_vl.model import jit_forward
from deepeyes_jax.models.qwen2_5_vl.rope import mrope_cos_sin, vision_cos_sin
from deepeyes_jax.models.flash_attention import segment_attention
from deepeyes_jax.models.qwen2_5_vl.vision import band_attention, vision_layout

TOL = 1e-4


def assert_close(ref, got, tol=TOL, where=None):
    ref, got = np.asarray(ref), np.asarray(got)
    if where is not None:
        ref, got = ref[where], got[where]
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ref - got).max())
    assert err <= tol * scale, f"max abs diff {err:.3g} > {tol} * scale {scale:.3g}"


def load_pair(tmp_path_factory, runtime=None, **cfg_kw):
    hf = H.hf_model(H.hf_config(**cfg_kw))
    path = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(path)
    return hf, q.from_pretrained(str(path), **(runtime or {}))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return load_pair(tmp_path_factory)


CASES = {
    "text_only": [[12], [7]],
    "one_image": [[5, (1, 4, 4), 6]],
    "two_images_different_sizes": [[3, (1, 10, 14), 4, (1, 6, 8), 5]],
    "left_padded_batch": [[3, (1, 4, 6), 9], [2, (1, 8, 4), 1, (1, 4, 4), 2], [4]],
    "grids_not_multiples_of_window": [[2, (1, 18, 2), 1, (1, 6, 22), 3, (1, 22, 10), 1]],
    "grid_exactly_two_windows": [[2, (1, 16, 16), 2]],
    "image_first_token": [[(1, 4, 8), 5]],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(pair, case):
    hf, ours = pair
    ids, mask, pv, grid = H.make_inputs(np.random.default_rng(len(case)), CASES[case])
    ref = H.hf_logits(hf, ids, mask, pv, grid)
    got = jit_forward(ours)(ids, mask, pv, grid)
    assert got.shape == ref.shape and got.dtype == np.float32
    # Padding positions are garbage on both sides.
    assert_close(ref, got, where=mask.astype(bool))


VARIANTS = {
    "splash_attention": dict(runtime=dict(attention_impl="splash")),  # the Pallas kernel, interpret mode here
    "scanned_layers": dict(runtime=dict(scan_layers=True, remat=True), depth=4, fullatt=(2, 3), layers=3),
    "fullatt_first_and_last": dict(fullatt=(0, 2)),
    "no_full_attention": dict(fullatt=()),
    "all_full_attention": dict(fullatt=(0, 1, 2)),
    "mrope_4_2_2": dict(mrope=(4, 2, 2)),
    "mrope_1_1_6": dict(mrope=(1, 1, 6)),
    "window_56": dict(window=56),
    "tied_embeddings_mha": dict(tie=True, kv_heads=4),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_match_transformers(tmp_path_factory, variant):
    hf, ours = load_pair(tmp_path_factory, **VARIANTS[variant])
    segs = [[3, (1, 10, 14), 2, (1, 6, 4), 3], [1, (1, 12, 6), 5]]
    ids, mask, pv, grid = H.make_inputs(np.random.default_rng(7), segs)
    assert_close(H.hf_logits(hf, ids, mask, pv, grid),
                 jit_forward(ours)(ids, mask, pv, grid), where=mask.astype(bool))


def test_scanned_layers_have_the_unrolled_gradients_and_a_depth_free_program(tmp_path_factory):
    """`scan_layers`: every parameter's gradient equals the unrolled model's (fp32, atol 1e-5 of the largest),
    and the compiled program holds one layer: its dot count does not grow from 2 to 6 decoder layers (it
    does unrolled)."""
    from flax import nnx

    from deepeyes_jax.testing.factory import tiny_model

    hf = H.hf_model(H.hf_config(depth=4, fullatt=(2, 3), layers=3))
    path = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(path)
    ids, mask, pv, grid = H.make_inputs(np.random.default_rng(3), [[3, (1, 4, 6), 4], [2, (1, 8, 4), 1]])

    def grads(**runtime):
        model = q.from_pretrained(str(path), **runtime)
        loss = lambda m: jnp.sum(jnp.sin(m(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)))  # noqa: E731
        return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.grad(loss)(model))}

    want, got = grads(), grads(scan_layers=True, remat=True)
    assert got.keys() == want.keys()
    for k in want:
        assert_close(want[k], got[k], tol=1e-5, where=None)

    def dots(layers, scan):
        model = tiny_model(layers=layers, scan_layers=scan)
        graphdef, state = nnx.split(model)
        x = jnp.zeros((2, 16), jnp.int32)
        f = lambda s: jnp.sum(nnx.merge(graphdef, s)(x))  # noqa: E731
        return jax.jit(jax.grad(f)).lower(state).as_text().count("dot_general")

    assert dots(2, True) == dots(6, True) < dots(6, False)


def test_eager_module_call_matches_transformers(pair):
    """The public `model(input_ids, ...)` call, un-jitted, with numpy inputs."""
    hf, ours = pair
    ids, mask, pv, grid = H.make_inputs(np.random.default_rng(11), [[2, (1, 4, 6), 3], [1]])
    got = ours(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)
    assert_close(H.hf_logits(hf, ids, mask, pv, grid), got, where=mask.astype(bool))


# ----------------------------------------------------------------------------- blocks

GRIDS = np.array([[1, 10, 14], [1, 6, 22], [1, 4, 4]])


def test_window_order_matches_transformers():
    hf_index, hf_cu = get_vision_window_index(torch.from_numpy(GRIDS), spatial_merge_size=2, window_size=112,
                                              patch_size=14)
    cfg = q.get_preset("tiny").vision
    lay = vision_layout(GRIDS, int(GRIDS.prod(1).sum()), cfg)
    np.testing.assert_array_equal(np.asarray(lay.order), hf_index.numpy())
    # Window segments: same boundaries as transformers' cu_window_seqlens.
    seg = np.asarray(lay.window_seg)
    starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
    np.testing.assert_array_equal(np.r_[starts, len(seg)], hf_cu.numpy())


def _block_inputs(hf, n_extra=0):
    """Window-ordered hidden states, rope and attention segments, for both implementations."""
    cfg = q.get_preset("tiny").vision
    n = int(GRIDS.prod(1).sum())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, cfg.hidden_size)).astype(np.float32)
    lay = vision_layout(GRIDS, n, cfg)
    cos, sin = vision_cos_sin(lay.rows, lay.cols, head_dim=cfg.head_dim, theta=cfg.rope_theta)
    grid_t = torch.from_numpy(GRIDS)
    _, cu_window = get_vision_window_index(grid_t, spatial_merge_size=2, window_size=112, patch_size=14)
    cu_full, _ = get_vision_attention_seqlens(grid_t, hf.config.vision_config)
    return x, lay, cos, sin, cu_window, cu_full


def test_vision_rope_matches_transformers(pair):
    hf, _ = pair
    _, lay, cos, sin, *_ = _block_inputs(hf)
    from transformers.vision_utils import get_vision_position_ids
    pos = get_vision_position_ids(torch.from_numpy(GRIDS), 2)
    index = get_vision_window_index(torch.from_numpy(GRIDS), spatial_merge_size=2, window_size=112, patch_size=14)[0]
    hf_cos, hf_sin = hf.model.visual.rotary_pos_emb(torch.zeros(1), pos)
    reorder = lambda t: t.reshape(-1, 4, t.shape[-1])[index].reshape(-1, t.shape[-1]).numpy()  # noqa: E731
    assert_close(reorder(hf_cos), cos, tol=1e-6)
    assert_close(reorder(hf_sin), sin, tol=1e-6)


@pytest.mark.parametrize("block_index,full", [(0, False), (1, True)])
def test_vision_block_matches_transformers(pair, block_index, full):
    hf, ours = pair
    x, lay, cos, sin, cu_window, cu_full = _block_inputs(hf)
    with torch.no_grad():
        ref = hf.model.visual.blocks[block_index](
            H.to_torch(x), cu_seqlens=cu_full if full else cu_window,
            position_embeddings=(H.to_torch(cos), H.to_torch(sin)))
    attend = ((lambda a, b, c: segment_attention(a, b, c, lay.frame_seg, block=64)) if full else
              (lambda a, b, c: band_attention(a, b, c, lay.window_seg, 64)))
    assert_close(H.to_numpy(ref), ours.visual.blocks[block_index](x, cos, sin, attend))


def test_merger_matches_transformers(pair):
    hf, ours = pair
    x = np.random.default_rng(1).normal(size=(64, 32)).astype(np.float32)
    with torch.no_grad():
        ref = hf.model.visual.merger(H.to_torch(x))
    assert_close(H.to_numpy(ref), ours.visual.merger(x))


def test_vision_tower_matches_transformers_and_accepts_padded_buffer(pair):
    hf, ours = pair
    n = int(GRIDS.prod(1).sum())
    pv = np.random.default_rng(2).normal(size=(n, 1176)).astype(np.float32)
    with torch.no_grad():
        ref = H.to_numpy(hf.model.visual(H.to_torch(pv), grid_thw=torch.from_numpy(GRIDS)).pooler_output)
    assert_close(ref, ours.encode_images(pv, GRIDS))
    # A static buffer larger than the images: the true grids decide, the tail is ignored.
    padded = np.concatenate([pv, np.random.default_rng(3).normal(size=(132, 1176)).astype(np.float32)])
    assert_close(ref, ours.encode_images(padded, GRIDS)[: n // 4])


def test_decoder_layer_and_mrope_match_transformers(pair):
    hf, ours = pair
    ids, mask, _, grid = H.make_inputs(np.random.default_rng(4), [[3, (1, 6, 8), 4], [2, (1, 4, 4), 1]])
    pos, _ = ours.position_ids(ids, mask, grid)
    x = np.random.default_rng(5).normal(size=(*ids.shape, 64)).astype(np.float32)
    text = hf.model.language_model
    with torch.no_grad():
        hf_cos, hf_sin = text.rotary_emb(H.to_torch(x), H.to_torch(np.asarray(pos)))
    cfg = ours.config.text
    cos, sin = mrope_cos_sin(pos, head_dim=cfg.head_dim, theta=cfg.rope_theta, mrope_section=cfg.mrope_section,
                             dtype=np.float32)
    assert_close(H.to_numpy(hf_cos), cos, tol=1e-6)
    assert_close(H.to_numpy(hf_sin), sin, tol=1e-6)
    # Additive 4-D mask, what transformers' eager/sdpa attention consumes.
    allowed = np.tril(np.ones((ids.shape[1],) * 2, bool))[None] & mask.astype(bool)[:, None, :]
    additive = np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None]
    with torch.no_grad():
        ref = text.layers[1](H.to_torch(x), attention_mask=H.to_torch(additive),
                             position_embeddings=(hf_cos, hf_sin))
    got, _ = ours.model.layers[1](x, cos, sin, mask.astype(bool))  # causal over valid slots, no [B, T, T] mask
    assert_close(H.to_numpy(ref), got, where=mask.astype(bool))


def test_bf16_compute_tracks_fp32(pair, tmp_path):
    """bf16 matmuls over fp32 master weights: close to the fp32 reference, not equal to it."""
    hf, ours = pair
    hf.save_pretrained(tmp_path)
    bf16 = q.from_pretrained(str(tmp_path), dtype=np.float32, compute_dtype="bfloat16")
    assert bf16.model.layers[0].mlp.up_proj.kernel[...].dtype == np.float32
    ids, mask, pv, grid = H.make_inputs(np.random.default_rng(3), CASES["two_images_different_sizes"])
    ref = H.hf_logits(hf, ids, mask, pv, grid)
    got = np.asarray(jit_forward(bf16)(ids, mask, pv, grid))
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert 1e-4 < err < 5e-2, err
