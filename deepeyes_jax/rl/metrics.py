"""The one definition of every trajectory metric, shared by the training step and evaluation.

    rows = row_metrics(traj, score, box, has_box)     # per row, on device: dict of [B] arrays
    summary = summarize(rows)                          # batch means, on device (jnp) or host (numpy)

Definitions (summary name <- per-row key; a "zoom" is a tool call whose crop was appended as an
observation: DeepEyes' count of `<|vision_start|><|image_pad|>` in the response, spec 3.2):
  reward, accuracy <- acc, format_error      the reward's own per-row values
  tool_call_rate <- tool_call                1 if the trajectory made at least one zoom
  zooms_per_trajectory <- zooms              number of zooms
  grounding_iou                              mean IoU of the row's zoom boxes with its ground-truth box;
                                             only rows with a zoom and a known box count (`has_grounding`);
                                             NaN when no row counts
  response_length                            sampled tokens (observations excluded)
  turns                                      assistant turns
  answered                                   the trajectory ended with an <answer>
  accuracy_with_zoom                         mean acc over rows with a zoom (NaN when none)
A tool call in the last allowed turn never runs (spec 2.3) and is not a zoom.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from deepeyes_jax.rollout import config as rc
from deepeyes_jax.rollout import tools

MEANS = (("reward", "reward"), ("accuracy", "acc"), ("format_error", "format_error"), ("tool_call_rate", "tool_call"),
         ("zooms_per_trajectory", "zooms"), ("response_length", "response_length"), ("turns", "turns"),
         ("answered", "answered"))


def zoomed_turns(turn_status, num_turns, xp=jnp):
    """bool[B, max_turns]: turn t zoomed (a zoom call that was followed by the next turn, i.e. executed)."""
    t = xp.arange(turn_status.shape[1])[None, :]
    return (turn_status == tools.STATUS_ZOOM) & (t < num_turns[:, None] - 1)


def box_iou(boxes, gt, xp=jnp):
    """IoU float32[...] of boxes float[..., 4] against gt float[..., 4] (broadcast), [x1, y1, x2, y2]."""
    lo, hi = xp.maximum(boxes[..., :2], gt[..., :2]), xp.minimum(boxes[..., 2:], gt[..., 2:])
    inter = xp.prod(xp.clip(hi - lo, 0, None), axis=-1)
    area = lambda b: xp.prod(xp.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)  # noqa: E731
    return inter / xp.maximum(area(boxes) + area(gt) - inter, 1e-9)


def row_metrics(traj, score, box, has_box, xp=jnp) -> dict:
    """Per-row values (dict of float32[B]) from Trajectories, the reward's score dict and the ground-truth
    boxes float32[B, 4] / has_box bool[B]."""
    zoomed = zoomed_turns(traj.turn_status, traj.num_turns, xp)
    n_zoomed = zoomed.sum(axis=1)
    iou = box_iou(traj.turn_bbox, box[:, None, :], xp)
    has_grounding = has_box & (n_zoomed > 0)
    f32 = lambda x: xp.asarray(x).astype(xp.float32)  # noqa: E731
    return dict(
        reward=f32(score["reward"]), acc=f32(score["acc"]), format_error=f32(score["format_error"]),
        tool_call=f32(traj.num_zooms > 0), zooms=f32(traj.num_zooms),
        grounding_iou=f32(xp.where(has_grounding, (iou * zoomed).sum(axis=1) / xp.maximum(n_zoomed, 1), 0.0)),
        has_grounding=f32(has_grounding), response_length=f32(traj.response_length), turns=f32(traj.num_turns),
        answered=f32(traj.end_reason == rc.END_ANSWER))


def _mean(x, w, xp):
    n = w.sum()
    return xp.where(n > 0, (x * w).sum() / xp.maximum(n, 1), xp.nan)


def summarize(rows: dict, where=None, xp=jnp) -> dict:
    """Means over the rows (those with `where`, bool[B], if given), named as in MEANS, plus grounding_iou and
    accuracy_with_zoom over the rows they are defined for (NaN when there are none)."""
    w = xp.ones_like(rows["acc"]) if where is None else xp.asarray(where).astype(xp.float32)
    out = {name: _mean(rows[key], w, xp) for name, key in MEANS}
    out["grounding_iou"] = _mean(rows["grounding_iou"], w * rows["has_grounding"], xp)
    out["accuracy_with_zoom"] = _mean(rows["acc"], w * rows["tool_call"], xp)
    return out


def summarize_host(rows: dict, where=None) -> dict:
    """`summarize` on host arrays -> {name: float}."""
    rows = {k: np.asarray(v, np.float32) for k, v in rows.items()}
    return {k: float(v) for k, v in summarize(rows, where, xp=np).items()}
