"""The base model's first stage: its vision tower taught to see, from dense labels under every image token.

    report = train_tower(model, source, budgets, stage, seed=, put=, fetch=)   # in place; VisionStageConfig
    accuracy = evaluate_tower(model, report["head"], scenes, budgets, put=, fetch=)   # {vision_<head>: accuracy}

A real base model's vision tower comes pretrained; a tiny one trained from scratch through the language
model learns only from the one answer token per example, and its image-selective skills stayed on a
chance plateau for 1600 supervised steps (README: V*-mini diagnosis). Here the tower alone, with a linear
head on each merged image token, learns what lies under that token's square of the original image:

  colour    background / the colour of the object covering most of the square          scenes and crops
  size      background / small / large object                                           scenes and crops
  stripes   no striped tile / the orientation (`world.STRIPES`) of the one there        crops only
  row, col  the token's row and column in the scene's token grid                        scenes only

Scenes are shown under the scene budget, crops (`tasks.crop_window` around a random small object) under
the crop budget, as the rollout shows them. Stripes are not asked of a scene (they average out there) nor
position of a crop. The head is dropped; the supervised stage then teaches the language model to read.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from deepeyes_jax.data import image_processing as ip
from deepeyes_jax.sharding import init_on_mesh
from deepeyes_jax.vstar_mini import base_model, tasks, world

IGNORE = -1
HEADS = (("colour", 1 + len(world.COLOURS)), ("size", 3), ("stripes", 1 + len(world.STRIPES)), ("row", 0),
         ("col", 0))  # row / col: as many classes as the scene's token grid has rows / columns


@dataclasses.dataclass(frozen=True)
class VisionStageConfig:
    steps: int = 600  # 0: no vision stage
    batch: int = 16  # scenes per step, and as many crops
    learning_rate: float = 2e-3
    warmup: int = 20


def grid_of(image_hw, min_pixels: int, max_pixels: int, merge: int = 2) -> tuple[int, int]:
    """(rows, cols) of the merged-token grid of an image of `image_hw` under a pixel budget."""
    h, w = ip.smart_resize(*image_hw, min_pixels=min_pixels, max_pixels=max_pixels)
    return h // ip.PATCH_SIZE // merge, w // ip.PATCH_SIZE // merge


def token_labels(objects, object_map, window, grid, *, scene: bool) -> np.ndarray:
    """int32[rows * cols, len(HEADS)]: each token's label per head (`IGNORE` where a head is not asked), for
    the tokens of the square `window` = (x1, y1, side) of a scene with `objects` (`object_map`: its
    `world.object_map`) shown as a rows x cols token grid. A token's object is the one (or the background)
    covering most of its square."""
    x1, y1, side = window
    rows, cols = grid
    colours, out = list(world.COLOURS), np.full((rows * cols, len(HEADS)), IGNORE, np.int32)
    ys, xs = y1 + np.round(np.arange(rows + 1) * side / rows).astype(int), \
        x1 + np.round(np.arange(cols + 1) * side / cols).astype(int)
    for r in range(rows):
        for c in range(cols):
            under = object_map[ys[r]:ys[r + 1], xs[c]:xs[c + 1]]
            k = int(np.bincount(under.reshape(-1), minlength=len(objects) + 1).argmax())
            o = objects[k - 1] if k else None
            t = r * cols + c
            out[t, 0] = 1 + colours.index(o["colour"]) if o else 0
            out[t, 1] = (1 if o["size"] == "small" else 2) if o else 0
            if scene:
                out[t, 3], out[t, 4] = r, c
            else:
                out[t, 2] = 1 + world.STRIPES.index(o["stripes"]) if o and o["stripes"] else 0
    return out


def _example(scene, rng, budgets: tasks.Budgets):
    """-> (scene patches, crop patches, labels int32[scene tokens + crop tokens, len(HEADS)]) of one scene and a
    zoom-like crop around one of its small objects (half the time jittered, half the grid-snapped zoom box)."""
    image, objects = scene["image"], scene["objects"]
    size = image.shape[0]
    omap = world.object_map(objects, size)
    small = [i for i, o in enumerate(objects) if o["size"] == "small"]
    target = small[int(rng.integers(len(small)))]
    if rng.random() < 0.5:
        window = tasks.crop_window(scene, [target], rng, size)
    else:
        x1, y1, x2, y2 = (int(v) for v in tasks.zoom_box(objects[target]["box"], budgets, size))
        side = min(x2 - x1, y2 - y1)
        window = (x1, y1, side)
    x1, y1, side = window
    scene_pv, scene_grid = ip.preprocess_image(image, min_pixels=1, max_pixels=budgets.scene_max_pixels)
    crop_pv, crop_grid = ip.preprocess_image(image[y1:y1 + side, x1:x1 + side], min_pixels=budgets.crop.min_pixels,
                                             max_pixels=budgets.crop.max_pixels)
    labels = np.concatenate([
        token_labels(objects, omap, (0, 0, size), (scene_grid[1] // 2, scene_grid[2] // 2), scene=True),
        token_labels(objects, omap, window, (crop_grid[1] // 2, crop_grid[2] // 2), scene=False)])
    return scene_pv, scene_grid, crop_pv, crop_grid, labels


def batch(scenes, rng, budgets: tasks.Budgets):
    """`scenes` -> (pixel_values float32[N, 1176], grid_thw int32[2B, 3], labels int32[T, len(HEADS)]): all the
    scenes first, then their crops, in the tower's input order. A crop that the budget's rounding gives another
    grid than a (sqrt max_pixels)^2 square's is drawn again, as the supervised stage skips such examples."""
    side = math.isqrt(budgets.crop.max_pixels)
    want = (1, *(2 * g for g in grid_of((side, side), budgets.crop.min_pixels, budgets.crop.max_pixels)))
    parts = []
    for sc in scenes:
        for _ in range(100):
            part = _example(sc, rng, budgets)
            if tuple(part[3]) == want:
                break
        else:
            raise ValueError(f"vision stage: no crop of a {want} patch grid in 100 draws (rollout.crop budget?)")
        parts.append(part)
    if len({tuple(p[1]) for p in parts}) != 1:
        raise ValueError(f"vision stage: scenes of several sizes {sorted({tuple(p[1]) for p in parts})}")
    pv = np.concatenate([p[0] for p in parts] + [p[2] for p in parts])
    grid = np.array([p[1] for p in parts] + [p[3] for p in parts], np.int32)
    n_scene = int(np.prod(parts[0][1])) // 4
    labels = np.concatenate([p[4][:n_scene] for p in parts] + [p[4][n_scene:] for p in parts])
    return pv, grid, labels


def _head_sizes(budgets: tasks.Budgets, size: int) -> list[int]:
    rows, cols = grid_of((size, size), 1, budgets.scene_max_pixels)
    return [{"row": rows, "col": cols}.get(name, n) for name, n in HEADS]


def _forward(graphdef, state, head, pv, grid, labels, sizes):
    """-> (mean over heads of the masked cross-entropy, {head: accuracy}, {head: count})."""
    feats = nnx.merge(graphdef, state)(pv, grid)
    logits = feats.astype(jnp.float32) @ head["w"] + head["b"][None, :]
    offsets = np.cumsum([0] + sizes)
    losses, acc, count = [], {}, {}
    for k, (name, _) in enumerate(HEADS):
        lg, y = logits[:, offsets[k]:offsets[k + 1]], labels[:, k]
        m = y != IGNORE
        n = jnp.maximum(jnp.sum(m), 1)
        ce = optax.softmax_cross_entropy_with_integer_labels(lg, jnp.maximum(y, 0))
        losses.append(jnp.sum(jnp.where(m, ce, 0.0)) / n)
        acc[name] = jnp.sum(m & (jnp.argmax(lg, -1) == y)) / n
        count[name] = jnp.sum(m)
    return sum(losses) / len(losses), acc, count


def train_tower(model, source, budgets: tasks.Budgets, stage: VisionStageConfig, *, seed: int, put, fetch,
                log_every: int = 50):
    """Train `model.visual` in place on `stage.steps` batches of `source` scenes -> report dict (steps, seconds,
    history of loss and per-head accuracy, and the trained head for `evaluate_tower`)."""
    size = source[0]["image"].shape[0]
    sizes = _head_sizes(budgets, size)
    graphdef, state = nnx.split(model.visual)
    dim = model.config.vision.out_hidden_size
    w = np.random.default_rng([seed, 3]).standard_normal((dim, sum(sizes))) / np.sqrt(dim)
    head = put({"w": w.astype(np.float32), "b": np.zeros((sum(sizes),), np.float32)})
    schedule = optax.warmup_cosine_decay_schedule(0.0, stage.learning_rate, max(stage.warmup, 1),
                                                  max(stage.steps, stage.warmup + 1), stage.learning_rate * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))

    def step(trained, opt_state, pv, grid, labels):
        def loss_fn(trained):
            loss, acc, _ = _forward(graphdef, trained[0], trained[1], pv, grid, labels, sizes)
            return loss, acc
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
        updates, opt_state = tx.update(grads, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state, dict(loss=loss, **acc)

    step = jax.jit(step, donate_argnums=(0, 1))
    trained = (state, head)
    with jax.transfer_guard("allow"):
        opt_state = init_on_mesh(tx.init, trained)
    history, t0 = [], time.perf_counter()
    def make(i):
        rng = np.random.default_rng([seed, 1, i])
        return batch([source[int(j)] for j in rng.integers(len(source), size=stage.batch)], rng, budgets)

    for i, (pv, grid, labels) in enumerate(base_model.prefetch(make, range(stage.steps))):
        trained, opt_state, metrics = step(trained, opt_state, *put((pv, grid, labels)))
        if (i + 1) % log_every == 0 or i + 1 == stage.steps:
            m = {k: round(float(v), 4) for k, v in fetch(metrics).items()}
            history.append(dict(step=i + 1, seconds=round(time.perf_counter() - t0, 1), **m))
            logging.info("vision stage %d/%d: %s", i + 1, stage.steps, m)
    nnx.update(model.visual, trained[0])
    return dict(steps=stage.steps, batch=stage.batch, seconds=round(time.perf_counter() - t0, 1),
                history=history, head=trained[1])


def evaluate_tower(model, head, scenes, budgets: tasks.Budgets, *, put, fetch, batch_size: int = 16,
                   seed: int = 0) -> dict:
    """Held-out accuracy of each head of `model.visual` + `head` on `scenes` (and a seeded crop of each)."""
    sizes = _head_sizes(budgets, scenes[0]["image"].shape[0])
    graphdef, state = nnx.split(model.visual)
    forward = jax.jit(lambda st, h, pv, grid, y: _forward(graphdef, st, h, pv, grid, y, sizes)[1:])
    rng = np.random.default_rng([seed, 2])
    hits = {name: 0.0 for name, _ in HEADS}
    counts = {name: 0 for name, _ in HEADS}
    for start in range(0, len(scenes) - batch_size + 1, batch_size):
        acc, count = fetch(forward(state, head, *put(batch(scenes[start:start + batch_size], rng, budgets))))
        for name, _ in HEADS:
            hits[name] += float(acc[name]) * int(count[name])
            counts[name] += int(count[name])
    return {f"vision_{name}": hits[name] / max(counts[name], 1) for name, _ in HEADS}
