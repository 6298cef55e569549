"""V*-mini as an experiment of the generic trainer (`launch.train --config=configs/vstar_mini.py`).

The hooks of `train.experiment.Experiment`: the model is a tiny Qwen2.5-VL base model taught by a
supervised stage: the one shipped in `vstar_mini/pretrained` (made by `launch.pretrain_base`, checked
against the run's settings), or retrained in the run's workdir with `vstar_mini.retrain_base`; the prompts
are procedural V*-style scenes; the held-out split is summarised by hard / easy question; the starting
model's skill table (`skills`) is stored with the first evaluation; the report is the before/after table
plus rendered trajectories.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import sys

import jax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from deepeyes_jax import sharding as shd
from deepeyes_jax.data import chat
from deepeyes_jax.data.records import PromptRecord
from deepeyes_jax.data.tokenizer import COMPACT_SYSTEM_PROMPT, SYSTEM_PROMPT
from deepeyes_jax.eval import render
from deepeyes_jax.eval.evaluator import take_rows, turns_of
from deepeyes_jax.models.qwen2_5_vl import ModelConfig, TextConfig, VisionConfig
from deepeyes_jax.rollout import tools
from deepeyes_jax.rollout.config import make_templates
from deepeyes_jax.rollout.zoom import CropSpec
from deepeyes_jax.sft.conversation import Shapes
from deepeyes_jax.sft.step import make_scorer
from deepeyes_jax.train import checkpoints, experiment, model_spec, trainer
from deepeyes_jax.train.config_lib import build
from deepeyes_jax.vstar_mini import base_model, dataset, probes, skills, tasks, vision_stage
from deepeyes_jax.vstar_mini.feature_probe import linear_readout
from deepeyes_jax.vstar_mini.world import WorldConfig

SYSTEM_PROMPTS = {"compact": COMPACT_SYSTEM_PROMPT, "deepeyes": SYSTEM_PROMPT}
SHIPPED_BASE_MODEL = os.path.join(os.path.dirname(__file__), "pretrained")


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
    # M-RoPE base. Qwen's 1e6 turns a key by ~2e-4 rad per image column at this head size, leaving the decoder
    # no usable signal of where an image token is (README: V*-mini diagnosis); 100 makes it ~0.01-0.06 rad.
    rope_theta: float = 1e6
    vision_depth: int = 2
    vision_hidden_size: int = 128
    vision_heads: int = 4

    def model_config(self, spec: model_spec.ModelSpec) -> ModelConfig:
        return ModelConfig(
            text=TextConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                            num_key_value_heads=self.num_key_value_heads, mrope_section=tuple(self.mrope_section),
                            rope_theta=self.rope_theta),
            vision=VisionConfig(depth=self.vision_depth, hidden_size=self.vision_hidden_size,
                                intermediate_size=2 * self.vision_hidden_size, num_heads=self.vision_heads,
                                out_hidden_size=self.hidden_size, fullatt_block_indexes=(self.vision_depth - 1,)),
            **spec.runtime())


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """The supervised stage that makes the base model (see `tasks` for the tasks)."""

    steps: int = 200
    save_every: int = 100  # checkpoints of the stage (resumable), in the base model's checkpoint directory
    batch: int = 32
    learning_rate: float = 2e-3
    warmup: int = 20
    seq_len: int = 352
    # Patch slots of a crop in the stage's conversations (0: the crop budget's worst case, rollout.crop.max_patches).
    # Its crops are square (one patch count under the budget); a conversation that needs more is skipped, counted.
    crop_patches: int = 0
    # False: the vision tower stays as the vision stage left it. Trained through the language model it drifts
    # (measured: a token's grid row read out linearly 0.87 -> 0.38 and the stripes 0.94 -> 0.72 over 1000 steps).
    train_tower: bool = True
    tool_prior: float = 0.25
    box_grid: int = 56
    task_weights: dict = dataclasses.field(default_factory=lambda: dict(
        scene=2.0, easy=1.0, closeup=1.0, second=1.0, observed=2.0, grounding=1.0, tool_call=1.0))


@dataclasses.dataclass(frozen=True)
class RefineConfig:
    """A second supervised cycle on the first one's weights (steps 0: none): a fresh AdamW on its own warmup-cosine
    schedule (a warm restart) and task mix, weighted toward a skill still short of its target. It takes nothing
    from the first cycle but its weights, so it can also start from a finished base model of the same first-cycle
    settings (`launch.pretrain_base --first_cycle=DIR`). Its batches are drawn with seed + 1."""

    steps: int = 0
    learning_rate: float = 5e-4
    warmup: int = 20
    task_weights: dict = dataclasses.field(default_factory=dict)  # empty: the first cycle's

    def cycle(self, sft: SFTConfig) -> SFTConfig:
        """This cycle as the `SFTConfig` that `base_model.train` runs (batch, shapes and tower as the first's)."""
        return dataclasses.replace(sft, steps=self.steps, learning_rate=self.learning_rate, warmup=self.warmup,
                                   task_weights=dict(self.task_weights or sft.task_weights))


@dataclasses.dataclass(frozen=True)
class VStarMiniConfig:
    """data_dir / seed / num_train / num_test: the generated TFDS dataset. test_seed >= 0: evaluate on the test
    split of a freshly generated dataset with that seed. base_model_dir: the base model to start from (default:
    the shipped one, `vstar_mini/pretrained`); it must have been trained for this config's world, budgets,
    architecture, vision stage and supervised cycles (its manifest's settings). retrain_base: train the base model in this run
    instead, into base_model_dir (default WORKDIR/base_model; resumable from `<dir>_checkpoints`) unless it
    already holds one; a set model.checkpoint is loaded instead of either.
    probe_examples: hard held-out scenes of the skill table. render: trajectories drawn after training."""

    data_dir: str = "~/.cache/deepeyes_jax/tfds"
    seed: int = 0
    num_train: int = 2048
    num_test: int = 256
    test_seed: int = -1
    world: WorldConfig = WorldConfig()
    system_prompt: str = "compact"
    base_model_dir: str = ""
    retrain_base: bool = False
    base_model: BaseModelConfig = BaseModelConfig()
    vision: vision_stage.VisionStageConfig = vision_stage.VisionStageConfig()
    sft: SFTConfig = SFTConfig()
    refine: RefineConfig = RefineConfig()
    probe_examples: int = 64
    render: int = 4

    def __post_init__(self):
        if self.system_prompt not in SYSTEM_PROMPTS:
            raise ValueError(f"vstar_mini.system_prompt={self.system_prompt!r}; choose one of {sorted(SYSTEM_PROMPTS)}")


def base_settings(cfg) -> dict:
    """What a base model is trained for (a run with the same settings can start from it): the world, the data
    and init seeds, the budgets and prompt, the architecture, the vision stage and the supervised cycles."""
    v = build(VStarMiniConfig, cfg.vstar_mini, where="vstar_mini")
    return dict(world=dataclasses.asdict(v.world), data_seed=v.seed, num_train=v.num_train, init_seed=cfg.seed,
                scene_max_pixels=cfg.data.max_pixels, crop=dataclasses.asdict(build(CropSpec, cfg.rollout.crop)),
                system_prompt=v.system_prompt, base_model=dataclasses.asdict(v.base_model),
                vision=dataclasses.asdict(v.vision), sft=dataclasses.asdict(v.sft), refine=dataclasses.asdict(v.refine))


def differing_settings(theirs: dict, ours: dict) -> list[str]:
    """The top-level keys of two base-model settings dicts whose values differ."""
    return sorted(k for k in set(theirs) | set(ours)
                  if base_model.settings_digest({k: theirs.get(k)}) != base_model.settings_digest({k: ours.get(k)}))


def check_first_cycle(directory: str, manifest: dict | None, ours: dict) -> None:
    """Raise unless `manifest` (of the base model in `directory`, None if it has none) is a finished base model
    without a refining cycle, trained for the settings `ours` apart from the refining cycle."""
    if manifest is None:
        raise FileNotFoundError(f"--first_cycle={directory} holds no finished base model ({base_model.MANIFEST} "
                                f"missing)")
    theirs = manifest.get("settings", {})
    if (theirs.get("refine") or {}).get("steps", 0):
        raise ValueError(f"--first_cycle={directory} already had a refining cycle ({theirs['refine']['steps']} "
                         f"steps): start from a base model without one")
    differ = differing_settings({k: v for k, v in theirs.items() if k != "refine"},
                                {k: v for k, v in ours.items() if k != "refine"})
    if differ:
        raise ValueError(f"--first_cycle={directory} was trained for other settings ({', '.join(differ)} differ)")


def command_line() -> str:
    """This process's command as typed: `python -m launch.x ...` for a module run with -m."""
    main, args = sys.argv[0], sys.argv[1:]
    parts = os.path.normpath(os.path.abspath(main)).split(os.sep)
    if main.endswith(".py") and len(parts) >= 2 and parts[-2] in ("launch", "benchmarks"):
        return " ".join(["python", "-m", f"{parts[-2]}.{parts[-1][:-3]}", *args])
    return " ".join(["python", main, *args])


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
        crop_patches = self.v.sft.crop_patches or self.crop.max_patches
        closeup = self.v.sft.task_weights.get("closeup", 0) > 0  # a crop as the first image
        self.shapes = Shapes(seq_len=self.v.sft.seq_len, crop_patches=crop_patches, max_crops=1,
                             prompt_patches=max(self.data.num_patches, crop_patches * closeup))
        self.base_manifest = None  # the starting base model's manifest (its skill table)

    def _put(self, tree):
        return trainer.replicated(tree, self.mesh)

    def _fetch(self, tree):
        return shd.to_host(tree, self.mesh)

    def model(self):
        spec = build(model_spec.ModelSpec, self.cfg.model, where="model")
        if spec.checkpoint:
            return model_spec.load(spec, self.mesh, seed=self.cfg.seed)
        if self.v.retrain_base:
            directory = self.v.base_model_dir or os.path.join(self.workdir, "base_model")
            if base_model.read_manifest(directory) is None:
                self.pretrain(directory, directory.rstrip("/") + "_checkpoints")
        else:
            directory = self.v.base_model_dir or SHIPPED_BASE_MODEL
        manifest = base_model.read_manifest(directory)
        if manifest is None:
            raise FileNotFoundError(f"{directory} holds no finished base model ({base_model.MANIFEST} missing): run "
                                    f"`python -m launch.pretrain_base` or set --config.vstar_mini.retrain_base=True")
        ours = base_settings(self.cfg)
        if manifest.get("settings_digest") != base_model.settings_digest(ours):
            theirs = manifest.get("settings", {})
            raise ValueError(f"the base model in {directory} was trained for other settings "
                             f"({', '.join(differing_settings(theirs, ours))} "
                             f"differ): set --config.vstar_mini.retrain_base=True, or make one with "
                             f"`python -m launch.pretrain_base` and pass --config.vstar_mini.base_model_dir")
        tokenizer, model, self.base_manifest = base_model.load(directory, self._base_config(), self.mesh)
        return tokenizer, model

    def _base_config(self):
        """The base model's `ModelConfig`: its architecture under the run's model section (dtype, remat, ...)."""
        return self.v.base_model.model_config(build(model_spec.ModelSpec, self.cfg.model, where="model"))

    def pretrain(self, directory: str, checkpoint_dir: str, first_cycle: str = "") -> dict:
        """Train the base model: its vision tower (`vision_stage`) and the first supervised cycle (resumable from
        `checkpoint_dir`), or take both from the finished base model in `first_cycle`; then the refining cycle
        (`vstar_mini.refine`, resumable from `checkpoint_dir`/refine); measure its skills, save it with its
        manifest."""
        if first_cycle:
            tokenizer, model, parent = self.load_first_cycle(first_cycle)
            vision_report = parent["vision_stage"]
            report = dict(steps=parent["steps"], batch=parent["batch"], skipped=parent["skipped"],
                          seconds=parent["wall_seconds"] - vision_report["seconds"], history=parent["history"])
            params = nnx.state(model)
        else:
            tokenizer, model = base_model.fresh(self._base_config(), world=self.v.world,
                                                vocab_size=self.v.base_model.tokenizer_vocab, seed=self.cfg.seed,
                                                mesh=self.mesh)
            ckpt = checkpoints.Checkpointer(checkpoint_dir, save_every=self.v.sft.save_every, keep=2)
            vision_report = self.vision_stage(model, ckpt, os.path.join(checkpoint_dir, "vision_stage.json"))
            params, report = self._supervised(model, tokenizer, self.v.sft, self.cfg.seed, ckpt)
        refined = None
        if self.v.refine.steps:
            ckpt = checkpoints.Checkpointer(os.path.join(checkpoint_dir, "refine"), save_every=self.v.sft.save_every,
                                            keep=2)
            params, refined = self._supervised(nnx.merge(nnx.graphdef(model), params), tokenizer,
                                               self.v.refine.cycle(self.v.sft), self.cfg.seed + 1, ckpt)
        model = nnx.merge(nnx.graphdef(model), params)
        table, settings = self.skill_table(model, params, tokenizer), base_settings(self.cfg)
        seconds = report["seconds"] + vision_report["seconds"] + (refined["seconds"] if refined else 0.0)
        manifest = dict(command=command_line(), steps=report["steps"],
                        batch=report["batch"], wall_seconds=round(seconds, 1),
                        skipped=report["skipped"], data_seed=self.v.seed, init_seed=self.cfg.seed, skills=table,
                        settings_digest=base_model.settings_digest(settings), settings=settings,
                        vision_stage=vision_report, history=report["history"])
        if refined:
            manifest["refine"] = refined
        if first_cycle:
            manifest["first_cycle"] = dict(directory=first_cycle, command=parent["command"],
                                           wall_seconds=parent["wall_seconds"], skills=parent["skills"])
        base_model.save(directory, model, tokenizer, manifest)
        return manifest

    def _supervised(self, model, tokenizer, sft: SFTConfig, seed: int, ckpt) -> tuple:
        """One supervised cycle of `model`, checkpointed by (and then closing) `ckpt` -> (params, report)."""
        try:
            return base_model.train(model, tokenizer, self.splits["train"], self.budgets, self.shapes, sft, seed=seed,
                                    put=self._put, fetch=self._fetch, mesh=self.mesh, ckpt=ckpt)
        finally:
            ckpt.close()

    def load_first_cycle(self, directory: str):
        """-> (tokenizer, model, manifest) of the finished base model in `directory`, which must have been trained
        for this config's first-cycle settings and have no refining cycle of its own."""
        check_first_cycle(directory, base_model.read_manifest(directory), base_settings(self.cfg))
        return base_model.load(directory, self._base_config(), self.mesh)

    def vision_stage(self, model, ckpt, record: str) -> dict:
        """Train `model`'s vision tower in place unless the supervised stage has a checkpoint to resume (which
        holds the trained tower); -> its report (steps, seconds, history, held-out accuracy per head), kept in
        `record` for a resumed run."""
        if ckpt.latest_step() is not None:
            with open(record) as f:
                return json.load(f)
        if not self.v.vision.steps:
            return dict(steps=0, seconds=0.0)
        report = vision_stage.train_tower(model, self.splits["train"], self.budgets, self.v.vision, seed=self.cfg.seed,
                                          put=self._put, fetch=self._fetch)
        test = self.splits["test"]
        held = [test[i] for i in range(min(len(test), self.v.probe_examples))]
        report["held_out"] = vision_stage.evaluate_tower(model, report.pop("head"), held, self.budgets, put=self._put,
                                                         fetch=self._fetch, batch_size=min(16, len(held)))
        logging.info("vision stage held-out accuracy: %s", report["held_out"])
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(record), exist_ok=True)
            with open(record + ".tmp", "w") as f:
                json.dump(report, f)
            os.replace(record + ".tmp", record)
        return report

    def skill_table(self, model, params, tokenizer) -> dict:
        """The model's skills on the first `probe_examples` hard held-out scenes (and the held-out questions)."""
        test = self.splits["test"]
        hard = list(itertools.islice((s for s in (test[i] for i in range(len(test))) if s["hard"]),
                                     self.v.probe_examples))
        shapes = self.shapes._replace(seq_len=self.cfg.rollout.max_total_len)
        probe = probes.perception_probe(make_scorer(model), params, hard, tokenizer, self.budgets, shapes,
                                        batch=self.eval.batch, put=self._put, fetch=self._fetch)
        rules, config = model.config.axis_rules, trainer.train_config(self.cfg)
        table = trainer.replicated(tools.token_bytes(tokenizer), self.mesh)
        evaluate = trainer.make_evaluator(model, config, make_templates(tokenizer), table, self.mesh, rules)
        rng = trainer.key(self.cfg.seed + 1, self.mesh)

        def run(source, examples):
            return evaluate(params, trainer.eval_batches(source, self.eval, examples=examples, tokenizer=tokenizer,
                                                         data=self.data, crop=config.rollout.crop,
                                                         reward=config.reward, mesh=self.mesh, rules=rules), rng)

        records = skills.asked_records(hard, self.budgets.system_prompt)
        asked = skills.generated_skills(run(records, 0), records, tokenizer)
        held = run(self.eval_source(), self.eval.final_examples).summary
        out = dict(hard_accuracy_gt_crop=probe["gt_crop"], hard_accuracy_no_crop=probe["no_crop"],
                   chance=probe["chance"], grounding_choice=probe["grounding"], **asked,
                   tool_call_rate_hard=held.get("hard/tool_call_rate"),
                   tool_call_rate_easy=held.get("easy/tool_call_rate"),
                   accuracy_hard=held.get("hard/accuracy"), accuracy_easy=held.get("easy/accuracy"), examples=len(hard))
        out.update(linear_readout(model, [test[i] for i in range(min(len(test), self.v.probe_examples))],
                                  self.data.max_pixels, self._put, self._fetch))
        return out

    def train_source(self):
        return Records(self.splits["train"], self.budgets.system_prompt)

    def eval_source(self):
        return Records(self.splits["test"], self.budgets.system_prompt)

    def before_training(self, *, model, params, tokenizer) -> dict:
        """The starting model's skill table: the shipped base model's manifest has it; another model is measured."""
        table = self.base_manifest["skills"] if self.base_manifest else self.skill_table(model, params, tokenizer)
        return {f"probe/{k}": v for k, v in table.items()}

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
