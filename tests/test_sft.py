"""Supervised stage: conversation packing matches the rollout's token layout and the model's own forward;
the SFT step learns and compiles once; the V*-mini task mixture teaches abilities, never the composition."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deepeyes_jax.data import image_processing as ip
from deepeyes_jax.data import chat
from deepeyes_jax.data.tokenizer import COMPACT_SYSTEM_PROMPT, build_tokenizer, default_corpus
from deepeyes_jax.models.qwen2_5_vl.model import jit_forward
from deepeyes_jax.rollout import tools
from deepeyes_jax.rollout.config import make_templates
from deepeyes_jax.rollout.inputs import make_batch
from deepeyes_jax.rollout.zoom import CropSpec
from deepeyes_jax.sft.conversation import Ids, Image, Reply, Shapes, Text, pack
from deepeyes_jax.sft.step import make_scorer, make_sft_step
from deepeyes_jax.testing.factory import tiny_model
from deepeyes_jax.vstar_mini import tasks
from deepeyes_jax.vstar_mini import world as vstar_mini
from deepeyes_jax.vstar_mini.base_model import _batches

BUDGETS = tasks.Budgets(112 * 112, CropSpec(448, 448, 112 * 112, 112 * 112), system_prompt=COMPACT_SYSTEM_PROMPT)
SHAPES = Shapes(seq_len=352, prompt_patches=132, crop_patches=132, max_crops=1)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(vocab_size=1024, corpus=default_corpus() + tasks.corpus())


@pytest.fixture(scope="module")
def scenes():
    return [vstar_mini.make_scene(i, seed=3, split="train") for i in range(24)]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer)


def test_prompt_segments_tokenize_like_the_rollout(tokenizer, scenes):
    sc = scenes[0]
    traj = pack(tokenizer, [tasks.prompt(sc["image"], sc["question"], BUDGETS)], SHAPES)
    batch = make_batch(tokenizer, [chat.deepeyes_prompt(sc["question"], COMPACT_SYSTEM_PROMPT)], [sc["image"]],
                       prompt_len=SHAPES.seq_len, num_patches=132, image_hw=(448, 448),
                       max_pixels=BUDGETS.scene_max_pixels)
    n = int(traj.length[0])
    np.testing.assert_array_equal(traj.tokens[0, :n], batch.prompt_ids[0, -n:])
    assert batch.prompt_mask[0].sum() == n
    np.testing.assert_array_equal(traj.prompt_pixel_values[0], batch.pixel_values[0])
    np.testing.assert_array_equal(traj.prompt_grid_thw[0], batch.image_grid_thw[0])
    assert not traj.loss_mask.any()


def test_observation_segments_equal_the_rollout_templates(tokenizer, scenes):
    tpl = make_templates(tokenizer)
    obs = tasks.observation(scenes[0]["image"][:60, :60], BUDGETS)
    head = [Ids((1,)), Image(scenes[0]["image"], 1, BUDGETS.scene_max_pixels)]
    traj = pack(tokenizer, [head + obs], SHAPES)
    n0 = 1 + 2 + 16  # the id, vision start/end and 16 merged tokens of the 112 x 112 scene
    pads = int(np.prod(traj.crop_grid_thw[0, 0])) // 4
    expect = list(tpl.zoom_prefix) + [tpl.image_pad] * pads + list(tpl.zoom_suffix)
    assert traj.tokens[0, n0:traj.length[0]].tolist() == expect


def test_pack_names_the_row_that_does_not_fit(tokenizer, scenes):
    ok = tasks.prompt(scenes[0]["image"], "short", BUDGETS)
    with pytest.raises(ValueError, match="row 1: .* tokens, seq_len is 40"):
        pack(tokenizer, [[Image(scenes[0]["image"][:28, :28], 1, 784)], ok], SHAPES._replace(seq_len=40))
    with pytest.raises(ValueError, match="row 0: more than 2 images"):
        im = Image(scenes[0]["image"][:56, :56], 1, 56 * 56)
        pack(tokenizer, [[im, im, im]], SHAPES)
    with pytest.raises(ValueError, match="row 0: a conversation needs at least one image"):
        pack(tokenizer, [[Text("hi"), Reply("there")]], SHAPES)


def test_scores_equal_the_model_forward_over_two_images(tokenizer, scenes, model):
    """Teacher-forced log-probs of a packed 2-image conversation == log_softmax of model(...) (fp32, 1e-4)."""
    rng = np.random.default_rng(0)
    convs = [tasks.example(sc, "second", rng, BUDGETS) for sc in scenes[:3]]
    traj = pack(tokenizer, convs, SHAPES)
    ours = np.asarray(make_scorer(model)(nnx.state(model), traj))
    forward = jit_forward(model)
    for i in range(len(convs)):
        n, g0, g1 = int(traj.length[i]), traj.prompt_grid_thw[i], traj.crop_grid_thw[i, 0]
        pv = np.concatenate([traj.prompt_pixel_values[i, :np.prod(g0)], ip.pixel_values_from_frames(traj.crop_frames[i, 0, :np.prod(g1)])])
        logits = forward(traj.tokens[i:i + 1, :n], pixel_values=pv, image_grid_thw=np.stack([g0, g1]))
        logp = jax.nn.log_softmax(np.asarray(logits[0], np.float32), axis=-1)
        picked = logp[np.arange(n - 1), traj.tokens[i, 1:n]]
        want = picked[traj.loss_mask[i, 1:n]].sum()
        np.testing.assert_allclose(ours[i], want, rtol=1e-4, atol=1e-4)
        assert traj.loss_mask[i].sum() > 20  # both assistant turns are trained


def test_sft_step_fits_a_batch_and_compiles_once(tokenizer, scenes, model):
    rng = np.random.default_rng(1)
    traj = pack(tokenizer, [tasks.example(sc, t, rng, BUDGETS) for sc, t in zip(scenes[:4], tasks.TASKS)], SHAPES)
    graphdef, state = nnx.split(model)
    fresh = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    step, params, opt = make_sft_step(fresh, optax.adam(3e-3))
    losses = []
    for _ in range(20):
        params, opt, m = step(params, opt, traj)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert step._cache_size() == 1


@pytest.mark.parametrize("grid", [0, 112])
def test_tasks_teach_abilities_not_the_composition(tokenizer, scenes, grid):
    budgets, rng = _with_grid(grid), np.random.default_rng(2)
    for sc in scenes:
        for task in tasks.TASKS:
            conv = tasks.example(sc, task, rng, budgets)
            replies = [s.text for s in conv if isinstance(s, Reply)]
            calls = [r for r in replies if "<tool_call>" in r]
            # a tool call is always the last segment: no example zooms and then does anything
            assert len(calls) <= 1 and (not calls or conv[-1] == Reply(calls[0]))
            first_image = next(k for k, s in enumerate(conv) if isinstance(s, Image))
            assert not any('"name": "image_zoom_in_tool"' in s.text for s in conv[first_image:] if isinstance(s, Text))
            zooms = [tasks.zoom_box(b, budgets, 448) for b in _targets(sc, large=task == "tool_call")]
            if task == "tool_call":
                parsed = tools.parse_turn(calls[0], image_width=448, image_height=448, tokenizer=tokenizer)
                assert parsed["status"] == "zoom", parsed
                x1, y1, x2, y2 = parsed["bbox"]
                assert x2 - x1 > 30 and y2 - y1 > 30  # DeepEyes rejects smaller boxes
                assert [x1, y1, x2, y2] in zooms
            if task == "grounding":
                box = json.loads(replies[0].split("<answer>")[1].split("</answer>")[0])["bbox_2d"]
                assert box in zooms
            if task == "inventory":
                # every small object, in palette order, with the box one zooms on; the large one's colour
                listing = json.loads(replies[0].split("<answer>")[1].split("</answer>")[0])
                small = [o for o in sc["objects"] if o["size"] == "small"]
                colours = [c for c, _ in listing["small"]]
                assert colours == sorted(colours, key=list(vstar_mini.COLOURS).index) and len(colours) == len(small)
                assert sorted(map(str, listing["small"])) == sorted(
                    str([o["colour"], [round(v) for v in tasks.zoom_box(o["box"], budgets, 448)]]) for o in small)
                assert listing["large"] == next(o["colour"] for o in sc["objects"] if o["size"] == "large")
            if task in ("closeup", "second", "observed"):
                # the hard question is answered from a crop, never from the scene itself
                images = [s for s in conv if isinstance(s, Image)]
                assert images[-1].image.shape[0] < 448 and images[-1].min_pixels == BUDGETS.crop.min_pixels
            if task == "observed":
                # one trained reply, after the tool's observation; the first answer is context only
                assert len(replies) == 1 and conv[-1] == Reply(replies[0]) and "<answer>" in replies[0]
                assert conv[-4:-1] == tasks.observation(images[-1].image, budgets)
                assert sum(s.text.startswith("<think>") for s in conv if isinstance(s, Text)) == 1


def _with_grid(grid):
    return dataclasses.replace(BUDGETS, box_grid=grid)


def test_zoom_box_snaps_outward_to_the_grid():
    on = _with_grid(56)
    assert tasks.zoom_box([60.0, 75.0, 91.0, 113.0], on, 448) == [56.0, 56.0, 112.0, 168.0]
    assert tasks.zoom_box([400.0, 0.0, 447.5, 20.0], on, 448) == [392.0, 0.0, 448.0, 56.0]
    assert tasks.zoom_box([56.0, 56.0, 112.0, 112.0], on, 448) == [56.0, 56.0, 112.0, 112.0]  # already on it
    assert tasks.zoom_box([60.0, 75.0, 91.0, 113.0], BUDGETS, 448) == vstar_mini.crop_box(
        [60.0, 75.0, 91.0, 113.0], pad=BUDGETS.tool_pad, size=448)


def _targets(scene, large=False):
    """Boxes a question can be about: each single-colour small object, a same-colour pair's union (and the
    large object)."""
    by_colour = {"large": [scene["objects"][0]["box"]]} if large else {}
    for o in scene["objects"]:
        if o["size"] == "small":
            by_colour.setdefault(o["colour"], []).append(o["box"])
    return [[min(b[0] for b in bs), min(b[1] for b in bs), max(b[2] for b in bs), max(b[3] for b in bs)]
            for bs in by_colour.values()]


def test_sft_batches_skip_a_bad_example_but_stop_on_settings_that_fit_nothing(tokenizer, scenes):
    args = dict(batch=4, seed=0, start=0, steps=1)
    # "second" needs a crop slot; with none, only "easy" examples fit: the misfits are counted and replaced.
    no_crops = SHAPES._replace(max_crops=0)
    traj, skipped = next(_batches(scenes, tokenizer, BUDGETS, no_crops, weights={"easy": 1, "second": 1}, **args))
    assert traj.tokens.shape == (4, SHAPES.seq_len) and skipped > 0
    with pytest.raises(ValueError, match=r"in a row could not be made \(check sft.seq_len.*train record \d+: row 0: \d+ tokens"):
        next(_batches(scenes, tokenizer, BUDGETS, SHAPES._replace(seq_len=64), weights={"easy": 1},
                      max_failures=5, **args))


def test_the_supervised_stage_resumes_to_the_uninterrupted_result(tokenizer, scenes, model, tmp_path, monkeypatch):
    """`base_model.train` with a Checkpointer: stopped by a preemption request after step 2 (it saves and raises
    Interrupted), then rerun, it ends with the parameters and history of an uninterrupted 4-step stage; with
    `train_tower` False the vision tower is exactly the one it started from and the language model moved."""
    from jax.sharding import Mesh

    from deepeyes_jax.train import checkpoints
    from deepeyes_jax.vstar_mini import base_model
    from deepeyes_jax.vstar_mini.experiment import SFTConfig

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    sft = SFTConfig(steps=4, batch=4, warmup=1, save_every=2, task_weights={"easy": 1.0, "grounding": 1.0},
                    train_tower=False)
    graphdef, state = nnx.split(model)
    monkeypatch.setattr(checkpoints, "install_sigterm_handler", lambda: None)

    def run(directory):
        fresh = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
        ckpt = checkpoints.Checkpointer(str(directory), save_every=sft.save_every, keep=2, async_save=False)
        try:
            return base_model.train(fresh, tokenizer, scenes, BUDGETS, SHAPES, sft, seed=0, put=lambda t: t,
                                    fetch=jax.device_get, mesh=mesh, ckpt=ckpt, log_every=1)
        finally:
            ckpt.close()

    want, want_report = run(tmp_path / "whole")
    monkeypatch.setattr(checkpoints, "preemption_requested", lambda i: i == 1)
    with pytest.raises(base_model.Interrupted, match="saved step 2"):
        run(tmp_path / "cut")
    monkeypatch.setattr(checkpoints, "preemption_requested", lambda i: False)
    got, got_report = run(tmp_path / "cut")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), got, want)
    assert [h["loss"] for h in got_report["history"]] == pytest.approx([h["loss"] for h in want_report["history"]],
                                                                       rel=1e-5)
    assert len(got_report["history"]) == 4 and want_report["history"][0]["loss"] != want_report["history"][-1]["loss"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got["visual"],
                 state["visual"])
    assert not np.allclose(got["lm_head"]["kernel"].value, state["lm_head"]["kernel"].value)
