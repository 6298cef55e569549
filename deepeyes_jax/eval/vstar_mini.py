"""Held-out V*-mini evaluation: greedy rollouts with the zoom tool, summarised by question difficulty.

    evaluate(run, params, batches) -> dict of summary numbers, plus per-row records

`run(params, batch, rng) -> (trajectories, score)` is the compiled rollout-and-reward program
(`rl.train_step.rollout_and_score` at temperature 0). Summary keys, each over the hard (small
targets) and the easy (large object) questions: accuracy, tool_call_rate (any successful zoom),
zooms_per_trajectory, grounding_iou (successful zoom boxes vs the ground-truth box; NaN without a
zoom), response_length, answered (the trajectory ended with an <answer>).
"""

from __future__ import annotations

import math

import jax
import numpy as np

from deepeyes_jax.data import image_processing as ip
from deepeyes_jax.data import vstar_mini_sft as tasks
from deepeyes_jax.rollout import config as rc
from deepeyes_jax.rollout import tools
from deepeyes_jax.sft.conversation import Reply, Text, pack

GROUPS = ("hard", "easy")
METRICS = ("accuracy", "tool_call_rate", "zooms_per_trajectory", "grounding_iou", "response_length", "answered")


def box_iou(boxes, gt) -> np.ndarray:
    """IoU float[...] of boxes float[..., 4] against gt float[..., 4] (broadcast), [x1, y1, x2, y2]."""
    lo, hi = np.maximum(boxes[..., :2], gt[..., :2]), np.minimum(boxes[..., 2:], gt[..., 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    area = lambda b: np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)  # noqa: E731
    return inter / np.maximum(area(boxes) + area(gt) - inter, 1e-9)


def row_records(traj, score, boxes, hard) -> list[dict]:
    """Per-row numbers of one evaluated batch (host arrays)."""
    zoom = traj.turn_status == tools.STATUS_ZOOM
    iou = box_iou(traj.turn_bbox, boxes[:, None, :])
    out = []
    for i in range(len(hard)):
        ious = iou[i][zoom[i]]
        out.append(dict(hard=bool(hard[i]), accuracy=float(score["acc"][i]), tool_call_rate=float(zoom[i].any()),
                        zooms_per_trajectory=float(traj.num_zooms[i]),
                        grounding_iou=float(ious.mean()) if len(ious) else math.nan,
                        response_length=float(traj.response_length[i]),
                        answered=float(traj.end_reason[i] == rc.END_ANSWER)))
    return out


def summarize(records: list[dict]) -> dict:
    """-> {f"{group}/{metric}": mean} (NaN-aware for grounding_iou)."""
    out = {}
    for group in GROUPS:
        rows = [r for r in records if r["hard"] == (group == "hard")]
        for m in METRICS:
            vals = np.array([r[m] for r in rows], np.float64)
            vals = vals[np.isfinite(vals)]
            out[f"{group}/{m}"] = float(vals.mean()) if len(vals) else math.nan
    return out


def evaluate(run, params, batches, rng):
    """batches: list of (TrainBatch on device, boxes float32[B, 4], hard bool[B], meta list[dict]).
    -> (summary dict, records, last trajectories of each batch on host)."""
    records, outputs = [], []
    for batch, boxes, hard, meta in batches:
        traj, score = run(params, batch, rng)
        traj, score = jax.device_get((traj, score))
        rows = row_records(traj, score, boxes, hard)
        for r, m in zip(rows, meta):
            r.update(m)
        records += rows
        outputs.append((traj, score))
    return summarize(records), records, outputs


def crop_image(pixel_values, grid_thw) -> np.ndarray:
    """A crop as the model saw it: normalised patches float32[N, 1176] + grid -> uint8[h, w, 3]."""
    n = int(np.prod(grid_thw))
    chw = ip.unpatchify(np.asarray(pixel_values[:n]), grid_thw)
    x = chw.transpose(1, 2, 0) * ip.IMAGE_STD + ip.IMAGE_MEAN
    return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


def turns_of(traj, row: int, tokenizer) -> list[dict]:
    """The assistant turns of one trajectory row (host arrays), for `eval.render.render_trajectory`."""
    mask = np.asarray(traj.loss_mask[row])
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    crops = 0
    turns = []
    for t, (a, b) in enumerate(zip(edges[::2], edges[1::2])):
        status = int(traj.turn_status[row, t])
        text = tokenizer.decode(traj.tokens[row, a:b].tolist(), skip_special_tokens=False)
        turn = dict(text=text.removesuffix("<|im_end|>"),
                    bbox=None, crop=None, error=None)
        if status == tools.STATUS_ZOOM and crops < int(traj.num_crops[row]):
            turn["bbox"] = [float(v) for v in traj.turn_bbox[row, t]]
            turn["crop"] = crop_image(traj.crop_pixel_values[row, crops], traj.crop_grid_thw[row, crops])
            crops += 1
        elif status == tools.STATUS_ERROR:
            turn["error"] = tools.ERROR_MESSAGES.get(int(traj.turn_error[row, t]), "invalid tool call")
        turns.append(turn)
    return turns


def perception_probe(score, params, scenes, tokenizer, budgets: tasks.Budgets, shapes, *, batch: int, put) -> dict:
    """Multiple-choice abilities of a model on hard scenes, by teacher-forced scoring (`sft.step.make_scorer`):
    the highest-scoring candidate reply is the model's choice.

      no_crop    each option's answer right after the prompt
      gt_crop    each option's answer after a tool call on the target's zoom box (`tasks.zoom_box`) and
                 the tool's observation of that crop
      grounding  "Where is X?" answered with the zoom box of each small object in the scene
    -> {name: accuracy, "chance": mean 1/options, "grounding_chance": mean 1/candidate boxes}.
    """
    rows = {"no_crop": [], "gt_crop": [], "grounding": []}  # (scene, conversation, right)
    size = scenes[0]["image"].shape[0] if scenes else 0
    for k, sc in enumerate(scenes):
        name = tasks.target_name(sc, sc["target_ids"])
        box = tasks.zoom_box(sc["target_box"], budgets, size)
        head = tasks.prompt(sc["image"], sc["question"], budgets)
        zoom = head + [Text(tasks.tool_call(f"I need a closer look at {name}.", box) + "<|im_end|>"),
                       *tasks.observation(tasks.cut(sc["image"], box), budgets)]
        for option in sc["options"]:
            reply = Reply(tasks.answer(f"{name.capitalize()} is clearly visible.", option))
            rows["no_crop"].append((k, head + [reply], option == sc["answer"]))
            rows["gt_crop"].append((k, zoom + [reply], option == sc["answer"]))
        boxes = {tuple(tasks.zoom_box(o["box"], budgets, size)) for o in sc["objects"] if o["size"] == "small"}
        boxes.add(tuple(box))
        for b in sorted(boxes):
            rows["grounding"].append((k, tasks.grounding(sc["image"], name, b, budgets), list(b) == box))
    out = {"chance": float(np.mean([1 / len(sc["options"]) for sc in scenes])),
           "grounding_chance": float(np.mean([1 / sum(r[0] == k for r in rows["grounding"])
                                              for k in range(len(scenes))]))}
    for family, items in rows.items():
        logp = []
        for i in range(0, len(items), batch):
            chunk = [conv for _, conv, _ in items[i:i + batch]]
            traj = pack(tokenizer, chunk + [chunk[-1]] * (batch - len(chunk)), shapes)
            logp.append(np.asarray(jax.device_get(score(params, put(traj))))[:len(chunk)])
        logp, owner = np.concatenate(logp), np.array([k for k, _, _ in items])
        right = np.array([r for _, _, r in items])
        out[family] = float(np.mean([right[owner == k][np.argmax(logp[owner == k])] for k in range(len(scenes))]))
    return out
