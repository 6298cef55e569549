"""Linear read-outs of a model's image tokens: what the language model could know about a V*-mini scene.

    linear_readout(model, scenes, max_pixels, put, fetch) -> {"position_r2", "small_object_accuracy", "small_object_majority"}

Each merged image token of a scene shown under `max_pixels` covers a square of the original image. Least
squares on the tokens of the first 2/3 of the scenes, scored on the rest, measures (a) whether a token's
grid row / column is linearly readable from its features (R^2, mean of the two) and (b) whether "a small
object's centre lies in this token's square" is (accuracy, against always answering the majority class).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from deepeyes_jax.data import image_processing as ip


def _features(model, scenes, max_pixels: int, put, fetch):
    """-> (float[S, T, D] image tokens, (rows, cols) of the token grid)."""
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda st, pv, grid: nnx.merge(graphdef, st).encode_images(pv, grid))
    feats, grid = [], None
    for sc in scenes:
        pv, g = ip.preprocess_image(sc["image"], min_pixels=1, max_pixels=max_pixels)
        if grid is not None and tuple(g) != grid:
            raise ValueError(f"scenes must share one size; got grids {grid} and {tuple(g)}")
        grid = tuple(int(v) for v in g)
        feats.append(fetch(encode(state, *put((pv, np.asarray([grid], np.int32))))))
    merge = model.config.vision.spatial_merge_size
    return np.stack(feats), (grid[1] // merge, grid[2] // merge)


def _fit_predict(x_fit, y_fit, x_eval):
    design = lambda x: np.concatenate([x, np.ones((len(x), 1))], axis=1)  # noqa: E731
    coef, *_ = np.linalg.lstsq(design(x_fit), y_fit, rcond=None)
    return design(x_eval) @ coef


def linear_readout(model, scenes, max_pixels: int, put, fetch) -> dict:
    if len(scenes) < 3:
        raise ValueError(f"linear_readout needs at least 3 scenes (fit on 2/3, score on 1/3), got {len(scenes)}")
    feats, (rows, cols) = _features(model, scenes, max_pixels, put, fetch)
    s, t, d = feats.shape
    height, width = scenes[0]["image"].shape[:2]
    rc = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1).reshape(t, 2).astype(np.float64)
    small = np.zeros((s, t))
    for i, sc in enumerate(scenes):
        for o in sc["objects"]:
            if o["size"] == "small":
                cx, cy = (o["box"][0] + o["box"][2]) / 2, (o["box"][1] + o["box"][3]) / 2
                small[i, int(cy * rows // height) * cols + int(cx * cols // width)] = 1.0
    n = (2 * s) // 3
    x_fit, x_eval = feats[:n].reshape(-1, d), feats[n:].reshape(-1, d)
    pos_fit, pos_eval = np.tile(rc, (n, 1)), np.tile(rc, (s - n, 1))
    pred = _fit_predict(x_fit, pos_fit, x_eval)
    r2 = 1 - ((pred - pos_eval) ** 2).mean(0) / pos_eval.var(0)
    y_fit, y_eval = small[:n].reshape(-1), small[n:].reshape(-1)
    hit = (_fit_predict(x_fit, y_fit, x_eval) > 0.5) == (y_eval > 0.5)
    return {"position_r2": float(r2.mean()), "small_object_accuracy": float(hit.mean()),
            "small_object_majority": float(max(y_eval.mean(), 1 - y_eval.mean()))}
