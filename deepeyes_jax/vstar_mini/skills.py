"""The base model's skill table on held-out scenes: what it brings to RL, skill by skill.

    table = skill_table(model, params, tokenizer, scenes, exp)    # {name: value}, see SKILLS

Option scoring (teacher forced, `probes.perception_probe`) for the multiple-choice skills; greedy rollouts
through the compiled evaluator for what the model writes: the box it answers "Where is X?" with (no tool in
that turn), the tool call it writes when asked to zoom, and its spontaneous tool use on the questions.
"""

from __future__ import annotations

import json

import numpy as np

from deepeyes_jax.data import chat
from deepeyes_jax.data.records import PromptRecord
from deepeyes_jax.eval.evaluator import final_answer, take_rows, turns_of
from deepeyes_jax.rl.metrics import box_iou
from deepeyes_jax.vstar_mini import tasks

SKILLS = (
    ("hard_accuracy_gt_crop", "hard questions after the ground-truth zoom (option scoring)"),
    ("hard_accuracy_no_crop", "hard questions right away (option scoring)"),
    ("chance", "chance on hard questions"),
    ("grounding_iou50", "\"Where is X?\": answered box IoU >= 0.5 with the target (greedy)"),
    ("grounding_mean_iou", "\"Where is X?\": mean IoU (greedy)"),
    ("tool_call_when_asked", "\"Zoom in on X first.\": a well-formed, executed tool call (greedy)"),
    ("tool_call_aim_iou50", "\"Zoom in on X first.\": the zoom box's IoU >= 0.5 with the target (greedy)"),
    ("tool_call_rate_hard", "spontaneous tool-call rate, hard questions (greedy)"),
    ("tool_call_rate_easy", "spontaneous tool-call rate, easy questions (greedy)"),
    ("accuracy_hard", "accuracy, hard questions (greedy, tool available)"),
    ("accuracy_easy", "accuracy, easy questions (greedy, tool available)"),
)


def asked_records(scenes, system_prompt: str) -> list[PromptRecord]:
    """Per hard scene: "Where is <target>?" (category "grounding", no tool) and its question with "Zoom in on
    <target> first." (category "asked", tool on); `index` = the scene's position in `scenes`."""
    out = []
    for k, sc in enumerate(scenes):
        name = tasks.target_name(sc, sc["target_ids"])
        common = dict(image=sc["image"], ground_truth=sc["answer"], data_source=sc["data_source"],
                      box=tuple(sc["target_box"]), index=k)
        out.append(PromptRecord(prompt=chat.deepeyes_prompt(tasks.where_question(name), system_prompt),
                                question=tasks.where_question(name), category="grounding", tool=False, **common))
        asked = tasks.zoom_request(sc["question"], name)
        out.append(PromptRecord(prompt=chat.deepeyes_prompt(asked, system_prompt), question=asked,
                                category="asked", tool=True, **common))
    return out


def answered_box(text: str):
    """The bbox_2d of a reply's final answer, or None if it is not one."""
    try:
        box = json.loads(final_answer(text))["bbox_2d"]
    except (ValueError, TypeError, KeyError):
        return None
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        return None
    return [float(v) for v in box]


def generated_skills(result, records, tokenizer) -> dict:
    """Grounding IoU and asked tool calls (executed; their zoom box's IoU with the target, 0 without a zoom) from an
    evaluation of `asked_records` (an `evaluator.Result`)."""
    ious, asked, aim = [], [], []
    for k, (traj, _, _) in enumerate(result.outputs):
        mine = [r for r in result.rows if r["batch"] == k]
        host = take_rows(traj, [r["row"] for r in mine])
        for i, r in enumerate(mine):
            if r["category"] == "grounding":
                turns = turns_of(host, i, tokenizer)
                box = answered_box(turns[-1]["text"]) if turns else None
                truth = np.array(records[r["index"]].box)
                ious.append(0.0 if box is None else float(box_iou(np.array(box), truth, np)))
            else:
                asked.append(r["zooms"] > 0)
                aim.append(r["grounding_iou"])  # rl.metrics: 0 for a row without a zoom
    ious = np.array(ious, np.float64)
    return dict(grounding_iou50=float(np.mean(ious >= 0.5)), grounding_mean_iou=float(np.mean(ious)),
                tool_call_when_asked=float(np.mean(asked)), tool_call_aim_iou50=float(np.mean(np.array(aim) >= 0.5)))
