"""deepeyes_jax.data.image_processing against transformers' Qwen2VLImageProcessorPil.

Tolerance: pixel_values are compared for exact (bitwise) equality, stricter than the 1e-5
budget. It is achievable because both sides run the same PIL bicubic kernel on the same uint8
image and the same correctly-rounded numpy ops in the same dtypes (float64 rescale, float32
normalise); only the array layout differs, which does not change elementwise results.
"""

import math
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from deepeyes_jax.data import image_processing as ip


def _hf(**kw):
    from transformers import Qwen2VLImageProcessorPil

    # Explicit kwargs, no from_pretrained: nothing touches the hub.
    return Qwen2VLImageProcessorPil(
        min_pixels=kw.get("min_pixels", 56 * 56), max_pixels=kw.get("max_pixels", 28 * 28 * 1280))


def _rand_image(h, w, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    # Smooth gradient plus noise: exercises bicubic overshoot/clipping, not just flat areas.
    yy, xx = np.mgrid[0:h, 0:w]
    base = (127 + 120 * np.sin(yy / 7.0 + seed) * np.cos(xx / 5.0))[..., None]
    arr = np.clip(base + rng.normal(0, 40, (h, w, 4)), 0, 255).astype(np.uint8)
    if mode == "L":
        return PIL.Image.fromarray(arr[..., 0], "L")
    if mode == "LA":
        return PIL.Image.fromarray(arr[..., :2], "LA")
    return PIL.Image.fromarray(arr if mode == "RGBA" else arr[..., :3], mode)


def _assert_matches_hf(images, **kw):
    out = _hf(**kw)(images, return_tensors="np")
    pv, thw = ip.preprocess_images(images if isinstance(images, list) else [images], **kw)
    np.testing.assert_array_equal(thw, out["image_grid_thw"])
    assert thw.dtype == np.int64 and pv.dtype == np.float32
    assert pv.shape == out["pixel_values"].shape
    np.testing.assert_array_equal(pv, out["pixel_values"])  # bitwise; see module docstring


@pytest.mark.parametrize(
    "h,w,kw",
    [
        (10, 10, {}),  # upscaled to min_pixels
        (30, 17, {}),
        (300, 500, {}),
        (333, 777, {}),
        (1000, 37, {}),
        (1200, 900, {}),  # 1.08M px > default max: downscaled
        (2000, 1500, {"max_pixels": 256 * 28 * 28}),
        (1500, 2000, {"max_pixels": 64 * 28 * 28}),
        (57, 3000, {"max_pixels": 100 * 28 * 28}),
        (64, 48, {"min_pixels": 256 * 28 * 28, "max_pixels": 512 * 28 * 28}),
        (481, 640, {"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28}),
        (224, 224, {"min_pixels": 224 * 224, "max_pixels": 224 * 224}),  # already on the grid
        (28, 28, {"min_pixels": 28 * 28, "max_pixels": 28 * 28}),  # smallest possible: 2x2 grid
    ],
)
def test_matches_hf_rgb(h, w, kw):
    img = _rand_image(h, w, seed=h * 7919 + w)
    _assert_matches_hf(img, **kw)
    # The uint8 HWC array path must equal the PIL path.
    pv_arr, thw_arr = ip.preprocess_image(np.asarray(img), **kw)
    pv_pil, thw_pil = ip.preprocess_image(img, **kw)
    np.testing.assert_array_equal(thw_arr, thw_pil)
    np.testing.assert_array_equal(pv_arr, pv_pil)
    assert pv_pil.shape == (int(np.prod(thw_pil)), 1176)


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA"])
def test_matches_hf_other_modes(mode):
    _assert_matches_hf(_rand_image(123, 301, seed=5, mode=mode))


def test_rgba_alpha_is_composited_onto_white():
    # Fully transparent black must become white, not black (plain convert("RGB") would give black).
    img = PIL.Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    pv, _ = ip.preprocess_image(img)
    white = (1.0 - ip.IMAGE_MEAN) / ip.IMAGE_STD
    np.testing.assert_allclose(pv.reshape(-1, 3, 2 * 14 * 14), np.broadcast_to(
        white[None, :, None], (16, 3, 2 * 14 * 14)), rtol=0, atol=1e-6)
    _assert_matches_hf(img)


def test_palette_with_transparency_matches_hf():
    img = _rand_image(90, 70, seed=3).convert("P")
    img.info["transparency"] = 0
    _assert_matches_hf(img)


def test_preprocess_images_concat_matches_hf_list():
    imgs = [_rand_image(300, 500, 1), _rand_image(30, 17, 2, "L"), _rand_image(333, 777, 3, "RGBA"),
            _rand_image(1000, 37, 4)]
    _assert_matches_hf(imgs)
    _assert_matches_hf(imgs, min_pixels=8 * 28 * 28, max_pixels=96 * 28 * 28)
    pv, thw = ip.preprocess_images(imgs)
    assert thw.shape == (4, 3)
    offsets = np.cumsum([0] + [int(np.prod(g)) for g in thw])
    for i, img in enumerate(imgs):
        np.testing.assert_array_equal(pv[offsets[i]:offsets[i + 1]], ip.preprocess_image(img)[0])


def test_smart_resize_matches_hf_random():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        smart_resize as hf_smart_resize,
    )

    rng = np.random.default_rng(0)
    n_err = 0
    for _ in range(5000):
        # Log-uniform sides so tiny, huge and extreme-aspect cases all occur.
        h, w = (int(v) for v in np.exp(rng.uniform(0, math.log(20000), 2)))
        lo = int(np.exp(rng.uniform(math.log(28 * 28), math.log(2000 * 28 * 28))))
        hi = lo + int(rng.integers(0, 3000 * 28 * 28))
        try:
            want = hf_smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
        except ValueError:
            n_err += 1
            with pytest.raises(ValueError, match=f"height={h}, width={w}"):
                ip.smart_resize(h, w, min_pixels=lo, max_pixels=hi)
            continue
        got = ip.smart_resize(h, w, min_pixels=lo, max_pixels=hi)
        assert got == want, (h, w, lo, hi)
        assert got[0] % 28 == 0 and got[1] % 28 == 0 and got[0] >= 28 and got[1] >= 28
    assert 100 < n_err < 2500  # the aspect-ratio branch was really exercised both ways
    # Boundaries where the rounded area equals a limit exactly: no rescale on either side.
    assert ip.smart_resize(50, 60) == hf_smart_resize(50, 60) == (56, 56)
    assert ip.smart_resize(900, 1115) == hf_smart_resize(900, 1115) == (896, 1120)
    assert ip.smart_resize(10, 2000) == hf_smart_resize(10, 2000)  # ratio exactly 200 is allowed
    with pytest.raises(ValueError, match="height=10, width=2001"):
        ip.smart_resize(10, 2001)


@pytest.mark.parametrize("h,w", [(0, 10), (10, 0), (-5, 10)])
def test_smart_resize_rejects_non_positive(h, w):
    with pytest.raises(ValueError, match=f"height={h}, width={w}"):
        ip.smart_resize(h, w)


def test_patchify_matches_hf_and_roundtrips():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 84, 140)).astype(np.float32)
    p = ip.patchify(x)
    ref, gh, gw = _hf().patchify(x, patch_size=14, merge_size=2, temporal_patch_size=2)
    np.testing.assert_array_equal(p, ref)
    assert p.shape == (6 * 10, 1176) and (gh, gw) == (6, 10)
    # Row 1 is the patch right of row 0 (same 2x2 window); row 2 is the patch below row 0.
    np.testing.assert_array_equal(p[1].reshape(3, 2, 14, 14)[:, 0], x[:, 0:14, 14:28])
    np.testing.assert_array_equal(p[2].reshape(3, 2, 14, 14)[:, 1], x[:, 14:28, 0:14])
    frames = ip.patch_frames(x)
    np.testing.assert_array_equal(frames, p.reshape(60, 3, 2, 196)[:, :, 0].reshape(60, 588))
    np.testing.assert_array_equal(ip.image_from_frames(frames, (1, 6, 10)), x.transpose(1, 2, 0))
    for bad_grid in [(1, 6, 12), (1, 3, 20), (2, 6, 10)]:  # too few frames, odd grid, t != 1
        with pytest.raises(ValueError, match="grid_thw"):
            ip.image_from_frames(frames, bad_grid)
    with pytest.raises(ValueError, match=r"image_chw.*\(3, 84, 130\)"):
        ip.patchify(x[:, :, :130])


def test_num_image_tokens():
    _, thw = ip.preprocess_image(_rand_image(300, 500, 0))
    assert ip.num_image_tokens(thw) == int(np.prod(thw)) // 4
    assert ip.num_image_tokens(np.array([1, 6, 4])) == 6
    assert ip.num_image_tokens((1, 36, 52)) == 468


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((32, 32, 4), np.uint8), r"uint8\[32, 32, 4\]"),
        (np.zeros((32, 32), np.uint8), r"uint8\[32, 32\]"),
        (np.zeros((32, 32, 3), np.float32), r"float32\[32, 32, 3\]"),
        (np.zeros((0, 32, 3), np.uint8), r"uint8\[0, 32, 3\]"),
        (PIL.Image.new("RGB", (0, 5)), r"\(0, 5\)"),
    ],
)
def test_bad_inputs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        ip.preprocess_image(bad)


def test_bad_args_raise():
    with pytest.raises(TypeError, match="list"):
        ip.preprocess_image([[0, 0, 0]])
    with pytest.raises(ValueError, match="images"):
        ip.preprocess_images([])
    with pytest.raises(ValueError, match="max_pixels"):
        ip.preprocess_image(_rand_image(40, 40, 0), min_pixels=1000, max_pixels=999)


def test_module_does_not_import_torch_or_transformers():
    code = ("import sys, deepeyes_jax.data.image_processing; "
            "bad = [m for m in ('torch', 'transformers', 'jax') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
