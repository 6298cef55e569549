"""What a training run is made of, besides the generic loop: the model, the prompts, the held-out set,
and what is measured before and reported after. `Experiment` is DeepEyes on prepared data; an
experiment package (e.g. `deepeyes_jax.vstar_mini`) subclasses it and overrides the hooks.

Hooks, in the order `launch.train` calls them:
  model()                 -> (tokenizer, model): `ModelSpec` (a Hugging Face directory or a preset)
  train_source()          -> random-access source of `data.records.PromptRecord`s
  eval_source()           -> the held-out source, or None
  before_training(...)    -> extra numbers stored with the first evaluation (e.g. probes)
  report(...)             -> markdown summary; may write files (renderings) into the workdir
  describe_eval()         -> what identifies the held-out set, stored with a standalone evaluation
"""

from __future__ import annotations

import math

from deepeyes_jax.data import prepared
from deepeyes_jax.eval.evaluator import EvalConfig
from deepeyes_jax.train import model_spec
from deepeyes_jax.train.config_lib import build
from deepeyes_jax.train.input_pipeline import DataConfig


class Experiment:
    eval_group = "all"  # the held-out summary group plotted beside the training curves

    def __init__(self, cfg, workdir: str, mesh):
        self.cfg, self.workdir, self.mesh = cfg, workdir, mesh
        self.data = build(DataConfig, cfg.data, where="data")
        self.eval = build(EvalConfig, cfg.eval, where="eval")

    def model(self):
        spec = build(model_spec.ModelSpec, self.cfg.model, where="model")
        return model_spec.load(spec, self.mesh, seed=self.cfg.seed)

    def train_source(self):
        if not self.data.train_dir:
            raise ValueError("set data.train_dir to a prepared prompt dataset (python -m launch.prepare_data)")
        return prepared.open_split(self.data.train_dir, self.data.train_split,
                                   max_image_pixels=self.data.max_image_pixels)

    def eval_source(self):
        if not self.eval.data_dir:
            return None
        return prepared.open_split(self.eval.data_dir, self.eval.split, max_image_pixels=self.data.max_image_pixels)

    def before_training(self, *, model, params, tokenizer) -> dict:
        del model, params, tokenizer
        return {}

    def report(self, *, before: dict, after: dict, result, tokenizer) -> str:
        del result, tokenizer
        return summary_table(before, after)

    def describe_eval(self) -> dict:
        return {"eval_data": self.eval.data_dir, "eval_split": self.eval.split}


def summary_table(before: dict, after: dict, rows=None, title: str = "held-out") -> str:
    """Markdown table of held-out numbers before and after training (every `group/metric` key by default)."""
    keys = rows or [(k, k) for k in sorted(set(before) | set(after)) if "/" in k and not k.startswith("probe/")]
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
    lines = [f"| {title} | before RL | after RL |", "|---|---|---|"]
    return "\n".join(lines + [f"| {label} | {fmt(before.get(k))} | {fmt(after.get(k))} |" for k, label in keys])
