"""The DeepEyes zoom-in observation on device: crop the original image, resize, patchify.

DeepEyes (spec 1.6-1.8) turns an accepted box [x1, y1, x2, y2] (original-image pixels) into an
observation with PIL `crop` (float coordinates rounded by Python round(), half to even), then the
Qwen2-VL processor: smart_resize(factor 28, min_pixels, max_pixels), PIL BICUBIC resize of the
uint8 crop, x * (1/255), CLIP normalise, patchify. Here the same runs in pure JAX with static
shapes (no host callback), jittable and vmappable over rows:

* `smart_resize` (from `smart_resize.py`): equal to the host `image_processing.smart_resize` for
  every input (the host's float64 steps are emulated exactly in integer arithmetic).
* `CropSpec`: static buffer size and pixel budget, and the static sizes derived from them.
* `crop_resize_frames`: image buffer + box -> (uint8 patch frames, grid_thw): what trajectories store
  (8x smaller than the float pixel values); `pixel_values_from_frames` expands them exactly.
* `crop_resize_patchify`: both, -> (pixel_values, grid_thw).

Resize = PIL's separable two-pass fixed-point resampler: per output sample, bicubic (a = -0.5)
taps at t = (x + 0.5 - center) / max(scale, 1) restricted to the crop and renormalised, rounded to
22-bit fixed point; after each pass the sums are rounded and clipped to uint8. Each pass gathers a
band of k source pixels per output sample (k = `CropSpec.taps_hw`, the kernel's support at the
largest scale any accepted box needs: 5-7 for DeepEyes' budget) into a fixed canvas (output
rows/columns beyond the resized size and source pixels outside the crop get zero weight), so the
work is canvas x k per pass, not canvas x buffer. Pillow >= 13 runs the vertical pass first when
the crop loses more than twice as many rows as columns (see `CropSpec`).

Not bit-exact: the tap weights are computed in float32 (PIL: float64) before the 22-bit
rounding, so a weight can be a unit of 2^-22 off and a sum near a rounding boundary lands one
uint8 level off (tests/test_zoom.py measures it; measured on CPU, where float32 division is IEEE;
TPU's approximate division may add a little). The tap sums themselves are PIL's exact int32 sums,
so the result does not depend on how XLA orders or fuses them. Everything after the resize (the
uint8 -> normalised float lookup and the patch order) is exact.

Cost example: DeepEyes' 7B recipe (3072x3072 buffer, 12845056-pixel budget) gives canvas 3080x3080,
7 taps per sample and 48,400 patches: ~0.4 G multiply-adds per crop (the dense-matrix resize this
replaced: 175 G), see `python -m benchmarks.crop`.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from deepeyes_jax.data import image_processing as ip
from deepeyes_jax.rollout.smart_resize import smart_resize

F = ip.FACTOR  # 28: resized sides are multiples of this
P = ip.PATCH_SIZE  # 14

# uint8 value -> normalised float32, per channel, computed exactly like the processor
# (float64 rescale, float32 cast, float32 (x - mean) / std); flattened [3 * 256].
_LUT = (((np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)[None, :]
         - ip.IMAGE_MEAN[:, None]) / ip.IMAGE_STD[:, None]).reshape(-1)


# --- Static sizes --------------------------------------------------------------------------------

def _round_f(n):
    return F * round(n / F)


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """Static crop configuration (hashable; a change recompiles).

    image_height, image_width: the original image is kept on device as a zero-padded
      uint8[image_height, image_width, 3] buffer plus its true (h, w).
    min_pixels, max_pixels: the crop's smart_resize budget (DeepEyes' fetch_image: 3136 and
      12845056; the processor class defaults: 3136 and 1003520).
    max_aspect: DeepEyes' box validation limit on max(h, w) / min(h, w).
    pillow13_order: Pillow >= 13 resizes vertically first when the crop loses more than twice as
      many rows as columns (python-pillow PR 9549); False = always horizontal first (Pillow <= 12,
      what DeepEyes ran). Only changes the uint8 rounding between the passes.

    Derived (all static): `max_patches` bounds grid_h * grid_w for every box DeepEyes accepts
    (closed form, see `max_area`); `canvas_hw` is the exact largest resized (h', w') (a short
    enumeration, cached). The boxes considered: clipped into the true image,
    both float sides > 30, aspect <= max_aspect; PIL's rounding moves each side by at most 1, so
    the integer crop has sides in [30, buffer side] and aspect <= (30 * max_aspect + 1) / 29.
    """

    image_height: int
    image_width: int
    min_pixels: int
    max_pixels: int
    max_aspect: float = 100.0
    pillow13_order: bool = True

    def __post_init__(self):
        for name in ("image_height", "image_width"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 31 <= v <= 46340:
                raise ValueError(f"{name} must be an int in [31, 46340], got {v!r}")
        if not (isinstance(self.min_pixels, int) and isinstance(self.max_pixels, int)
                and 0 < self.min_pixels <= self.max_pixels < 2**31):
            raise ValueError(f"need ints 0 < min_pixels <= max_pixels < 2^31, got "
                             f"{self.min_pixels!r}, {self.max_pixels!r}")
        if not 1 <= self.max_aspect <= 190:  # the crops' aspect must stay within smart_resize's 200
            raise ValueError(f"max_aspect must be in [1, 190], got {self.max_aspect!r}")

    @property
    def crop_aspect_bound(self) -> float:
        """Largest aspect of the integer crop of an accepted box (short side > 30 before rounding)."""
        return (30 * self.max_aspect + 1) / 29

    @property
    def _upscale_aspect(self) -> float:
        """Aspect bound of crops that smart_resize upscales: R(h) R(w) < min_pixels with both
        R >= 28 needs both sides < min_pixels / 28 + 14 (and <= the buffer), both >= 30."""
        longest = min(self.min_pixels / F + P, max(self.image_height, self.image_width))
        return max(1.0, min(self.crop_aspect_bound, longest / 30))

    @functools.cached_property
    def max_area(self) -> int:
        """Upper bound on h' * w' (a multiple of 784), by smart_resize's branch:
        kept: h' * w' <= min(max_pixels, R(H) * R(W)), R(n) = 28 * round(n / 28);
        downscaled: <= max_pixels, or with one side clamped to 28,
          <= 28 * max(28, min(sqrt(A * max_pixels), max(H, W)));
        upscaled (factor b): <= (h b + 28)(w b + 28)
          <= min_pixels + 28 sqrt(min_pixels) (sqrt(Au) + 1/sqrt(Au)) + 784,
        with H x W the buffer, A = crop_aspect_bound, Au = the upscaled crops' aspect bound."""
        a, au, lo, hi = self.crop_aspect_bound, self._upscale_aspect, self.min_pixels, self.max_pixels
        bound = max(min(hi, _round_f(self.image_height) * _round_f(self.image_width)),
                    F * max(F, min(math.sqrt(a * hi), max(self.image_height, self.image_width))),
                    lo + F * math.sqrt(lo) * (math.sqrt(au) + 1 / math.sqrt(au)) + F * F)
        return F * F * math.floor(bound * (1 + 1e-9) / (F * F))

    @property
    def max_patches(self) -> int:
        """Rows of `pixel_values`: max_area / 196 (a multiple of 4)."""
        return self.max_area // (P * P)

    def _max_side(self, n: int, other: int) -> int:
        """Exact max of the resized side along an axis of buffer side n (the other axis: `other`)
        over all crops 30 <= h <= n, 30 <= w <= other, max/min <= A. For a fixed h, smart_resize's
        branch moves from upscale to kept to downscale as w grows (R(h) R(w) does not decrease),
        and within a branch the resized h does not grow with w (every float step is monotone), so
        only the first w of each branch needs evaluating: O(n) host smart_resize calls."""
        a, lo, hi = self.crop_aspect_bound, self.min_pixels, self.max_pixels
        r = [_round_f(v) for v in range(30, other + 1)]  # R(w), non-decreasing
        best = F
        for h in range(30, n + 1):
            w_lo = max(30, math.ceil(h / a) - 1)
            while h > a * w_lo:  # the same float test as max(h, w) <= a * min(h, w)
                w_lo += 1
            w_hi = min(other, math.floor(a * h))
            rh = _round_f(h)
            for w in {w_lo, 30 + bisect.bisect_left(r, -(-lo // rh)), 30 + bisect.bisect_left(r, hi // rh + 1)}:
                w = max(w, w_lo)
                if w <= w_hi:
                    best = max(best, ip.smart_resize(h, w, min_pixels=lo, max_pixels=hi)[0])
        return best

    def _max_scale(self, n: int, other: int) -> float:
        """Largest crop side / resized side along an axis of buffer side n over the same crops as `_max_side`.
        For a fixed h the resized h does not grow with w (within a branch, and from branch to branch: upscaled
        >= kept >= downscaled), so the smallest is at the widest accepted w: O(n) host smart_resize calls."""
        a, lo, hi = self.crop_aspect_bound, self.min_pixels, self.max_pixels
        best = 1.0
        for h in range(30, n + 1):
            w = min(other, math.floor(a * h))
            while w >= 30 and max(h, w) > a * min(h, w):
                w -= 1
            if w >= 30:
                best = max(best, h / ip.smart_resize(h, w, min_pixels=lo, max_pixels=hi)[0])
        return best

    @functools.cached_property
    def taps_hw(self) -> tuple[int, int]:
        """Bicubic taps per output sample along (h, w): the kernel's support, |t| < 2 with t in units of
        max(scale, 1), holds at most ceil(4 max(scale, 1)) source pixels (+1 against float rounding)."""
        return tuple(math.ceil(4 * self._max_scale(n, o) - 1e-9) + 1
                     for n, o in ((self.image_height, self.image_width), (self.image_width, self.image_height)))

    @functools.cached_property
    def canvas_hw(self) -> tuple[int, int]:
        """(Hc, Wc): the resize output canvas, the largest resized (h', w') of any accepted box."""
        return (self._max_side(self.image_height, self.image_width),
                self._max_side(self.image_width, self.image_height))


# --- Crop, resize, patchify -----------------------------------------------------------------------

def _bicubic(t):
    """PIL's bicubic kernel (a = -0.5), same operation order."""
    t = jnp.abs(t)
    near = (1.5 * t - 2.5) * t * t + 1.0
    far = (((t - 5.0) * t + 8.0) * t - 4.0) * -0.5
    return jnp.where(t < 1.0, near, jnp.where(t < 2.0, far, 0.0))


def _taps(start, size, out, n_out, n_src, k):
    """PIL BICUBIC resampling of source [start, start + size) to `out` samples as a band of k taps per output:
    (source index int32[n_out, k], weight int32[n_out, k] in 22-bit fixed point). Zero weight for output rows
    >= out and source pixels outside the crop; each row renormalised over the crop and rounded half away from
    zero like PIL. The band starts at the first pixel inside the kernel's support (|t| < 2), which holds at
    most ceil(4 max(size / out, 1)) pixels (`CropSpec.taps_hw`).

    t = (x + 0.5 - (j + 0.5) * size / out) / max(size / out, 1) is formed as an exact integer ratio, so
    float32 only rounds once before the kernel."""
    j = jnp.arange(n_out, dtype=jnp.int32)[:, None]
    big = jnp.maximum(size, out)
    # First crop-relative x with (2x + 1) out - (2j + 1) size > -4 max(size, out).
    first = ((2 * j + 1) * size - 4 * big - out) // (2 * out) + 1
    x = first + jnp.arange(k, dtype=jnp.int32)[None, :]
    num = (2 * x + 1) * out - (2 * j + 1) * size
    t = num.astype(jnp.float32) / (2 * big).astype(jnp.float32)
    w = jnp.where((x >= 0) & (x < size) & (j < out), _bicubic(t), 0.0)
    total = w[:, :1]
    for i in range(1, k):  # a fixed summation order: a reduce's order (and so a weight's rounding) may vary
        total = total + w[:, i:i + 1]  # with the batch's vectorisation
    w = w / jnp.where(total == 0, 1.0, total)
    fixed = (jnp.sign(w) * jnp.floor(jnp.abs(w) * 2.0**22 + 0.5)).astype(jnp.int32)
    return jnp.clip(start + x, 0, n_src - 1), fixed


def _pass(taps, x, axis):
    """Resample `axis` of x int32[..., n_src, ...] (values 0..255) with taps (index, fixed-point weight)
    [n_out, k]: PIL's integer sum, (sum_k w * x[idx] + 2^21) >> 22 clipped to [0, 255]. Exact (|sum| < 2^31)."""
    index, weight = taps
    shape = [1] * x.ndim
    shape[axis] = index.shape[0]
    out = jnp.int32(1 << 21)
    for i in range(index.shape[1]):  # k is small and static: k gathers, no [.., n_out, k, ..] intermediate
        out = out + weight[:, i].reshape(shape) * jnp.take(x, index[:, i], axis=axis)
    return jnp.clip(out >> 22, 0, 255)


def pixel_values_from_frames(frames):
    """uint8[..., 588] patch frames -> the processor's float32[..., 1176] (its normalisation, repeated along T)."""
    values = frames.astype(jnp.int32).reshape(*frames.shape[:-1], 3, P * P)
    channel = jnp.arange(3, dtype=jnp.int32).reshape((1,) * (values.ndim - 2) + (3, 1))
    x = jnp.asarray(_LUT)[channel * 256 + values]
    x = jnp.broadcast_to(x[..., None, :], (*frames.shape[:-1], 3, ip.TEMPORAL_PATCH_SIZE, P * P))
    return x.reshape(*frames.shape[:-1], ip.PATCH_DIM)


def crop_resize_patchify(image, image_hw, bbox, spec: CropSpec):
    """`crop_resize_frames` expanded to pixel values: -> (float32[spec.max_patches, 1176], zero from
    grid_h * grid_w on; grid_thw int32[3])."""
    frames, grid = crop_resize_frames(image, image_hw, bbox, spec)
    valid = jnp.arange(spec.max_patches) < grid[1] * grid[2]
    return jnp.where(valid[:, None], pixel_values_from_frames(frames), 0.0), grid


def crop_resize_frames(image, image_hw, bbox, spec: CropSpec):
    """The zoom observation of one row, as uint8 patch frames.

    image: uint8[Hb, Wb, 3], (Hb, Wb) = (spec.image_height, spec.image_width), zero-padded.
    image_hw: int32[2], the true (h, w); pixels outside it read as 0 (PIL's crop fill).
    bbox: float32[4] [x1, y1, x2, y2] in original-image pixels, already clipped and validated by
      the caller (DeepEyes' rule); each coordinate is rounded half-to-even like PIL's crop.
    Returns (frames uint8[spec.max_patches, 588]: each patch's (C, 14, 14) resized pixels in the processor's
    patch order, rows from grid_h * grid_w on zero; grid_thw int32[3] = (1, h'/14, w'/14)). A box outside the
    contract (e.g. empty) gives garbage with at most max_patches patches.

    Cost: two banded passes of k taps, (Hb*Wc*kw + Hc*Wc*kh) multiply-adds per channel (vertical first:
    Hc*Wb*kh + Hc*Wc*kw); memory ~ Hb*Wb*3 + Hb*Wc*3 + Hc*Wc*3 floats + the output. Under vmap both pass
    orders are evaluated (lax.cond becomes a select).
    """
    hb, wb = spec.image_height, spec.image_width
    hc, wc = spec.canvas_hw
    if image.shape != (hb, wb, 3):
        raise ValueError(f"image must be [{hb}, {wb}, 3] for this CropSpec, got {image.shape}")
    x0, y0, x1, y1 = (jnp.round(bbox[i]).astype(jnp.int32) for i in range(4))
    ch, cw = y1 - y0, x1 - x0
    rh, rw = smart_resize(ch, cw, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    ok = (rh >= F) & (rw >= F) & (rh <= hc) & (rw <= wc)
    ok &= jnp.where(ok, rh * rw, 0) <= spec.max_area
    rh, rw = jnp.where(ok, rh, F), jnp.where(ok, rw, F)

    inside = ((jnp.arange(hb) < image_hw[0])[:, None] & (jnp.arange(wb) < image_hw[1])[None, :])
    img = jnp.where(inside[:, :, None], image.astype(jnp.int32), 0)
    kh, kw = spec.taps_hw
    vertical = _taps(y0, ch, rh, hc, hb, kh)  # [Hc, kh]
    horizontal = _taps(x0, cw, rw, wc, wb, kw)  # [Wc, kw]
    rows = lambda x: _pass(vertical, x, 0)  # noqa: E731
    cols = lambda x: _pass(horizontal, x, 1)  # noqa: E731
    if spec.pillow13_order:
        v_first = (ch - rh > 0) & (ch - rh > 2 * (cw - rw))
        canvas = jax.lax.cond(v_first, lambda: cols(rows(img)), lambda: rows(cols(img)))
    else:
        canvas = rows(cols(img))  # int32[Hc, Wc, 3], 0..255, zero outside (rh, rw)

    # Patch p -> merge window p // 4 (row-major over the (gh/2, gw/2) windows), 2x2 inside it.
    gh, gw = rh // P, rw // P
    p = jnp.arange(spec.max_patches, dtype=jnp.int32)
    win, sub = p // 4, p % 4
    valid = p < gh * gw
    row = jnp.where(valid, (win // (gw // 2)) * 2 + sub // 2, 0)
    col = jnp.where(valid, (win % (gw // 2)) * 2 + sub % 2, 0)
    blocks = canvas.reshape(hc // P, P, wc // P, P, 3).transpose(0, 2, 4, 1, 3)  # [Hc/14, Wc/14, 3, 14, 14]
    frames = blocks[row, col].reshape(spec.max_patches, ip.PATCH_VALUES)  # [max_patches, 3 * 14 * 14]
    frames = jnp.where(valid[:, None], frames, 0).astype(jnp.uint8)
    return frames, jnp.stack([jnp.int32(1), gh, gw])
