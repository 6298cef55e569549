"""DeepEyes' tool-use-oriented data selection (spec 5.3) with the current model, through the compiled rollout.

    report, kept = select(source, tokenizer=..., model=..., config=..., data=..., k=8, batch=64, mesh=..., rules=...)

1. Difficulty: every question is rolled out k times (sampled at the rollout's temperature, DeepEyes: 1.0) with
   the zoom tool; a question answered right in all k (`all_right`) or none (`none_right`) is dropped.
2. Perception utility, for questions with a ground-truth box (fine-grained V* data; charts and reasoning rows keep
   their form): one greedy rollout whose first turn is forced to zoom on the ground-truth box
   (`RolloutBatch.first_turn`: the call is executed as if the model had written it, the crop is appended, and the
   model answers); a question not answered right then (`not_solved_with_gt_crop`) is dropped. This is DeepEyes'
   "answer correctly with the 2-turn setting" filter (create_dataset.py), the second turn being the model's own.
A record the static shapes cannot hold is `unusable`. Accuracy is the reward's rule-based matcher.
"""

from __future__ import annotations

import collections
import json

from deepeyes_jax.eval.evaluator import Evaluator
from deepeyes_jax.train.input_pipeline import PromptBatches

REASONS = ("unusable", "all_right", "none_right", "not_solved_with_gt_crop")


def gt_zoom_call(box, tool_name: str = "image_zoom_in_tool") -> str:
    """The first turn handed to the model: DeepEyes' call format with the ground-truth box (integer pixels)."""
    coords = [int(round(v)) for v in box]
    return ('<tool_call>\n' + json.dumps({"name": tool_name, "arguments": {"bbox_2d": coords}}) + '\n</tool_call>'
            + "<|im_end|>")


def decide(accuracy: float | None, has_box: bool, solved_with_crop: bool | None) -> str | None:
    """The reason a question is dropped, or None if it is kept (accuracy: mean over its k samples; None =
    unusable; solved_with_crop: the forced-zoom rollout's verdict, None when not asked)."""
    if accuracy is None:
        return "unusable"
    if accuracy >= 1.0:
        return "all_right"
    if accuracy <= 0.0:
        return "none_right"
    if has_box and not solved_with_crop:
        return "not_solved_with_gt_crop"
    return None


class _Subset:
    def __init__(self, source, indices):
        self.source, self.indices = source, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[self.indices[i]]


def _accuracy(rows) -> dict[int, float]:
    sums, counts = collections.defaultdict(float), collections.Counter()
    for r in rows:
        sums[r["index"]] += r["acc"]
        counts[r["index"]] += 1
    return {i: sums[i] / counts[i] for i in counts}


def select(source, *, tokenizer, model, params, config, templates, table, data, crop, reward, k: int, batch: int,
           mesh, rules, rng, first_turn_len: int = 128) -> tuple[dict, list[int]]:
    """-> (report {"questions", "kept", "dropped": {reason: n}, "by_source": {source: {"kept", reason...}}},
    the kept source indices in order)."""
    def run(src, *, group_size, greedy, first_turn=None):
        batches = PromptBatches(src, tokenizer=tokenizer, data=data, crop=crop, prompts=max(1, batch // group_size),
                                group_size=group_size, mesh=mesh, rules=rules, reward=reward, shuffle=False,
                                first_turn=first_turn, first_turn_len=first_turn_len if first_turn else 0)
        evaluate = Evaluator(model, config, templates, table, mesh=mesh, rules=rules, greedy=greedy)
        return _accuracy(evaluate(params, batches, rng).rows)

    sampled = run(source, group_size=k, greedy=False)
    records = {i: source[i] for i in sampled}  # the usable ones (an unusable record may not even read)
    boxed = [i for i, r in records.items() if r.box is not None and 0 < sampled[i] < 1]
    with_crop = {}
    if boxed:
        forced = lambda r: tokenizer.encode(gt_zoom_call(r.box), add_special_tokens=False)  # noqa: E731
        got = run(_Subset(source, boxed), group_size=1, greedy=True, first_turn=forced)
        with_crop = {boxed[j]: acc >= 1.0 for j, acc in got.items()}
    dropped, kept, by_source = collections.Counter(), [], collections.defaultdict(collections.Counter)
    for i in range(len(source)):
        record = records.get(i)
        reason = decide(sampled.get(i), record is not None and record.box is not None, with_crop.get(i))
        name = record.data_source if record is not None else "unusable"
        if reason is None:
            kept.append(i)
            by_source[name]["kept"] += 1
        else:
            dropped[reason] += 1
            by_source[name][reason] += 1
    report = {"questions": len(source), "kept": len(kept), "k": k,
              "dropped": {r: dropped[r] for r in REASONS if dropped[r]},
              "by_source": {s: dict(c) for s, c in sorted(by_source.items())}}
    return report, kept
