"""The one definition of the trajectory metrics (training and evaluation), per-category summaries, and the
pieces renderings use (turn extraction, crop recovery)."""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from deepeyes_jax.data import image_processing as ip
from deepeyes_jax.data.tokenizer import build_tokenizer
from deepeyes_jax.eval import evaluator as ev
from deepeyes_jax.rl import metrics
from deepeyes_jax.rollout import config as rc
from deepeyes_jax.rollout import tools, zoom
from deepeyes_jax.sft.conversation import Image, Reply, Shapes, Text, pack

Z, A, E, N = tools.STATUS_ZOOM, tools.STATUS_ANSWER, tools.STATUS_ERROR, tools.STATUS_NONE


def test_box_iou_against_hand_computed_values():
    gt = np.array([10, 10, 30, 30], np.float32)
    boxes = np.array([[10, 10, 30, 30], [20, 20, 40, 40], [40, 40, 50, 50], [0, 0, 40, 40]], np.float32)
    want = [1.0, 100 / 700, 0.0, 400 / 1600]
    np.testing.assert_allclose(metrics.box_iou(boxes, gt, np), want, rtol=1e-6)
    np.testing.assert_allclose(metrics.box_iou(jnp.asarray(boxes), jnp.asarray(gt)[None]), want, rtol=1e-6)


def _rows():
    """Four trajectories: two zooms then an answer; an error, then a zoom in the last allowed turn (never
    executed); an error then an answer; one zoom then no answer. Ground-truth boxes for rows 0, 1, 3."""
    box = lambda *b: np.array(b, np.float32)  # noqa: E731
    traj = SimpleNamespace(
        turn_status=np.array([[Z, Z, A], [E, Z, N], [E, A, N], [Z, N, N]], np.int32),
        num_turns=np.array([3, 2, 2, 2], np.int32),
        turn_bbox=np.stack([np.stack([box(0, 0, 20, 20), box(10, 10, 30, 30), box(0, 0, 0, 0)])] * 4),
        num_zooms=np.array([2, 0, 0, 1], np.int32), response_length=np.array([30, 20, 25, 12], np.int32),
        end_reason=np.array([rc.END_ANSWER, rc.END_MAX_TURNS, rc.END_ANSWER, rc.END_NO_TOOL_CALL], np.int32))
    score = dict(reward=np.array([2.0, 0.0, 0.8, -0.2], np.float32), acc=np.array([1, 0, 1, 0], np.float32),
                 format_error=np.array([0, 0, 0, 1], np.float32))
    gt = np.array([[0, 0, 20, 20], [0, 0, 20, 20], [0, 0, 0, 0], [10, 10, 30, 30]], np.float32)
    return traj, score, gt, np.array([True, True, False, True])


def test_row_metrics_count_only_executed_zooms_and_known_boxes():
    traj, score, gt, has_box = _rows()
    rows = metrics.row_metrics(traj, score, gt, has_box, xp=np)
    np.testing.assert_array_equal(rows["tool_call"], [1, 0, 0, 1])
    np.testing.assert_array_equal(rows["has_grounding"], [1, 0, 0, 1])  # row 1's zoom was its last turn
    np.testing.assert_allclose(rows["grounding_iou"], [(1 + 1 / 7) / 2, 0, 0, 1 / 7], rtol=1e-6)
    np.testing.assert_array_equal(rows["answered"], [1, 0, 1, 0])
    s = metrics.summarize_host(rows)
    assert s["accuracy"] == 0.5 and s["tool_call_rate"] == 0.5 and s["zooms_per_trajectory"] == 0.75
    assert math.isclose(s["grounding_iou"], ((1 + 1 / 7) / 2 + 1 / 7) / 2, rel_tol=1e-6)
    assert s["accuracy_with_zoom"] == 0.5 and s["response_length"] == 21.75
    # the same definitions on device (what the training step reduces) give the same numbers
    device = jax.jit(lambda r: metrics.summarize(r))({k: jnp.asarray(v) for k, v in rows.items()})
    for k, v in s.items():
        np.testing.assert_allclose(float(device[k]), v, rtol=1e-6)


def test_summary_per_category_and_nan_without_a_defined_row():
    traj, score, gt, has_box = _rows()
    values = metrics.row_metrics(traj, score, gt, has_box, xp=np)
    rows = [dict({k: float(v[i]) for k, v in values.items()}, category=c, row=i, index=i, batch=0)
            for i, c in enumerate(["hard", "easy", "easy", "hard"])]
    s = ev.summarize(rows)
    assert s["all/examples"] == 4 and s["hard/accuracy"] == 0.5 and s["easy/accuracy"] == 0.5
    assert s["hard/zooms_per_trajectory"] == 1.5 and math.isnan(s["easy/grounding_iou"])
    assert math.isclose(s["hard/grounding_iou"], ((1 + 1 / 7) / 2 + 1 / 7) / 2, rel_tol=1e-6)


def test_stored_crop_frames_are_exactly_what_the_model_saw():
    """Trajectories keep uint8 patch frames: the rendered crop is PIL's resize itself, and the pixel values
    expanded from the frames are the processor's, bit for bit."""
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)
    frames, grid = ip.preprocess_frames(crop, min_pixels=112 * 112, max_pixels=112 * 112)
    padded = np.concatenate([frames, np.zeros((10, frames.shape[1]), np.uint8)])
    seen = np.asarray(PIL.Image.fromarray(crop).resize((grid[2] * 14, grid[1] * 14), PIL.Image.BICUBIC))
    np.testing.assert_array_equal(ip.image_from_frames(padded, grid), seen)
    pv, _ = ip.preprocess_image(crop, min_pixels=112 * 112, max_pixels=112 * 112)
    np.testing.assert_array_equal(np.asarray(zoom.pixel_values_from_frames(jnp.asarray(frames))), pv)
    np.testing.assert_array_equal(ip.pixel_values_from_frames(frames), pv)


def test_turns_of_splits_assistant_turns_and_attaches_crops():
    tok = build_tokenizer(vocab_size=512)
    image = np.full((112, 112, 3), 90, np.uint8)
    crop = np.full((56, 56, 3), 200, np.uint8)
    zoom = '<think>look</think>\n<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 56, 56]}}\n</tool_call>'
    conv = [Text("<|im_start|>user\n"), Image(image, 1, 112 * 112), Text("<|im_end|>\n<|im_start|>assistant\n"),
            Reply(zoom), Text("\n<|im_start|>user\n"), Image(crop, 112 * 112, 112 * 112),
            Text("<|im_end|>\n<|im_start|>assistant\n"), Reply("<think>ok</think>\n<answer>red</answer>")]
    traj = pack(tok, [conv], Shapes(256, 64, 64, 2))
    traj = traj._replace(turn_status=np.array([[tools.STATUS_ZOOM, tools.STATUS_ANSWER]]),
                         turn_error=np.zeros((1, 2), np.int32), num_turns=np.array([2], np.int32),
                         turn_bbox=np.array([[[0, 0, 56, 56], [0, 0, 0, 0]]], np.float32))
    turns = ev.turns_of(traj, 0, tok)
    assert [t["text"] for t in turns] == [zoom, "<think>ok</think>\n<answer>red</answer>"]
    assert turns[0]["bbox"] == [0, 0, 56, 56] and turns[1]["bbox"] is None
    assert turns[0]["crop"].shape == (112, 112, 3) and abs(int(turns[0]["crop"].mean()) - 200) <= 1
