"""Qwen2.5-VL on a generated example, end to end on the device mesh.

Builds (or loads) a Hugging Face checkpoint, loads it sharded onto the mesh, preprocesses a
generated image on the host, runs the compiled forward, and checks that our saved
checkpoint reloads to the same logits.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from deepeyes_jax.data import image_processing
from deepeyes_jax.models import qwen2_5_vl
from deepeyes_jax.models.qwen2_5_vl.model import jit_forward
from deepeyes_jax.sharding import make_mesh

config_flags.DEFINE_config_file("config", "configs/qwen2_5_vl.py", "Run configuration.", lock_config=True)
flags.DEFINE_string("workdir", "runs/run_model", "Where checkpoints are written.")
FLAGS = flags.FLAGS


def generated_image(height: int, width: int, seed: int) -> np.ndarray:
    """uint8[H, W, 3]: a smooth background with a few coloured rectangles."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([yy * 255 // height, xx * 255 // width, np.full_like(yy, 96)], -1).astype(np.uint8)
    for _ in range(6):
        h, w = rng.integers(8, height // 3), rng.integers(8, width // 3)
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        img[y:y + h, x:x + w] = rng.integers(0, 256, 3)
    return img


def example_batch(cfg, model_cfg, seed):
    """Left-padded token ids around one image block per row, as the HF processor lays them out."""
    rng = np.random.default_rng(seed)
    ex = cfg.example
    pixel_values, grid = image_processing.preprocess_images(
        [generated_image(ex.image_height, ex.image_width, seed + i) for i in range(ex.batch)],
        max_pixels=ex.max_pixels)
    n_img = grid.prod(axis=1) // model_cfg.vision.merge_unit
    specials = {model_cfg.image_token_id, model_cfg.video_token_id,
                model_cfg.vision_start_token_id, model_cfg.vision_end_token_id}
    text_vocab = np.setdiff1d(np.arange(min(model_cfg.text.vocab_size, 4096)), list(specials))
    rows = []
    for i in range(ex.batch):
        pre, post = rng.choice(text_vocab, 3 + i), rng.choice(text_vocab, ex.text_tokens)
        rows.append([*pre, model_cfg.vision_start_token_id, *[model_cfg.image_token_id] * n_img[i],
                     model_cfg.vision_end_token_id, *post])
    length = max(map(len, rows))
    ids = np.zeros((ex.batch, length), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    return ids, mask, pixel_values, grid.astype(np.int32)


def main(argv):
    del argv
    cfg = FLAGS.config
    jax.config.update("jax_transfer_guard", "disallow")
    dtype, compute = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)

    # ------------------------------------------------------------------ Set up mesh
    mesh = make_mesh(cfg.mesh)
    logging.info("mesh %s over %d %s devices", dict(mesh.shape), mesh.size, jax.devices()[0].platform)

    # ------------------------------------------------------------------ Model
    checkpoint = cfg.checkpoint
    if not checkpoint:
        checkpoint = os.path.join(FLAGS.workdir, f"random_{cfg.model}")
        if not os.path.exists(os.path.join(checkpoint, "config.json")):
            model_cfg = qwen2_5_vl.get_preset(cfg.model, param_dtype=dtype, dtype=compute)
            with jax.transfer_guard("allow"):
                qwen2_5_vl.save_pretrained(qwen2_5_vl.Qwen2_5_VL(model_cfg, rngs=nnx.Rngs(cfg.seed)), checkpoint)
    model = qwen2_5_vl.from_pretrained(checkpoint, dtype=dtype, compute_dtype=compute, mesh=mesh,
                                       axis_rules=cfg.axis_rules)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    logging.info("loaded %s: %.1fM parameters", checkpoint, n_params / 1e6)

    # ------------------------------------------------------------------ Input
    inputs = example_batch(cfg, model.config, cfg.seed)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    inputs = jax.device_put(inputs, replicated)

    # ------------------------------------------------------------------ Forward
    forward = jit_forward(model)
    t0 = time.perf_counter()
    logits = forward(*inputs).block_until_ready()
    t1 = time.perf_counter()
    logits = forward(*inputs).block_until_ready()
    t2 = time.perf_counter()
    last = jax.device_get(logits)[:, -1]
    shifted = last - last.max(-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    print(f"input_ids {tuple(inputs[0].shape)}  pixel_values {tuple(inputs[2].shape)}  "
          f"image_grid_thw {jax.device_get(inputs[3]).tolist()}")
    print(f"logits {tuple(logits.shape)} sharded {logits.sharding.spec}; "
          f"compile+run {t1 - t0:.2f}s, run {1e3 * (t2 - t1):.1f} ms")
    for i, row in enumerate(logprobs):
        top = np.argsort(row)[::-1][:5]
        print(f"row {i} next-token top-5: " + ", ".join(f"{t}:{row[t]:.2f}" for t in top))

    # ------------------------------------------------------------------ Round trip
    export = os.path.join(FLAGS.workdir, "export")
    qwen2_5_vl.save_pretrained(model, export)
    again = jit_forward(qwen2_5_vl.from_pretrained(export, dtype=dtype, compute_dtype=compute, mesh=mesh,
                                                   axis_rules=cfg.axis_rules))(*inputs)
    diff = float(np.abs(jax.device_get(again) - jax.device_get(logits)).max())
    print(f"saved to {export} and reloaded: max |logits difference| = {diff:.3g}")
    if diff != 0.0:
        raise SystemExit("reloaded checkpoint gives different logits")


if __name__ == "__main__":
    app.run(main)
