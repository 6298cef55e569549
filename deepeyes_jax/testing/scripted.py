"""A tiny Qwen2.5-VL fitted to scripted DeepEyes trajectories, so rollout tests see real multi-turn
behaviour (zooms, an invalid call, answers) from a model of the real architecture.

The trajectories are built on the host the way DeepEyes builds them (prompt, turns, observations
with PIL crops through the Hugging Face processor rules), the model memorises the assistant
turns by teacher forcing, and the compiled rollout must then reproduce them on its own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import PIL.Image
from flax import nnx

from deepeyes_jax.data import chat, image_processing
from deepeyes_jax.data.tokenizer import build_tokenizer
from deepeyes_jax.models.qwen2_5_vl import Qwen2_5_VL
from deepeyes_jax.rollout import tools
from deepeyes_jax.rollout.config import RolloutConfig, make_templates
from deepeyes_jax.rollout.inputs import make_batch
from deepeyes_jax.rollout.zoom import CropSpec
from deepeyes_jax.testing.factory import tiny_config

IMAGE_HW = (168, 224)
PROMPT_PIXELS = 168 * 224
CROP_MIN, CROP_MAX = 56 * 56, 112 * 112


def call(box):
    return ('<think>I need a closer look.</think>\n<tool_call>\n{"name": "image_zoom_in_tool", '
            f'"arguments": {{"bbox_2d": {list(box)}}}}}\n</tool_call>')


# (question, assistant turns). Row 1's first box is too small (sides must exceed 30 px).
SCRIPTS = [
    ("What colour is the cup?", [call((10, 20, 120, 100)), call((50, 40, 200, 160)), "<answer>A</answer>"]),
    ("Where is the dog?", [call((0, 0, 10, 10)), call((30, 30, 150, 150)), "<answer>B</answer>"]),
    ("Is there a sign?", ["<think>It is visible.</think>  <answer>C</answer>"]),
]
EXPECTED_ZOOMS = [2, 1, 0]


def images(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in SCRIPTS:
        yy, xx = np.mgrid[0:IMAGE_HW[0], 0:IMAGE_HW[1]]
        img = np.stack([yy, xx, (yy + xx) // 2], -1).astype(np.float64)
        out.append(np.clip(img + rng.normal(0, 30, img.shape), 0, 255).astype(np.uint8))
    return out


class Setup:
    def __init__(self, scripts=SCRIPTS):
        self.scripts = scripts
        self.tokenizer = tok = build_tokenizer(vocab_size=1024)
        self.config = tiny_config(tok, width=128, vision_width=64)
        self.templates = make_templates(tok)
        self.table = tools.token_bytes(tok)
        self.crop = CropSpec(image_height=IMAGE_HW[0], image_width=IMAGE_HW[1], min_pixels=CROP_MIN,
                             max_pixels=CROP_MAX)
        self.images = images()[:len(scripts)] if len(scripts) <= len(SCRIPTS) else images() * len(scripts)
        self.batch = self.make_batch(range(len(scripts)))

    def make_batch(self, rows):
        """Static-shape rollout inputs for the given script rows (repeats allowed)."""
        rows = list(rows)
        return make_batch(self.tokenizer, [chat.deepeyes_prompt(self.scripts[r][0]) for r in rows],
                          [self.images[r % len(self.images)]
                          for r in rows], prompt_len=448, num_patches=192, image_hw=IMAGE_HW, max_pixels=PROMPT_PIXELS)

    def rollout_config(self, **kw):
        kw = {"max_total_len": 768, "max_turns": 4, "max_turn_tokens": 64, "temperature": 0.0, **kw}
        return RolloutConfig(crop=self.crop, **kw)

    def trajectory(self, row):
        """Host-built trajectory of script `row`: token ids, loss mask, images in order."""
        tok, tpl = self.tokenizer, self.templates
        valid = self.batch.prompt_mask[row].astype(bool)
        ids = self.batch.prompt_ids[row][valid].tolist()
        loss = [False] * len(ids)
        pixels = [self.batch.pixel_values[row][:int(np.prod(self.batch.image_grid_thw[row]))]]
        grids = [self.batch.image_grid_thw[row]]
        turns = self.scripts[row][1]
        for t, text in enumerate(turns):
            turn = tok.encode(text, add_special_tokens=False) + [tpl.im_end]
            ids += turn
            loss += [True] * len(turn)
            if t == len(turns) - 1:
                break
            parsed = tools.parse_turn(text, image_width=IMAGE_HW[1], image_height=IMAGE_HW[0], tokenizer=tok)
            if parsed["status"] == "zoom":
                x1, y1, x2, y2 = (round(v) for v in parsed["bbox"])
                crop = PIL.Image.fromarray(self.images[row % len(self.images)]).crop((x1, y1, x2, y2))
                pv, grid = image_processing.preprocess_image(crop, min_pixels=CROP_MIN, max_pixels=CROP_MAX)
                pixels.append(pv)
                grids.append(grid)
                obs = (list(tpl.zoom_prefix) + [tpl.image_pad] * image_processing.num_image_tokens(grid)
                       + list(tpl.zoom_suffix))
            else:
                kind = {name: k for k, name in tools.ERROR_NAMES.items()}[parsed["error"]]
                obs = list(tpl.errors[kind])
            ids += obs
            loss += [False] * len(obs)
        return np.array(ids), np.array(loss), pixels, grids


def packed(rows):
    """Right-padded ids/mask/loss and the images of all rows packed in order of appearance."""
    length = max(len(r[0]) for r in rows)
    ids = np.zeros((len(rows), length), np.int32)
    mask, loss = np.zeros_like(ids), np.zeros(ids.shape, bool)
    for i, (r_ids, r_loss, _, _) in enumerate(rows):
        ids[i, :len(r_ids)], mask[i, :len(r_ids)], loss[i, :len(r_ids)] = r_ids, 1, r_loss
    pixels = np.concatenate([p for r in rows for p in r[2]])
    grids = np.stack([g for r in rows for g in r[3]]).astype(np.int32)
    return ids, mask, loss, pixels, grids


MARGIN = 1.0  # logits: the scripted token's lead over the runner-up, so greedy decoding never rests on a near-tie


def fit(setup: Setup, *, steps: int = 600, until_exact: bool = True, seed: int = 0):
    """A model trained by teacher forcing on the setup's scripted trajectories.

    until_exact: stop once every assistant token is the argmax by at least `MARGIN` (and insist on it): argmax
    alone stopped at near-ties, which the rollout's KV-cached decoding (another summation order) flipped on
    another CPU; otherwise train `steps` steps (for scripts that disagree on purpose, e.g. a 50/50 answer).
    """
    model = Qwen2_5_VL(setup.config, rngs=nnx.Rngs(seed))
    ids, mask, loss, pixels, grids = packed([setup.trajectory(r) for r in range(len(setup.scripts))])
    target, weight = ids[:, 1:], loss[:, 1:]
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        def loss_fn(model):
            logits = model(ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids)[:, :-1]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, target)
            wanted = jnp.take_along_axis(logits, target[..., None], -1)[..., 0]
            runner_up = jnp.max(jnp.where(jax.nn.one_hot(target, logits.shape[-1], dtype=bool), -jnp.inf, logits), -1)
            margin = jnp.min(jnp.where(weight, wanted - runner_up, jnp.inf))
            return jnp.sum(ce * weight) / weight.sum(), margin
        (value, margin), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return value, margin

    for step in range(steps):
        _, margin = train_step(model, optimizer)
        if until_exact and step % 20 == 19 and float(margin) >= MARGIN:
            break
    if until_exact:
        assert float(margin) >= MARGIN, f"scripted policy did not memorise its turns (smallest margin {float(margin)})"
    return model


@functools.lru_cache(maxsize=1)
def fitted():
    """(Setup, model) with the scripted assistant turns memorised (greedy accuracy 100%)."""
    setup = Setup()
    return setup, fit(setup)
