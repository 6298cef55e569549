"""deepeyes_jax.rollout.zoom against the host pipeline: PIL crop + Qwen2VLImageProcessorPil.

Tolerance (pixel values): the device resize is not bit-exact. PIL computes the bicubic tap
weights in float64 before rounding them to 22-bit fixed point and sums taps in exact integers;
the device computes the weights in float32 (about half of the fixed-point weights end up 1-3
units of 2^-22 off), then sums exactly in int32 as PIL does. A sum that lands next to a rounding
boundary then rounds to the other uint8 value, so some values are off by exactly one uint8
level. Measured over every case below: max |diff| = 1.0000076 in 0-255 units (the 7.6e-6 is the
float32 normalisation of two neighbouring levels), 0.0150079 in normalised units
(1 / 255 / min(CLIP std)), at most 0.55% of the values differ (a small upscaled crop, whose few
distinct weights repeat over the whole output; the other cases <= 0.11%). Grids, patch order,
crop rounding, pass order and the normalisation are exact.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from deepeyes_jax.data import image_processing as ip
from deepeyes_jax.rollout import zoom

TOL_255 = 1.0 + 1e-4  # one uint8 level (+ float32 normalisation slack)
TOL_NORM = 0.0151  # one level in normalised units: 1 / 255 / 0.26130258 = 0.0150079
TOL_FRAC = 0.006  # fraction of values allowed to differ (measured <= 0.0056)

SPEC_A = zoom.CropSpec(image_height=200, image_width=260, min_pixels=3136, max_pixels=12000)
IMAGE_A = (180, 240)  # true image inside the larger buffer
SPEC_B = zoom.CropSpec(image_height=48, image_width=3200, min_pixels=3136, max_pixels=12000)
IMAGE_B = (40, 3150)  # wide: boxes near aspect 100
SPEC_C = zoom.CropSpec(image_height=3200, image_width=48, min_pixels=3136, max_pixels=100000)
IMAGE_C = (3150, 40)  # tall

_crop = jax.jit(zoom.crop_resize_patchify, static_argnames="spec")


def _image(h, w, seed):
    """Smooth gradients + noise + sharp edges (saturated stripes and black lines)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([127 + 100 * np.sin(yy / 9 + c) * np.cos(xx / 13 - c) + 0.2 * (xx - yy)
                     for c in range(3)], -1)
    img = base + rng.normal(0, 25, (h, w, 3))
    img[(yy // 17 + xx // 23) % 5 == 0] = 255
    img[yy % 41 < 3] = 0
    return np.clip(img, 0, 255).astype(np.uint8)


def _buffer(img, spec, fill=0):
    buf = np.full((spec.image_height, spec.image_width, 3), fill, np.uint8)
    buf[:img.shape[0], :img.shape[1]] = img
    return buf


def _device(img, box, spec, fill=0):
    pv, grid = _crop(jnp.asarray(_buffer(img, spec, fill)), jnp.asarray(img.shape[:2], jnp.int32),
                     jnp.asarray(box, jnp.float32), spec=spec)
    return np.asarray(pv), np.asarray(grid)


def _reference(img, box, spec):
    crop = PIL.Image.fromarray(img).crop(tuple(float(v) for v in box))
    from transformers import Qwen2VLImageProcessorPil

    out = Qwen2VLImageProcessorPil(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)(
        crop, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"][0]


def _assert_close(pv, grid, ref_pv, ref_grid, spec):
    np.testing.assert_array_equal(grid, ref_grid)
    n = int(np.prod(ref_grid))
    assert pv.shape == (spec.max_patches, ip.PATCH_DIM) and pv.dtype == np.float32
    assert n <= spec.max_patches
    diff = np.abs(pv[:n] - ref_pv)
    std = np.repeat(ip.IMAGE_STD, ip.PATCH_DIM // 3)[None, :]  # channel of each of the 1176 columns
    assert diff.max() <= TOL_NORM, diff.max()
    assert (diff * std * 255).max() <= TOL_255
    assert (diff > 0).mean() <= TOL_FRAC, (diff > 0).mean()
    np.testing.assert_array_equal(pv[n:], 0)


# Boxes are float32-representable, so device and PIL round the same coordinates.
CASES = {
    "A-downscaled-whole-image": (SPEC_A, IMAGE_A, (0, 0, 240, 180)),  # 43200 px > 12000, all borders
    "A-upscaled-half-coords": (SPEC_A, IMAGE_A, (10.5, 20.5, 41.5, 60.5)),  # 32x40 crop < min_pixels
    "A-left-alone": (SPEC_A, IMAGE_A, (5, 7, 61, 91)),  # 84x56: already on the grid, in budget
    "A-float-box": (SPEC_A, IMAGE_A, (3.25, 4.75, 100.375, 90.125)),
    "A-half-coords": (SPEC_A, IMAGE_A, (11.5, 12.5, 150.5, 170.5)),
    "A-corner": (SPEC_A, IMAGE_A, (200, 140, 240, 180)),  # touches right and bottom borders
    "A-vertical-first": (SPEC_A, IMAGE_A, (20, 10, 80, 160)),  # 150x60 -> 140x56: Pillow 13 order
    "A-thin": (SPEC_A, IMAGE_A, (0.5, 100.5, 239.5, 131.5)),
    "B-aspect-100-downscaled": (SPEC_B, IMAGE_B, (0.5, 3.5, 3100.5, 34.5)),  # 3100x30, height clamped
    "B-right-border": (SPEC_B, IMAGE_B, (49, 0, 3150, 40)),
    "C-aspect-100-tall": (SPEC_C, IMAGE_C, (3.5, 0.5, 34.5, 3100.5)),  # 30x3100, kept in budget
    "C-bottom-border": (SPEC_C, IMAGE_C, (0, 49, 40, 3150)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_pil_and_processor(name):
    spec, hw, box = CASES[name]
    img = _image(*hw, seed=len(name))
    pv, grid = _device(img, box, spec)
    _assert_close(pv, grid, *_reference(img, box, spec), spec)


def test_random_boxes_match():
    """Random boxes DeepEyes accepts (integer, .5 and arbitrary float32 coordinates)."""
    rng = np.random.default_rng(0)
    h, w = IMAGE_A
    img = _image(h, w, seed=1)
    n = 0
    while n < 12:
        x = np.sort(rng.uniform(0, w, 2))
        y = np.sort(rng.uniform(0, h, 2))
        box = np.array([x[0], y[0], x[1], y[1]])
        box = [np.round(box), np.floor(box) + 0.5, box][n % 3].astype(np.float32).astype(np.float64)
        bw, bh = box[2] - box[0], box[3] - box[1]
        if min(bw, bh) <= 30 or max(bw, bh) / min(bw, bh) > 100:
            continue
        pv, grid = _device(img, box, SPEC_A)
        _assert_close(pv, grid, *_reference(img, box, SPEC_A), SPEC_A)
        n += 1


def test_padding_is_ignored():
    img = _image(*IMAGE_A, seed=3)
    box = (150, 100, 240, 180)  # touches the image border, next to the padding
    pv0, g0 = _device(img, box, SPEC_A, fill=0)
    pv1, g1 = _device(img, box, SPEC_A, fill=255)
    np.testing.assert_array_equal(g0, g1)
    np.testing.assert_array_equal(pv0, pv1)


def _pil_resize_reference(img, out_w, out_h, vertical_first):
    """Pillow's 8-bit BICUBIC resample in exact integer arithmetic (float64 coefficients), with a
    chosen pass order; validated below against the installed Pillow."""
    def coeffs(n_in, n_out):
        scale = n_in / n_out
        fs = max(scale, 1.0)
        k = np.zeros((n_out, n_in), np.int64)
        for j in range(n_out):
            center = (j + 0.5) * scale
            lo, hi = max(int(center - 2 * fs + 0.5), 0), min(int(center + 2 * fs + 0.5), n_in)
            t = np.abs((np.arange(lo, hi) - center + 0.5) * (1.0 / fs))
            wt = np.where(t < 1, (1.5 * t - 2.5) * t * t + 1,
                          np.where(t < 2, (((t - 5) * t + 8) * t - 4) * -0.5, 0.0))
            wt = wt / wt.sum() * (1 << 22)
            k[j, lo:hi] = np.where(wt < 0, -np.floor(0.5 - wt), np.floor(0.5 + wt))
        return k

    def rows(k, x):
        return np.clip((np.einsum("oi,imc->omc", k, x) + (1 << 21)) >> 22, 0, 255)

    kv, kh = coeffs(img.shape[0], out_h), coeffs(img.shape[1], out_w)
    x = img.astype(np.int64)
    if vertical_first:
        return rows(kh, rows(kv, x).transpose(1, 0, 2)).transpose(1, 0, 2).astype(np.uint8)
    return rows(kv, rows(kh, x.transpose(1, 0, 2)).transpose(1, 0, 2)).astype(np.uint8)


def test_pillow12_pass_order():
    """pillow13_order=False (always horizontal first, the Pillow DeepEyes ran) against the integer
    reference, after checking the reference reproduces the installed Pillow in both orders."""
    spec = dataclasses.replace(SPEC_A, pillow13_order=False)
    img = _image(*IMAGE_A, seed=4)
    for box in [(20, 10, 80, 160), (0, 0, 240, 180), (10.5, 20.5, 41.5, 60.5)]:
        x0, y0, x1, y1 = (round(v) for v in box)
        crop = img[y0:y1, x0:x1]
        rh, rw = ip.smart_resize(y1 - y0, x1 - x0, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
        ch, cw = crop.shape[:2]
        pillow13_vertical = ch - rh > 0 and ch - rh > 2 * (cw - rw)
        pil = np.asarray(PIL.Image.fromarray(crop).resize((rw, rh), PIL.Image.BICUBIC))
        np.testing.assert_array_equal(_pil_resize_reference(crop, rw, rh, pillow13_vertical), pil)
        want = _pil_resize_reference(crop, rw, rh, vertical_first=False)
        want = ((want.astype(np.float64) * (1 / 255)).astype(np.float32) - ip.IMAGE_MEAN) / ip.IMAGE_STD
        pv, grid = _device(img, box, spec)
        _assert_close(pv, grid, ip.patchify(want.transpose(2, 0, 1)), np.array([1, rh // 14, rw // 14]), spec)


def test_jit_traces_once_vmap_and_no_callbacks():
    imgs = [_image(*IMAGE_A, seed=s) for s in (5, 6, 7)]
    bufs = jnp.asarray(np.stack([_buffer(im, SPEC_A) for im in imgs]))
    hws = jnp.asarray([IMAGE_A, (150, 200), IMAGE_A], jnp.int32)
    boxes = jnp.asarray([(0, 0, 240, 180), (20, 10, 80, 160), (10.5, 20.5, 41.5, 60.5)], jnp.float32)

    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def one(image, hw, box):
        return zoom.crop_resize_patchify(image, hw, box, SPEC_A)

    singles = [one(bufs[i], hws[i], boxes[i]) for i in range(3)]  # 3 calls, one trace
    batched = jax.jit(jax.vmap(lambda im, hw, b: zoom.crop_resize_patchify(im, hw, b, SPEC_A)))(
        bufs, hws, boxes)
    for i, (pv, grid) in enumerate(singles):
        np.testing.assert_array_equal(np.asarray(batched[1][i]), np.asarray(grid))
        np.testing.assert_array_equal(np.asarray(batched[0][i]), np.asarray(pv))
    assert len({tuple(np.asarray(g)) for _, g in singles}) == 3  # three different crops

    lowered = jax.jit(lambda im, hw, b: zoom.crop_resize_patchify(im, hw, b, SPEC_A)).lower(
        bufs[0], hws[0], boxes[0])
    hlo = lowered.as_text()
    assert "callback" not in hlo.lower()


def test_out_of_contract_box_is_finite():
    pv, grid = _device(_image(*IMAGE_A, seed=8), (0, 0, 0, 0), SPEC_A)
    assert np.isfinite(pv).all() and int(np.prod(grid)) <= SPEC_A.max_patches


# --- smart_resize -------------------------------------------------------------------------------

def test_smart_resize_matches_host():
    rng = np.random.default_rng(0)
    hs, ws, los, his = [], [], [], []

    def add(h, w, lo, hi):
        hs.extend(h), ws.extend(w), los.extend(lo), his.extend(hi)

    n = 2500
    h = rng.integers(1, 12000, n)
    w = np.clip((h * np.exp(rng.uniform(-5.2, 5.2, n))).astype(np.int64), 1, 20000)
    lo = rng.choice([3136, 56 * 56, 256 * 28 * 28, 100000], n)
    hi = np.maximum(lo, rng.choice([12845056, 1003520, 12000, 200000, 28 * 28 * 4], n))
    add(h, w, lo, hi)
    sq = np.arange(3500, 4300)  # squares: exact ties h / beta / 28 == 128 (float64 decides)
    add(sq, sq, [3136] * len(sq), [12845056] * len(sq))
    small = np.arange(1, 101)  # upscale ties, e.g. 38x38 -> 84x84
    add(small, small, [3136] * 100, [12845056] * 100)
    add(small, small + 17, [3136] * 100, [1003520] * 100)
    thin = rng.integers(1, 60, 300)  # extreme aspect + small budget: a side clamps to 28
    add(thin, thin * rng.integers(100, 200, 300), [784] * 300, rng.integers(784, 4000, 300))
    hs, ws, los, his = (np.asarray(v, np.int64) for v in (hs, ws, los, his))
    keep = np.maximum(hs, ws) / np.minimum(hs, ws) <= 200  # the host raises beyond
    hs, ws, los, his = hs[keep], ws[keep], los[keep], his[keep]

    f = jax.jit(jax.vmap(lambda h, w, lo, hi: zoom.smart_resize(h, w, min_pixels=lo, max_pixels=hi)))
    got = np.stack([np.asarray(v) for v in f(*(jnp.asarray(v, jnp.int32) for v in (hs, ws, los, his)))], 1)
    want = np.array([ip.smart_resize(int(a), int(b), min_pixels=int(c), max_pixels=int(d))
                     for a, b, c, d in zip(hs, ws, los, his)])
    np.testing.assert_array_equal(got, want)
    # The edge cases really occur: float64 ties, and results above max_pixels from clamping.
    exact_math = 28 * 128  # h / beta / 28 is exactly 128 for every square above the budget
    assert any(ip.smart_resize(int(s), int(s), min_pixels=3136, max_pixels=12845056)[0] != exact_math
               for s in sq)
    assert ip.smart_resize(38, 38, min_pixels=3136, max_pixels=12845056) == (84, 84)
    assert (want[:, 0] * want[:, 1] > his).sum() > 50
    assert len(want) > 3000


# --- static bounds --------------------------------------------------------------------------------

def _np_smart_resize(h, w, lo, hi, f=28):
    """Vectorised float64 copy of the host smart_resize (same expressions, same IEEE ops)."""
    hb, wb = np.round(h / f).astype(np.int64) * f, np.round(w / f).astype(np.int64) * f
    beta = np.sqrt((h * w) / hi)
    hd = np.maximum(f, np.floor(h / beta / f).astype(np.int64) * f)
    wd = np.maximum(f, np.floor(w / beta / f).astype(np.int64) * f)
    beta = np.sqrt(lo / (h * w))
    hu, wu = np.ceil(h * beta / f).astype(np.int64) * f, np.ceil(w * beta / f).astype(np.int64) * f
    down, up = hb * wb > hi, hb * wb < lo
    return np.where(down, hd, np.where(up, hu, hb)), np.where(down, wd, np.where(up, wu, wb))


def test_np_smart_resize_is_the_host_one():
    rng = np.random.default_rng(1)
    h, w = rng.integers(30, 5000, 3000), rng.integers(30, 5000, 3000)
    keep = np.maximum(h, w) / np.minimum(h, w) <= 200
    for lo, hi in [(3136, 12000), (3136, 1003520), (100000, 200000)]:
        got = np.stack(_np_smart_resize(h[keep], w[keep], lo, hi), 1)
        want = [ip.smart_resize(int(a), int(b), min_pixels=lo, max_pixels=hi) for a, b in zip(h[keep], w[keep])]
        np.testing.assert_array_equal(got, want)


def test_accepted_boxes_give_crops_in_the_enumerated_set():
    """DeepEyes' acceptance (clip, both float sides > 30, aspect <= 100) followed by PIL's
    rounding gives integer crops with sides in [30, buffer side] and aspect <= (30 A + 1) / 29:
    the set the brute force below enumerates."""
    rng = np.random.default_rng(2)
    for spec, (h, w) in [(SPEC_A, IMAGE_A), (SPEC_B, IMAGE_B), (SPEC_C, IMAGE_C)]:
        n = 0
        while n < 2000:
            c = rng.uniform(-20, [w + 20, h + 20, w + 20, h + 20])
            c = [np.round(c), np.floor(c) + 0.5, c][n % 3]
            x1, y1, x2, y2 = max(0, c[0]), max(0, c[1]), min(w, c[2]), min(h, c[3])
            bw, bh = x2 - x1, y2 - y1
            if not (x1 < x2 and y1 < y2 and min(bw, bh) > 30 and max(bw, bh) / min(bw, bh) <= 100):
                continue
            cw, ch = round(x2) - round(x1), round(y2) - round(y1)
            assert 30 <= ch <= spec.image_height and 30 <= cw <= spec.image_width
            assert max(ch, cw) / min(ch, cw) <= spec.crop_aspect_bound
            n += 1


BOUND_SPECS = [
    (2240, 2240, 3136, 1003520),  # V*-sized buffer, processor-default budget
    (2240, 2240, 3136, 12845056),  # DeepEyes' fetch_image budget
    (200, 260, 3136, 12000),
    (48, 3200, 3136, 12000),  # long sides clamp to 28
    (3200, 48, 3136, 100000),
    (500, 4000, 3136, 40000),
    (1000, 1500, 100000, 200000),  # large min_pixels: upscaled crops
]


@pytest.mark.parametrize("hb,wb,lo,hi", BOUND_SPECS)
def test_static_bounds_brute_force(hb, wb, lo, hi):
    """Every integer crop size an accepted box can produce, through smart_resize: the largest
    resized sides are canvas_hw, grid_h * grid_w <= max_patches (a multiple of 4), and the largest
    downscale per axis gives the resize's taps_hw."""
    spec = zoom.CropSpec(image_height=hb, image_width=wb, min_pixels=lo, max_pixels=hi)
    assert spec.max_patches % 4 == 0 and spec.canvas_hw[0] % 28 == 0 and spec.canvas_hw[1] % 28 == 0
    a = spec.crop_aspect_bound
    w = np.arange(30, wb + 1, dtype=np.int64)
    max_h = max_w = max_area = 0
    scale_h = scale_w = 1.0
    for h0 in range(30, hb + 1, 256):
        h = np.arange(h0, min(h0 + 256, hb + 1), dtype=np.int64)[:, None]
        ok = np.maximum(h, w[None, :]) <= a * np.minimum(h, w[None, :])
        hh, ww = np.broadcast_arrays(h, w[None, :])
        rh, rw = _np_smart_resize(hh[ok], ww[ok], lo, hi)
        if rh.size:
            max_h, max_w, max_area = max(max_h, rh.max()), max(max_w, rw.max()), max(max_area, (rh * rw).max())
            scale_h, scale_w = max(scale_h, (hh[ok] / rh).max()), max(scale_w, (ww[ok] / rw).max())
    assert (max_h, max_w) == spec.canvas_hw  # exact, not just a bound
    assert max_area // 196 <= spec.max_patches
    assert spec.max_patches <= 1.02 * max_area // 196 + 4  # the closed form is tight here
    assert spec.taps_hw == tuple(int(np.ceil(4 * s - 1e-9)) + 1 for s in (scale_h, scale_w))
