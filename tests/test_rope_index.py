"""On-device M-RoPE position ids == transformers' get_rope_index (with mm_token_type_ids)."""

import chex
import jax
import numpy as np
import pytest
import torch

import hf_reference as H
from deepeyes_jax.models.qwen2_5_vl import mrope_position_ids


@pytest.fixture(scope="module")
def hf():
    return H.hf_model(H.hf_config())


CASES = {
    "text_only": [[9], [4]],
    "one_image": [[5, (1, 4, 4), 6]],
    "tall_and_wide_images": [[2, (1, 20, 4), 3, (1, 4, 18), 2]],
    "several_images_several_rows_left_padded": [[3, (1, 10, 14), 4, (1, 6, 8), 5], [7, (1, 4, 6), 2], [1]],
    "image_at_start": [[(1, 8, 4), 5]],
    "image_at_end": [[5, (1, 6, 6)]],
    "many_small_images": [[1, (1, 2, 2), 1, (1, 2, 4), 1, (1, 4, 2), 1, (1, 2, 2), 3]],
}


def _ours(ids, mask, grid, use_mask=True):
    return mrope_position_ids(ids, mask if use_mask else None, grid, image_token_id=H.IMAGE, spatial_merge_size=2)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("pad_extra", [0, 5])
def test_positions_equal_get_rope_index(hf, case, pad_extra):
    ids, mask, _, grid = H.make_inputs(np.random.default_rng(0), CASES[case])
    if pad_extra:  # extra left padding on every row
        ids = np.pad(ids, ((0, 0), (pad_extra, 0)))
        mask = np.pad(mask, ((0, 0), (pad_extra, 0)))
    ref_pos, ref_delta = hf.model.get_rope_index(
        torch.from_numpy(ids), torch.from_numpy((ids == H.IMAGE).astype(np.int64)),
        image_grid_thw=None if grid is None else torch.from_numpy(grid), attention_mask=torch.from_numpy(mask))
    pos, delta = _ours(ids, mask, grid)
    np.testing.assert_array_equal(np.asarray(pos), ref_pos.numpy())
    np.testing.assert_array_equal(np.asarray(delta), ref_delta.numpy())


def test_no_mask_equals_all_ones_mask(hf):
    ids, mask, _, grid = H.make_inputs(np.random.default_rng(1), [[4, (1, 6, 10), 3]])
    a, _ = _ours(ids, mask, grid)
    b, _ = _ours(ids, mask, grid, use_mask=False)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_jitted_positions_traced_once():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def positions(ids, mask, grid):
        return _ours(ids, mask, grid)

    chex.clear_trace_counter()
    rng = np.random.default_rng(2)
    # Same shapes, different content and image sizes: no retrace, still exact.
    for segs in ([[3, (1, 4, 8), 4]], [[9, (1, 8, 4)]], [[1, (1, 6, 4), 2, (1, 2, 2)]]):
        ids, mask, _, grid = H.make_inputs(rng, segs, batch_pad=20)
        grid = np.pad(grid, ((0, 2 - len(grid)), (0, 0)), constant_values=2) if len(grid) < 2 else grid
        want = _ours(ids, mask, grid)[0]
        np.testing.assert_array_equal(np.asarray(positions(ids, mask, grid)[0]), np.asarray(want))
