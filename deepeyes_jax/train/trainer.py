"""The pieces of `launch.train` that are more than one line: config -> programs, train state, evaluation.

Everything here is host-count agnostic: batches are global arrays assembled from each host's rows
(`input_pipeline`), metrics come back as replicated scalars, checkpoints are written by every host for
its shards (orbax) and restored onto whatever mesh the run has now.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
from absl import logging

from deepeyes_jax.eval.evaluator import EvalConfig, Evaluator, nan_to_none
from deepeyes_jax.rl.grpo import GRPOConfig
from deepeyes_jax.rl.judge import JudgeClient, JudgeConfig
from deepeyes_jax.rl.rewards import RewardConfig
from deepeyes_jax.rl.train_step import (ActorConfig, OptimConfig, TrainConfig, make_judged_train_step,
                                        make_train_step, optimizer)
from deepeyes_jax.rollout.config import RolloutConfig
from deepeyes_jax.train import checkpoints
from deepeyes_jax.train.config_lib import build
from deepeyes_jax.train.input_pipeline import PromptBatches


def use_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache (call after `jax.distributed.initialize`), except for
    multi-process CPU runs: measured with jax 0.10.2, a 2-process CPU job that loads executables from the cache
    (whether a 1-process 8-device run or an earlier 2-process run wrote them) breaks its gloo collectives."""
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        logging.info("persistent compilation cache off: multi-process CPU run")
        return None
    path = os.environ.get("DEEPEYES_JAX_CACHE", os.path.expanduser("~/.cache/deepeyes_jax/xla"))
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def train_config(cfg) -> TrainConfig:
    return TrainConfig(rollout=build(RolloutConfig, cfg.rollout, where="rollout"),
                       grpo=build(GRPOConfig, cfg.grpo, where="grpo"),
                       reward=build(RewardConfig, cfg.reward, where="reward"),
                       actor=build(ActorConfig, cfg.actor, where="actor"))


def replicated(tree, mesh):
    """Host values (the same on every host) -> arrays replicated over the whole mesh."""
    with jax.transfer_guard("allow"):
        return jax.device_put(jax.tree.map(np.asarray, tree),
                              jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def key(seed: int, mesh):
    """A typed PRNG key replicated over the mesh."""
    with jax.transfer_guard("allow"):
        return replicate_key(jax.random.key(seed), mesh)


def replicate_key(key, mesh):
    """A typed key (e.g. restored onto one device) replicated over the mesh, through its host key data: a
    multi-host mesh is not addressable from one host's default device."""
    with jax.transfer_guard("allow"):
        data = np.asarray(jax.random.key_data(key))
        return jax.random.wrap_key_data(replicated(data, mesh), impl=jax.random.key_impl(key))


def fetch(metrics: dict) -> dict:
    """Replicated scalars -> {name: float} (a replicated array is readable on every host)."""
    with jax.transfer_guard("allow"):
        return {k: float(np.asarray(v)) for k, v in metrics.items()}


class Step:
    """The train step the config asks for: fused, or judged when judge.base_url is set.

    step(params, opt_state, batch, rows, rng) -> (params, opt_state, metrics on device)."""

    def __init__(self, model, config: TrainConfig, templates, table, *, tokenizer, judge: JudgeConfig, optim, mesh,
                 rules):
        self.tx = optimizer(optim)
        with jax.transfer_guard("allow"):  # the optimizer state's initial values
            self._make(model, config, templates, table, tokenizer, judge, mesh, rules)

    def _make(self, model, config, templates, table, tokenizer, judge, mesh, rules):
        if judge.base_url:
            fn, self.params, self.opt_state = make_judged_train_step(
                model, self.tx, config, templates, table, tokenizer=tokenizer, judge=JudgeClient(judge), mesh=mesh,
                rules=rules)
            self._run = lambda p, o, batch, rows, rng: fn(p, o, batch, rng, [r["record"].question for r in rows],
                                                          [r["record"].ground_truth for r in rows])
        else:
            fn, self.params, self.opt_state = make_train_step(model, self.tx, config, templates, table)
            self._run = lambda p, o, batch, rows, rng: fn(p, o, batch, rng)

    def __call__(self, params, opt_state, batch, rows, rng):
        params, opt_state, metrics, _, _ = self._run(params, opt_state, batch, rows, rng)
        return params, opt_state, metrics


def restore_or_init(ckpt: checkpoints.Checkpointer, step: Step, mesh, rules, rng):
    """-> (start step, params, opt_state, rng, data state): the latest good checkpoint, or the fresh state laid
    out exactly as a restored one would be (so the step compiles once either way)."""
    abstract = checkpoints.abstract_params(step.params, mesh, rules)
    abstract_opt = checkpoints.abstract_opt_state(step.tx, abstract)
    with jax.transfer_guard("allow"):
        restored = ckpt.restore(abstract_params=abstract, abstract_opt_state=abstract_opt)
        if restored is not None:
            logging.info("resumed from step %d (data position %s)", restored.step, restored.data_state)
            return (restored.step, restored.params, restored.opt_state, replicate_key(restored.rng, mesh),
                    restored.data_state)
        shardings = lambda tree: jax.tree.map(lambda a: a.sharding, tree)  # noqa: E731
        return (0, jax.device_put(step.params, shardings(abstract)),
                jax.device_put(step.opt_state, shardings(abstract_opt)), rng, {})


def eval_batches(source, eval_cfg: EvalConfig, *, examples: int, tokenizer, data, crop, reward, mesh, rules):
    """An in-order pass over the first `examples` prompts (0: all) of the held-out source."""
    if examples:
        source = _Prefix(source, examples)
    return PromptBatches(source, tokenizer=tokenizer, data=data, crop=crop, prompts=eval_cfg.batch, group_size=1,
                         mesh=mesh, rules=rules, reward=reward, shuffle=False)


class _Prefix:
    def __init__(self, source, n: int):
        self.source, self.n = source, min(n, len(source))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]


def make_evaluator(model, config: TrainConfig, templates, table, mesh, rules) -> Evaluator:
    return Evaluator(model, config, templates, table, mesh=mesh, rules=rules)


def save_json(path: str, obj) -> None:
    """Written by process 0, atomically (a reader never sees half a file)."""
    if jax.process_index() != 0:
        return
    with open(path + ".tmp", "w") as f:
        json.dump(nan_to_none(obj) if isinstance(obj, dict) else obj, f, indent=1, default=float)
    os.replace(path + ".tmp", path)


def load_json(path: str) -> dict:
    with open(path) as f:
        return {k: (math.nan if v is None else v) for k, v in json.load(f).items()}
