"""The zoom's crop + resize on device as the rollout runs it (a jitted vmap over rows): ours
(`zoom.crop_resize_frames`: one banded pass over the buffer in a square working frame, vertical-first crops
transposed, then the second pass only at the output's own pixels) vs the previous banded version (both passes over
the whole canvas, for both pass orders: under vmap the order's `lax.cond` is a select; then the patch gather).

  python -m benchmarks.crop [--specs=vstar_mini,1024,3072] [--rows=4] [--repeats=3]

"vstar_mini": its 448x448 buffer and 224x224 crop budget (the canvas is 868x868 because DeepEyes accepts boxes
of aspect up to 100); a number: a square buffer of that side under DeepEyes' pixel budget (fetch_image: 3136 ..
12845056). Boxes: seeded random boxes DeepEyes accepts, the same for both. Time is the median wall time on this
CPU, memory the compiled program's temporaries; ratios are previous / ours. "max diff" is the largest difference
between the two programs' patch frames in uint8 levels (0: the same integers, PIL's exact fixed-point sums).
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.timing import median_seconds
from deepeyes_jax.data import image_processing as ip
from deepeyes_jax.rollout import zoom

flags.DEFINE_list("specs", ["vstar_mini", "1024", "3072"], "vstar_mini, or square buffer sides (DeepEyes' budget).")
flags.DEFINE_integer("rows", 4, "Rows per call (vmapped, as in the rollout).")
flags.DEFINE_integer("repeats", 3, "Timed runs per spec (median reported).")
FLAGS = flags.FLAGS

MIN_PIXELS, MAX_PIXELS = 3136, 12845056


def _pass(taps, x, axis):
    """The previous passes: resample `axis` of x int32 with taps [n_out, k], k unrolled gathers (PIL's sum)."""
    index, weight = taps
    shape = [1] * x.ndim
    shape[axis] = index.shape[0]
    out = jnp.int32(1 << 21)
    for i in range(index.shape[1]):
        out = out + weight[:, i].reshape(shape) * jnp.take(x, index[:, i], axis=axis)
    return jnp.clip(out >> 22, 0, 255)


def previous_frames(image, image_hw, bbox, spec: zoom.CropSpec):
    """The previous `crop_resize_frames`: two banded passes over the whole (Hc, Wc) canvas in each order."""
    hb, wb = spec.image_height, spec.image_width
    hc, wc = spec.canvas_hw
    x0, y0, x1, y1 = (jnp.round(bbox[i]).astype(jnp.int32) for i in range(4))
    ch, cw = y1 - y0, x1 - x0
    rh, rw = zoom.smart_resize(ch, cw, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    ok = (rh >= zoom.F) & (rw >= zoom.F) & (rh <= hc) & (rw <= wc)
    ok &= jnp.where(ok, rh * rw, 0) <= spec.max_area
    rh, rw = jnp.where(ok, rh, zoom.F), jnp.where(ok, rw, zoom.F)
    inside = ((jnp.arange(hb) < image_hw[0])[:, None] & (jnp.arange(wb) < image_hw[1])[None, :])
    img = jnp.where(inside[:, :, None], image.astype(jnp.int32), 0)
    kh, kw = spec.taps_hw
    rows = lambda x: _pass(zoom._taps(y0, ch, rh, hc, hb, kh), x, 0)  # noqa: E731
    cols = lambda x: _pass(zoom._taps(x0, cw, rw, wc, wb, kw), x, 1)  # noqa: E731
    v_first = (ch - rh > 0) & (ch - rh > 2 * (cw - rw))
    canvas = jax.lax.cond(v_first, lambda: cols(rows(img)), lambda: rows(cols(img)))
    gh, gw, p = rh // zoom.P, rw // zoom.P, jnp.arange(spec.max_patches, dtype=jnp.int32)
    win, sub, valid = p // 4, p % 4, p < gh * gw
    row = jnp.where(valid, (win // (gw // 2)) * 2 + sub // 2, 0)
    col = jnp.where(valid, (win % (gw // 2)) * 2 + sub % 2, 0)
    blocks = canvas.reshape(hc // zoom.P, zoom.P, wc // zoom.P, zoom.P, 3).transpose(0, 2, 4, 1, 3)
    frames = blocks[row, col].reshape(spec.max_patches, ip.PATCH_VALUES)
    return jnp.where(valid[:, None], frames, 0).astype(jnp.uint8)


def _spec(name: str) -> zoom.CropSpec:
    if name == "vstar_mini":
        return zoom.CropSpec(image_height=448, image_width=448, min_pixels=224 * 224, max_pixels=224 * 224)
    side = int(name)
    return zoom.CropSpec(image_height=side, image_width=side, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def _boxes(spec: zoom.CropSpec, n: int, rng) -> np.ndarray:
    """n boxes DeepEyes accepts (both sides > 30, aspect <= spec.max_aspect), whole pixels and float ones."""
    out = []
    while len(out) < n:
        x, y = np.sort(rng.uniform(0, spec.image_width, 2)), np.sort(rng.uniform(0, spec.image_height, 2))
        w, h = x[1] - x[0], y[1] - y[0]
        if min(w, h) > 30 and max(w, h) / min(w, h) <= spec.max_aspect:
            out.append([x[0], y[0], x[1], y[1]])
    return np.asarray(out, np.float32)


def measure(fn, args, repeats):
    jitted = jax.jit(jax.vmap(fn))
    temp = jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes
    seconds, out = median_seconds(lambda i: jitted(*args), repeats)
    return seconds, temp, np.asarray(out)


def main(argv):
    del argv
    print(f"{FLAGS.rows} rows per call\n{'spec':<12}{'canvas':<11}{'taps':<9}{'previous s':>11}{'ours s':>9}"
          f"{'time x':>8}{'previous MiB':>14}{'ours MiB':>10}{'memory x':>10}{'max diff':>10}")
    rng = np.random.default_rng(0)
    for name in FLAGS.specs:
        spec = _spec(name)
        h, w = spec.image_height, spec.image_width
        args = (jnp.asarray(rng.integers(0, 256, (FLAGS.rows, h, w, 3), dtype=np.uint8)),
                jnp.tile(jnp.asarray([[h, w]], jnp.int32), (FLAGS.rows, 1)), jnp.asarray(_boxes(spec, FLAGS.rows, rng)))
        t0, m0, want = measure(lambda im, hw, b, spec=spec: previous_frames(im, hw, b, spec), args, FLAGS.repeats)
        t1, m1, got = measure(lambda im, hw, b, spec=spec: zoom.crop_resize_frames(im, hw, b, spec)[0], args,
                              FLAGS.repeats)
        hc, wc = spec.canvas_hw
        print(f"{name:<12}{f'{hc}x{wc}':<11}{str(spec.taps_hw):<9}{t0:>11.3f}{t1:>9.3f}{t0 / t1:>8.1f}"
              f"{m0 / 2**20:>14.1f}{m1 / 2**20:>10.1f}{m0 / max(m1, 1):>10.1f}"
              f"{np.abs(got.astype(int) - want.astype(int)).max():>10d}", flush=True)


if __name__ == "__main__":
    app.run(main)
