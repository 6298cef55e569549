"""The zoom's crop + resize on device: banded taps (`rollout.zoom`) vs the previous dense resize matrices.

  python -m benchmarks.crop [--sides=1024,2048,3072] [--repeats=3]

One row's observation (`zoom.crop_resize_frames`, jitted) for a square image buffer of each side under DeepEyes'
pixel budget (fetch_image: 3136 .. 12845056), box = the whole image (the largest crop: the canvas is filled).
"previous" resized with two dense [canvas, buffer] weight matrices (every output sample weighs every source
pixel, mostly by zero); the banded version gathers `CropSpec.taps_hw` source pixels per output sample. Time is
the median wall time on this CPU, memory the compiled program's temporaries; ratios are previous / banded.
"max diff" is the largest difference between the two canvases in uint8 levels (the same fixed-point weights;
the previous float32 sums could land one level off, the banded int32 sums are PIL's exact ones).
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.timing import median_seconds
from deepeyes_jax.rollout import zoom

flags.DEFINE_list("sides", ["1024", "2048", "3072"], "Square image buffer sides (pixels).")
flags.DEFINE_integer("repeats", 3, "Timed runs per side (median reported).")
FLAGS = flags.FLAGS

MIN_PIXELS, MAX_PIXELS = 3136, 12845056


def _round_clip(s):
    return jnp.clip(jnp.floor(s + 0.5), 0.0, 255.0)


def _dense_weights(start, size, out, n_out, n_src):
    """The previous resize weights: float32[n_out, n_src], the same fixed-point values as `zoom._taps`."""
    j = jnp.arange(n_out, dtype=jnp.int32)[:, None]
    x = jnp.arange(n_src, dtype=jnp.int32)[None, :] - start
    num = (2 * x + 1) * out - (2 * j + 1) * size
    t = num.astype(jnp.float32) / (2 * jnp.maximum(size, out)).astype(jnp.float32)
    w = jnp.where((x >= 0) & (x < size) & (j < out), zoom._bicubic(t), 0.0)
    total = jnp.sum(w, axis=1, keepdims=True)
    w = w / jnp.where(total == 0, 1.0, total)
    return jnp.sign(w) * jnp.floor(jnp.abs(w) * 2.0**22 + 0.5) * 2.0**-22


def _crop(image, image_hw, bbox, spec: zoom.CropSpec):
    """-> (box x0, y0, x1, y1, resized h, w, the buffer int32[Hb, Wb, 3] with pixels outside the image 0)."""
    x0, y0, x1, y1 = (jnp.round(bbox[i]).astype(jnp.int32) for i in range(4))
    rh, rw = zoom.smart_resize(y1 - y0, x1 - x0, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    inside = ((jnp.arange(spec.image_height) < image_hw[0])[:, None]
              & (jnp.arange(spec.image_width) < image_hw[1])[None, :])
    return x0, y0, x1, y1, rh, rw, jnp.where(inside[:, :, None], image.astype(jnp.int32), 0)


def previous_canvas(image, image_hw, bbox, spec: zoom.CropSpec):
    """The previous crop + resize up to the canvas (horizontal pass first; both orders ran under vmap)."""
    (hc, wc), (hb, wb) = spec.canvas_hw, (spec.image_height, spec.image_width)
    x0, y0, x1, y1, rh, rw, img = _crop(image, image_hw, bbox, spec)
    wv, wh = _dense_weights(y0, y1 - y0, rh, hc, hb), _dense_weights(x0, x1 - x0, rw, wc, wb)
    hp = jax.lax.Precision.HIGHEST
    cols = _round_clip(jnp.einsum("oi,mic->moc", wh, img.astype(jnp.float32), precision=hp))
    return _round_clip(jnp.einsum("oi,imc->omc", wv, cols, precision=hp))


def banded_canvas(image, image_hw, bbox, spec: zoom.CropSpec):
    """`zoom.crop_resize_frames`' resize, horizontal pass first, up to the canvas."""
    (hc, wc), (hb, wb) = spec.canvas_hw, (spec.image_height, spec.image_width)
    (kh, kw), (x0, y0, x1, y1, rh, rw, img) = spec.taps_hw, _crop(image, image_hw, bbox, spec)
    cols = zoom._pass(zoom._taps(x0, x1 - x0, rw, wc, wb, kw), img, 1)
    return zoom._pass(zoom._taps(y0, y1 - y0, rh, hc, hb, kh), cols, 0)


def measure(fn, args, repeats):
    jitted = jax.jit(fn, static_argnames="spec")
    temp = jitted.lower(*args[:3], spec=args[3]).compile().memory_analysis().temp_size_in_bytes
    seconds, out = median_seconds(lambda i: jitted(*args[:3], spec=args[3]), repeats)
    return seconds, temp, np.asarray(out)


def main(argv):
    del argv
    print(f"{'buffer':<12}{'canvas':<12}{'taps':<8}{'previous s':>11}{'banded s':>10}{'time x':>8}"
          f"{'previous MiB':>14}{'banded MiB':>12}{'memory x':>10}{'max diff':>10}")
    rng = np.random.default_rng(0)
    for side in map(int, FLAGS.sides):
        spec = zoom.CropSpec(image_height=side, image_width=side, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        image = jnp.asarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        args = (image, jnp.array([side, side], jnp.int32), jnp.array([0, 0, side, side], jnp.float32), spec)
        t0, m0, want = measure(previous_canvas, args, FLAGS.repeats)
        t1, m1, got = measure(banded_canvas, args, FLAGS.repeats)
        hc, wc = spec.canvas_hw
        print(f"{side}x{side:<7}{hc}x{wc:<7}{str(spec.taps_hw):<8}{t0:>11.3f}{t1:>10.3f}{t0 / t1:>8.1f}"
              f"{m0 / 2**20:>14.1f}{m1 / 2**20:>12.1f}{m0 / max(m1, 1):>10.1f}{np.abs(got - want).max():>10.0f}",
              flush=True)


if __name__ == "__main__":
    app.run(main)
