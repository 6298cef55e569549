"""V*-mini's perception probe: what the model can do on hard scenes, measured by option scoring.

    perception_probe(score, params, scenes, tokenizer, budgets, shapes, batch=, put=) -> {name: accuracy}

`score` is `sft.step.make_scorer(model)`: the summed log-prob of each candidate reply, teacher forced.
"""

from __future__ import annotations

import numpy as np

from deepeyes_jax.sft.conversation import Reply, Text, pack
from deepeyes_jax.vstar_mini import tasks


def perception_probe(score, params, scenes, tokenizer, budgets: tasks.Budgets, shapes, *, batch: int, put,
                     fetch) -> dict:
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
            logp.append(fetch(score(params, put(traj)))[:len(chunk)])
        logp, owner = np.concatenate(logp), np.array([k for k, _, _ in items])
        right = np.array([r for _, _, r in items])
        out[family] = float(np.mean([right[owner == k][np.argmax(logp[owner == k])] for k in range(len(scenes))]))
    return out
