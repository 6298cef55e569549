"""Held-out evaluation pieces: IoU, per-group summaries, turn extraction and crop recovery for renderings."""

import json
import math

import numpy as np
import PIL.Image

from deepeyes_jax.data import image_processing as ip
from deepeyes_jax.data.tokenizer import build_tokenizer
from deepeyes_jax.eval import vstar_mini as ev
from deepeyes_jax.rollout import tools
from deepeyes_jax.sft.conversation import Image, Reply, Shapes, Text, pack


def test_box_iou_against_hand_computed_values():
    gt = np.array([10, 10, 30, 30], np.float32)
    boxes = np.array([[10, 10, 30, 30], [20, 20, 40, 40], [40, 40, 50, 50], [0, 0, 40, 40]], np.float32)
    np.testing.assert_allclose(ev.box_iou(boxes, gt), [1.0, 100 / 700, 0.0, 400 / 1600], rtol=1e-6)


def test_summary_splits_hard_and_easy_and_ignores_missing_iou():
    rows = [dict(hard=True, accuracy=1.0, tool_call_rate=1.0, zooms_per_trajectory=2.0, grounding_iou=0.5,
                 response_length=10.0, answered=1.0),
            dict(hard=True, accuracy=0.0, tool_call_rate=0.0, zooms_per_trajectory=0.0, grounding_iou=math.nan,
                 response_length=20.0, answered=0.0),
            dict(hard=False, accuracy=1.0, tool_call_rate=0.0, zooms_per_trajectory=0.0, grounding_iou=math.nan,
                 response_length=5.0, answered=1.0)]
    s = ev.summarize(rows)
    assert s["hard/accuracy"] == 0.5 and s["hard/zooms_per_trajectory"] == 1.0 and s["hard/grounding_iou"] == 0.5
    assert s["easy/accuracy"] == 1.0 and math.isnan(s["easy/grounding_iou"]) and s["hard/response_length"] == 15


def test_crop_image_recovers_what_the_model_saw():
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)
    pv, grid = ip.preprocess_image(crop, min_pixels=112 * 112, max_pixels=112 * 112)
    padded = np.concatenate([pv, np.zeros((10, pv.shape[1]), np.float32)])
    seen = np.asarray(PIL.Image.fromarray(crop).resize((grid[2] * 14, grid[1] * 14), PIL.Image.BICUBIC))
    out = ev.crop_image(padded, grid)
    assert out.shape == seen.shape
    assert np.abs(out.astype(int) - seen.astype(int)).max() <= 1  # float32 normalise round trip


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
                         turn_error=np.zeros((1, 2), np.int32),
                         turn_bbox=np.array([[[0, 0, 56, 56], [0, 0, 0, 0]]], np.float32))
    turns = ev.turns_of(traj, 0, tok)
    assert [t["text"] for t in turns] == [zoom, "<think>ok</think>\n<answer>red</answer>"]
    assert turns[0]["bbox"] == [0, 0, 56, 56] and turns[1]["bbox"] is None
    assert turns[0]["crop"].shape == (112, 112, 3) and abs(int(turns[0]["crop"].mean()) - 200) <= 1


def test_perception_probe_picks_the_best_scored_candidate_per_scene():
    """With a scorer that prefers the reply with fewer tokens, every family's accuracy is the fraction of
    scenes whose shortest candidate is the right one, computed here independently from the candidates."""
    from deepeyes_jax.data import vstar_mini
    from deepeyes_jax.data import vstar_mini_sft as tasks
    from deepeyes_jax.data.tokenizer import default_corpus

    tok = build_tokenizer(vocab_size=1024, corpus=default_corpus() + tasks.corpus())
    world = vstar_mini.WorldConfig(kinds=("letter_colour",))
    scenes = [vstar_mini.make_scene(i, seed=4, split="test", config=world) for i in range(5)]
    budgets = tasks.Budgets(112 * 112, 112 * 112, 112 * 112, box_grid=56)
    shapes = Shapes(seq_len=640, prompt_patches=64, crop_patches=132, max_crops=1)
    score = lambda params, traj: -traj.loss_mask.sum(1)  # noqa: E731
    out = ev.perception_probe(score, None, scenes, tok, budgets, shapes, batch=8, put=lambda t: t)

    n_tokens = lambda text: len(tok.encode(text, add_special_tokens=False))  # noqa: E731
    def expected(candidates, right):  # first shortest wins, as argmax does
        lengths = [n_tokens(c) for c in candidates]
        return candidates[int(np.argmin(lengths))] == right
    options = np.mean([expected(s["options"], s["answer"]) for s in scenes])
    boxes = []
    for s in scenes:
        cands = sorted({tuple(tasks.zoom_box(o["box"], budgets, 448)) for o in s["objects"] if o["size"] == "small"})
        texts = [json.dumps({"bbox_2d": [round(v) for v in b]}) for b in cands]
        right = json.dumps({"bbox_2d": [round(v) for v in tasks.zoom_box(s["target_box"], budgets, 448)]})
        boxes.append(expected(texts, right))
    assert out["no_crop"] == out["gt_crop"] == options
    assert out["grounding"] == np.mean(boxes)
    assert out["chance"] == 0.25 and 1 / 6 <= out["grounding_chance"] <= 1 / 4
