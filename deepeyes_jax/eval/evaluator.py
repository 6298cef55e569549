"""Held-out evaluation: greedy rollouts with the zoom tool, scored and summarised per category.

    evaluate = Evaluator(model, train_config, templates, table, mesh=mesh, rules=rules)
    result = evaluate(params, batches, rng)       # batches: an unshuffled input_pipeline.PromptBatches
    result.summary   # {"all/accuracy": ..., "<category>/tool_call_rate": ..., ...}  (rl.metrics names)

One compiled program per batch shape: the rollout at temperature 0, the reward, and the per-row metrics
of `rl.metrics` (the same definitions the training step reduces). Each host fetches only the small
per-row values of its own rows; they are gathered across hosts (a few floats per row, never pixels) and
every host computes the same summary. Padding rows of the last batch are dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from deepeyes_jax import sharding as shd
from deepeyes_jax.data import image_processing as ip
from deepeyes_jax.rl import metrics
from deepeyes_jax.rl.train_step import TrainConfig, rollout_and_score
from deepeyes_jax.rollout import tools
from deepeyes_jax.rollout.sampler import Trajectories

_CATEGORY_BYTES = 64  # a row's category travels between hosts as this many UTF-8 bytes
_ROW_KEYS = ("reward", "acc", "format_error", "tool_call", "zooms", "grounding_iou", "has_grounding",
             "response_length", "turns", "answered")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """every: held-out evaluation every this many training steps (0: only before and after training).
    batch: prompts per evaluation batch (one greedy trajectory each).
    examples: the during-training evaluations use the first `examples` prompts (0: all); the final one
      uses `final_examples` (0: all).
    data_dir / split: a prepared prompt dataset (`data.prepared`) to evaluate on, if any."""

    every: int = 0
    batch: int = 64
    examples: int = 0
    final_examples: int = 0
    data_dir: str = ""
    split: str = "test"


class Result(NamedTuple):
    summary: dict  # {"<category or all>/<metric>": float}
    rows: list  # per evaluated row (every host): metric values, category, source index, batch, row in batch
    outputs: list  # per batch: (Trajectories, score, this host's input rows), on device, for renderings


def _program(graphdef, cfg: TrainConfig, templates, params, batch, rng, table):
    traj, score = rollout_and_score(graphdef, cfg, templates, params, batch, rng, table)
    rows = metrics.row_metrics(traj, score, batch.box, batch.has_box)
    return traj, score, rows


class Evaluator:
    """greedy=False samples at the config's temperature (data selection's k samples per question)."""

    def __init__(self, model, config: TrainConfig, templates, table, *, mesh, rules, greedy: bool = True):
        if greedy:
            config = dataclasses.replace(config, rollout=dataclasses.replace(config.rollout, temperature=0.0))
        self.mesh, self.rules, self.table = mesh, rules, table
        self.jitted = jax.jit(functools.partial(_program, nnx.graphdef(model), config, templates))

    def __call__(self, params, batches, rng, *, num_batches: int | None = None) -> Result:
        n = batches.num_batches if num_batches is None else min(num_batches, batches.num_batches)
        rows, outputs = [], []
        for k in range(n):
            batch, local = batches.next()
            traj, score, values = self.jitted(params, batch, rng, self.table)
            b = batch.answer.shape[0]
            lo, _ = shd.process_rows(shd.row_sharding(self.mesh, self.rules, (b,)), (b,))
            table = np.stack([shd.host_rows(values[k], self.mesh, self.rules) for k in _ROW_KEYS], axis=1)
            rows += [dict(r, batch=k) for r in _gather(table, local, lo)]
            outputs.append((traj, score, local))
        return Result(summarize(rows), rows, outputs)


def _gather(table: np.ndarray, local: list[dict], lo: int) -> list[dict]:
    """This host's rows -> every host's rows (floats and categories only)."""
    cats = np.zeros((len(local), _CATEGORY_BYTES), np.uint8)
    for i, r in enumerate(local):
        c = r["record"].category.encode()[:_CATEGORY_BYTES]
        cats[i, :len(c)] = np.frombuffer(c, np.uint8)
    meta = np.array([[lo + i, r["index"], r["padded"] or r["substitute"]] for i, r in enumerate(local)], np.int64)
    if jax.process_count() > 1:
        table, cats, meta = (np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in (table, cats, meta))
    out = []
    for values, cat, (row, index, skip) in zip(table, cats, meta):
        if not skip:
            out.append(dict(zip(_ROW_KEYS, values.tolist()), row=int(row), index=int(index),
                            category=bytes(cat).rstrip(b"\0").decode(errors="replace")))
    return sorted(out, key=lambda r: r["row"])


def summarize(rows: list[dict]) -> dict:
    """{"all/<metric>", "<category>/<metric>"} over evaluated rows (`rl.metrics.summarize`); NaN-aware."""
    if not rows:
        return {}
    arrays = {k: np.array([r[k] for r in rows], np.float32) for k in _ROW_KEYS}
    cats = np.array([r["category"] for r in rows])
    out = {}
    for name in ["all"] + sorted(set(cats) - {""}):
        where = None if name == "all" else cats == name
        out.update({f"{name}/{k}": v for k, v in metrics.summarize_host(arrays, where).items()})
    out["all/examples"] = float(len(rows))
    return out


def final_answer(text: str) -> str:
    """DeepEyes' benchmark answer: the text between the first <answer> and </answer> of the final response, else
    the whole response (eval_vstar.py / eval_hrbench.py)."""
    if "<answer>" in text and "</answer>" in text:
        return text.split("<answer>")[1].split("</answer>")[0].strip()
    return text


def judge_rows(result: Result, truths, tokenizer, judge) -> tuple[list[dict], dict]:
    """DeepEyes' benchmark judging: each row the rule-based matcher marked wrong goes to the LLM judge (question,
    ground truth, the final response's answer) and the verdict becomes its accuracy. truths(index) -> (question,
    ground truth) of a source index. Every host fetches the same rows (`take_rows` is collective); process 0 asks
    the judge and broadcasts the verdicts, so every host summarises the same rows. -> (rows, judge stats)."""
    rows = [dict(r) for r in result.rows]
    asked = []
    for k, (traj, _, _) in enumerate(result.outputs):
        wrong = [r for r in rows if r["batch"] == k and r["acc"] < 0.5]
        if wrong:
            host = take_rows(traj, [r["row"] for r in wrong])
            for i, r in enumerate(wrong):
                turns = turns_of(host, i, tokenizer)
                asked.append((r, final_answer(turns[-1]["text"] if turns else "")))
    verdicts, stats = np.zeros(len(asked), np.float32), {}
    if jax.process_index() == 0 and asked:
        scores, stats = judge.judge_batch([(*truths(r["index"]), answer) for r, answer in asked])
        verdicts[:] = scores
    if jax.process_count() > 1:
        verdicts = np.asarray(multihost_utils.broadcast_one_to_all(verdicts))
    for (r, _), v in zip(asked, verdicts):
        r["acc"] = float(v)
    return rows, stats


# ----------------------------------------------------------------------------------- renderings


def take_rows(traj: Trajectories, rows: list[int]) -> Trajectories:
    """The given global rows of a trajectory batch, on the host.

    A small collective program every host runs; only those rows cross the network."""
    idx = np.asarray(rows, np.int32)

    def take(t):
        return t._replace(**{f: getattr(t, f)[:, idx] if f == "position_ids" else getattr(t, f)[idx]
                             for f in t._fields})
    with jax.transfer_guard("allow"):
        return jax.device_get(jax.jit(take)(traj))


def turns_of(traj, row: int, tokenizer) -> list[dict]:
    """The assistant turns of one trajectory row (host arrays), for `eval.render.render_trajectory`."""
    mask = np.asarray(traj.loss_mask[row])
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    zoomed = metrics.zoomed_turns(np.asarray(traj.turn_status), np.asarray(traj.num_turns), np)[row]
    crops, turns = 0, []
    for t, (a, b) in enumerate(zip(edges[::2], edges[1::2])):
        text = tokenizer.decode(traj.tokens[row, a:b].tolist(), skip_special_tokens=False)
        turn = dict(text=text.removesuffix("<|im_end|>"), bbox=None, crop=None, error=None)
        if zoomed[t]:
            turn["bbox"] = [float(v) for v in traj.turn_bbox[row, t]]
            turn["crop"] = ip.image_from_frames(traj.crop_frames[row, crops], traj.crop_grid_thw[row, crops])
            crops += 1
        elif int(traj.turn_status[row, t]) == tools.STATUS_ERROR:
            turn["error"] = tools.ERROR_MESSAGES.get(int(traj.turn_error[row, t]), "invalid tool call")
        turns.append(turn)
    return turns


def nan_to_none(summary: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
