"""V*-mini as an experiment of the generic trainer (`launch.train --config=configs/vstar_mini.py`).

The hooks of `train.experiment.Experiment`: the model is a tiny Qwen2.5-VL base model taught by a
supervised stage (trained on first use, then loaded); the prompts are procedural V*-style scenes; the
held-out split is summarised by hard / easy question; before training the base model is probed
(perception with / without the ground-truth crop, grounding, linear read-outs of its image tokens);
the report is the before/after table plus rendered trajectories.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os

import jax
from jax.experimental import multihost_utils

from deepeyes_jax import sharding as shd
from deepeyes_jax.data import chat
from deepeyes_jax.data.records import PromptRecord
from deepeyes_jax.data.tokenizer import COMPACT_SYSTEM_PROMPT, SYSTEM_PROMPT
from deepeyes_jax.eval import render
from deepeyes_jax.eval.evaluator import take_rows, turns_of
from deepeyes_jax.models.qwen2_5_vl import ModelConfig, TextConfig, VisionConfig
from deepeyes_jax.rollout.zoom import CropSpec
from deepeyes_jax.sft.conversation import Shapes
from deepeyes_jax.sft.step import make_scorer
from deepeyes_jax.train import experiment, model_spec, trainer
from deepeyes_jax.train.config_lib import build
from deepeyes_jax.vstar_mini import base_model, dataset, probes, tasks
from deepeyes_jax.vstar_mini.feature_probe import linear_readout
from deepeyes_jax.vstar_mini.world import WorldConfig

SYSTEM_PROMPTS = {"compact": COMPACT_SYSTEM_PROMPT, "deepeyes": SYSTEM_PROMPT}


@dataclasses.dataclass(frozen=True)
class BaseModelConfig:
    """The base model's architecture (its vocabulary and special ids come from its tokenizer)."""

    tokenizer_vocab: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    mrope_section: tuple[int, int, int] = (4, 6, 6)
    vision_depth: int = 2
    vision_hidden_size: int = 128
    vision_heads: int = 4

    def model_config(self, spec: model_spec.ModelSpec) -> ModelConfig:
        return ModelConfig(
            text=TextConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                            num_key_value_heads=self.num_key_value_heads, mrope_section=tuple(self.mrope_section)),
            vision=VisionConfig(depth=self.vision_depth, hidden_size=self.vision_hidden_size,
                                intermediate_size=2 * self.vision_hidden_size, num_heads=self.vision_heads,
                                out_hidden_size=self.hidden_size, fullatt_block_indexes=(self.vision_depth - 1,)),
            **spec.runtime())


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """The supervised stage that makes the base model (see `tasks` for the tasks)."""

    steps: int = 200
    batch: int = 32
    learning_rate: float = 2e-3
    warmup: int = 20
    seq_len: int = 352
    tool_prior: float = 0.25
    box_grid: int = 56
    task_weights: dict = dataclasses.field(default_factory=lambda: dict(
        scene=2.0, easy=1.0, closeup=1.0, second=1.0, observed=2.0, grounding=1.0, tool_call=1.0))


@dataclasses.dataclass(frozen=True)
class VStarMiniConfig:
    """data_dir / seed / num_train / num_test: the generated TFDS dataset. test_seed >= 0: evaluate on the test
    split of a freshly generated dataset with that seed. base_model_dir: where the base model is trained on first
    use and loaded after (default WORKDIR/base_model; a set model.checkpoint is loaded instead).
    probe_examples: hard held-out scenes probed before training. render: trajectories drawn after training."""

    data_dir: str = "~/.cache/deepeyes_jax/tfds"
    seed: int = 0
    num_train: int = 2048
    num_test: int = 256
    test_seed: int = -1
    world: WorldConfig = WorldConfig()
    system_prompt: str = "compact"
    base_model_dir: str = ""
    base_model: BaseModelConfig = BaseModelConfig()
    sft: SFTConfig = SFTConfig()
    probe_examples: int = 64
    render: int = 4

    def __post_init__(self):
        if self.system_prompt not in SYSTEM_PROMPTS:
            raise ValueError(f"vstar_mini.system_prompt={self.system_prompt!r}; choose one of {sorted(SYSTEM_PROMPTS)}")


def load_splits(v: VStarMiniConfig) -> dict:
    """{"train", "test"} scene sources (built on first use, by process 0 while the others wait); test from
    `test_seed` when it is >= 0."""
    build_then_open = functools.partial(dataset.load, os.path.expanduser(v.data_dir), num_train=v.num_train,
                                        num_test=v.num_test, world=v.world)

    def load(seed):
        if jax.process_count() > 1:
            if jax.process_index() == 0:
                build_then_open(seed=seed)
            multihost_utils.sync_global_devices(f"vstar_mini_dataset_{seed}")
        return build_then_open(seed=seed)

    splits = load(seed=v.seed)
    if v.test_seed >= 0 and v.test_seed != v.seed:
        splits = dict(splits, test=load(seed=v.test_seed)["test"])
    return splits


class Records:
    """A scene source as `PromptRecord`s (DeepEyes' prompt layout, the target box, hard / easy category)."""

    def __init__(self, scenes, system_prompt: str):
        self.scenes, self.system_prompt = scenes, system_prompt

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, i: int) -> PromptRecord:
        s = self.scenes[i]
        return PromptRecord(prompt=chat.deepeyes_prompt(s["question"], self.system_prompt), image=s["image"],
                            ground_truth=s["answer"], question=s["question"], data_source=s["data_source"],
                            box=tuple(s["target_box"]), category="hard" if s["hard"] else "easy", index=i)


TABLE_ROWS = (("hard/accuracy", "accuracy, hard questions"), ("easy/accuracy", "accuracy, easy questions"),
              ("hard/tool_call_rate", "tool-call rate, hard"), ("easy/tool_call_rate", "tool-call rate, easy"),
              ("hard/zooms_per_trajectory", "zoom calls / trajectory, hard"),
              ("easy/zooms_per_trajectory", "zoom calls / trajectory, easy"),
              ("hard/grounding_iou", "grounding IoU of zoom boxes, hard"),
              ("hard/response_length", "response length (tokens), hard"),
              ("easy/response_length", "response length (tokens), easy"))


class VStarMini(experiment.Experiment):
    eval_group = "hard"

    def __init__(self, cfg, workdir, mesh):
        super().__init__(cfg, workdir, mesh)
        self.v = build(VStarMiniConfig, cfg.vstar_mini, where="vstar_mini")
        self.crop = build(CropSpec, cfg.rollout.crop, where="rollout.crop")
        if self.v.world.size > min(self.crop.image_height, self.crop.image_width):
            raise ValueError(f"vstar_mini.world.size {self.v.world.size} exceeds the image buffer "
                             f"rollout.crop {self.crop.image_height}x{self.crop.image_width}")
        self.splits = load_splits(self.v)
        self.budgets = tasks.Budgets(scene_max_pixels=self.data.max_pixels, crop=self.crop,
                                     system_prompt=SYSTEM_PROMPTS[self.v.system_prompt], tool_prior=self.v.sft.tool_prior,
                                     box_grid=self.v.sft.box_grid, kinds=tuple(self.v.world.kinds))
        self.shapes = Shapes(seq_len=self.v.sft.seq_len, prompt_patches=max(self.data.num_patches, self.crop.max_patches),
                             crop_patches=self.crop.max_patches, max_crops=1)
        self.sft_report = None

    def _put(self, tree):
        return trainer.replicated(tree, self.mesh)

    def _fetch(self, tree):
        return shd.to_host(tree, self.mesh)

    def model(self):
        spec = build(model_spec.ModelSpec, self.cfg.model, where="model")
        if spec.checkpoint:
            return model_spec.load(spec, self.mesh, seed=self.cfg.seed)
        directory = self.v.base_model_dir or os.path.join(self.workdir, "base_model")
        tokenizer, model, self.sft_report = base_model.load_or_train(
            directory, model_config=self.v.base_model.model_config(spec), vocab_size=self.v.base_model.tokenizer_vocab,
            source=self.splits["train"], budgets=self.budgets, shapes=self.shapes, sft=self.v.sft, mesh=self.mesh,
            put=self._put, fetch=self._fetch, seed=self.cfg.seed)
        return tokenizer, model

    def train_source(self):
        return Records(self.splits["train"], self.budgets.system_prompt)

    def eval_source(self):
        return Records(self.splits["test"], self.budgets.system_prompt)

    def before_training(self, *, model, params, tokenizer) -> dict:
        test = self.splits["test"]
        hard = list(itertools.islice((s for s in (test[i] for i in range(len(test))) if s["hard"]),
                                     self.v.probe_examples))
        shapes = self.shapes._replace(seq_len=self.cfg.rollout.max_total_len)
        out = probes.perception_probe(make_scorer(model), params, hard, tokenizer, self.budgets, shapes,
                                      batch=self.eval.batch, put=self._put, fetch=self._fetch)
        out.update(linear_readout(model, [test[i] for i in range(min(len(test), self.v.probe_examples))],
                                  self.data.max_pixels, self._put, self._fetch))
        report = {f"probe/{k}": v for k, v in out.items()}
        return dict(report, sft=self.sft_report) if self.sft_report is not None else report

    def describe_eval(self) -> dict:
        return {"test_seed": self.v.test_seed if self.v.test_seed >= 0 else self.v.seed}

    def report(self, *, before, after, result, tokenizer) -> str:
        render_examples(result, self.splits["test"], tokenizer, os.path.join(self.workdir, "examples"),
                        self.v.render)
        return experiment.summary_table(before, after, TABLE_ROWS, title="held-out V*-mini")


def render_examples(result, scenes, tokenizer, directory: str, count: int) -> list[str]:
    """Save `count` evaluated trajectories as PNGs: hard ones with zooms first, then the others."""
    if jax.process_index() == 0:
        os.makedirs(directory, exist_ok=True)
    order = sorted(result.rows, key=lambda r: (r["category"] != "hard", r["zooms"] == 0, r["batch"], r["row"]))
    paths = []
    for r in order[:count]:
        traj, score, _ = result.outputs[r["batch"]]
        one = take_rows(traj, [r["row"]])
        scene = scenes[r["index"]]
        image = render.render_trajectory(scene["image"], scene["question"], turns_of(one, 0, tokenizer),
                                         gt_box=scene["target_box"], answer=scene["answer"], correct=r["acc"] > 0.5)
        paths.append(os.path.join(directory, f"example_{len(paths)}_{scene['kind']}.png"))
        if jax.process_index() == 0:
            image.save(paths[-1])
    return paths
