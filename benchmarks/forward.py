"""Jitted forward of our Qwen2.5-VL vs transformers' PyTorch forward, same weights and inputs.

  python -m benchmarks.forward [--presets=tiny,100m] [--batch=4] [--image=448] [--text=64] [--repeats=5]

Needs the test requirements (torch). Both sides run on this machine's CPU in fp32; the
printed ratio is torch time / our time (> 1 means we are faster).
"""

import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.timing import median_seconds  # noqa: E402

from deepeyes_jax.data import image_processing  # noqa: E402
from deepeyes_jax.models import qwen2_5_vl  # noqa: E402
from deepeyes_jax.models.qwen2_5_vl.model import jit_forward  # noqa: E402

flags.DEFINE_list("presets", ["tiny", "100m"], "Model presets to time.")
flags.DEFINE_integer("batch", 4, "Sequences per batch, one image each.")
flags.DEFINE_integer("image", 448, "Side of the square input image in pixels.")
flags.DEFINE_integer("text", 64, "Text tokens per sequence.")
flags.DEFINE_integer("repeats", 5, "Timed runs per side (median reported).")
FLAGS = flags.FLAGS


def _inputs(cfg, batch, image, text, seed=0):
    rng = np.random.default_rng(seed)
    imgs = [rng.integers(0, 256, (image, image, 3), dtype=np.uint8) for _ in range(batch)]
    pv, grid = image_processing.preprocess_images(imgs, max_pixels=image * image)
    n_img = int(grid[0].prod()) // 4
    row = lambda: [cfg.vision_start_token_id, *[cfg.image_token_id] * n_img, cfg.vision_end_token_id,  # noqa: E731
                   *rng.integers(0, 400, text)]
    ids = np.array([row() for _ in range(batch)], np.int64)
    return ids, np.ones_like(ids), pv, grid


def bench(preset, tmp):
    cfg = qwen2_5_vl.get_preset(preset)
    path = os.path.join(tmp, preset)
    os.makedirs(path)
    cfg.save_json(path)
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(transformers.AutoConfig.from_pretrained(path)).eval()
    hf.save_pretrained(path)
    ours = qwen2_5_vl.from_pretrained(path)
    ids, mask, pv, grid = _inputs(cfg, FLAGS.batch, FLAGS.image, FLAGS.text)

    forward = jit_forward(ours)
    t = time.perf_counter()
    got = np.asarray(forward(ids, mask, pv, grid))
    compile_s = time.perf_counter() - t
    ours_ms = 1e3 * median_seconds(lambda _: forward(ids, mask, pv, grid), FLAGS.repeats)[0]

    kw = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
              pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(grid),
              mm_token_type_ids=torch.from_numpy((ids == cfg.image_token_id).astype(np.int64)))
    with torch.no_grad():
        ref = hf(**kw).logits.numpy()
        torch_ms = 1e3 * median_seconds(lambda _: hf(**kw), FLAGS.repeats)[0]
    n_params = sum(p.numel() for p in hf.parameters())
    err = float(np.abs(ref - got).max() / np.abs(ref).max())
    return preset, n_params, ids.shape, pv.shape[0], compile_s, ours_ms, torch_ms, err


def main(argv):
    del argv
    torch.set_num_threads(os.cpu_count())
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), fp32")
    print(f"batch {FLAGS.batch}, one {FLAGS.image}x{FLAGS.image} image + {FLAGS.text} text tokens per row")
    header = f"{'preset':>7} {'params':>8} {'tokens':>10} {'patches':>8} {'compile s':>9} " \
             f"{'ours ms':>8} {'torch ms':>9} {'torch/ours':>10} {'rel err':>8}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for preset in FLAGS.presets:
            name, n, shape, patches, comp, ours_ms, torch_ms, err = bench(preset, tmp)
            print(f"{name:>7} {n / 1e6:7.1f}M {str(tuple(shape)):>10} {patches:>8} {comp:9.2f} "
                  f"{ours_ms:8.1f} {torch_ms:9.1f} {torch_ms / ours_ms:10.2f} {err:8.1e}")


if __name__ == "__main__":
    app.run(main)
