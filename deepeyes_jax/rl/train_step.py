"""The fused GRPO step: rollout, rewards, advantages, loss, gradient and update as ONE program.

    step(params, opt_state, batch, rng) -> (params, opt_state, metrics, trajectories)

Rows of a batch come in groups: each prompt repeated `group_size` times, consecutively. The old
log-probs are the rollout's own (they equal a teacher-forced pass to ~1e-5 in fp32, see
tests/test_rollout.py), so one rollout feeds one update without a second forward. Parameters and
optimizer state are donated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deepeyes_jax.rl import grpo, rewards
from deepeyes_jax.rl.trajectory_forward import trajectory_logprobs
from deepeyes_jax.rollout import config as rc
from deepeyes_jax.rollout import tools
from deepeyes_jax.rollout.inputs import RolloutBatch
from deepeyes_jax.rollout.sampler import Trajectories, rollout_program


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    rollout: rc.RolloutConfig
    grpo: grpo.GRPOConfig
    reward: rewards.RewardConfig = rewards.RewardConfig()
    logprob_chunk: int = 512  # sequence positions per chunk of the log-prob computation
    mini_batches: int = 1  # optimizer updates per rollout batch (rows split evenly; old log-probs = rollout's)
    micro_batches: int = 1  # gradient accumulation steps inside each update (exact, see micro_batch_weight)


class TrainBatch(NamedTuple):
    rollout: RolloutBatch  # B = prompts * group_size rows, groups consecutive
    answer: jax.Array  # uint8[B, G]: ground truth, UTF-8
    answer_len: jax.Array  # int32[B]
    source_kind: jax.Array  # int32[B]: rewards.SOURCE_TOOL / SOURCE_MATH


def make_optimizer(learning_rate, *, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                   b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
    """Gradient clipping then AdamW; `learning_rate` may be an optax schedule."""
    parts = [] if max_grad_norm is None else [optax.clip_by_global_norm(max_grad_norm)]
    return optax.chain(*parts, optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay))


def _split_rows(tree, n: int):
    """Split every array's row axis into [n, rows / n] (position_ids keep rows on their axis 1)."""
    def split(x, axis=0):
        x = jnp.moveaxis(x, axis, 0)
        return jnp.moveaxis(x.reshape(n, x.shape[0] // n, *x.shape[1:]), 1, axis + 1)

    def go(x):
        if isinstance(x, Trajectories):
            return x._replace(**{f: split(getattr(x, f), 1 if f == "position_ids" else 0) for f in x._fields})
        return split(x)

    return jax.tree.map(go, tree, is_leaf=lambda x: isinstance(x, Trajectories))


def _mean(x, where):
    where = where.astype(jnp.float32)
    return jnp.sum(x * where) / jnp.maximum(jnp.sum(where), 1.0)


def rollout_and_score(graphdef, cfg: TrainConfig, templates, params, batch: TrainBatch, rng, table):
    traj = rollout_program(graphdef, cfg.rollout, templates, params, batch.rollout, rng, table)
    p = batch.rollout.prompt_ids.shape[1]
    score = jax.vmap(functools.partial(rewards.reward_from_tokens, table=table, config=cfg.reward))(
        traj.tokens[:, p:], traj.attention_mask[:, p:], batch.answer, batch.answer_len, batch.source_kind,
        traj.num_zooms)
    return traj, score


def _step(graphdef, cfg: TrainConfig, templates, tx, params, opt_state, batch: TrainBatch, rng, table,
          ref_params):
    traj, score = rollout_and_score(graphdef, cfg, templates, params, batch, rng, table)
    return _update(graphdef, cfg, tx, params, opt_state, traj, score, ref_params)


def _update(graphdef, cfg: TrainConfig, tx, params, opt_state, traj, score, ref_params):
    adv = grpo.group_advantages(score["reward"], cfg.grpo.group_size, eps=cfg.grpo.adv_eps,
                                norm_by_std=cfg.grpo.norm_adv_by_std)

    def token_logprobs(params, traj):
        return trajectory_logprobs(nnx.merge(graphdef, params), traj, chunk=cfg.logprob_chunk,
                                   temperature=cfg.grpo.temperature)

    def loss_fn(params, traj, adv):
        logp, entropy = token_logprobs(params, traj)
        ref_logp = None if ref_params is None else jax.lax.stop_gradient(token_logprobs(ref_params, traj)[0])
        return grpo.policy_loss(logp, traj.logprobs[:, 1:], adv, traj.loss_mask[:, 1:], cfg.grpo,
                                ref_logp=ref_logp, entropy=entropy)

    def update(carry, data):
        params, opt_state = carry
        full_mask = data[0].loss_mask[:, 1:]

        def micro(grads, part):
            weight = grpo.micro_batch_weight(part[0].loss_mask[:, 1:], full_mask, cfg.grpo.loss_agg_mode)
            (loss, pairs), g = jax.value_and_grad(loss_fn, has_aux=True)(params, *part)
            grads = jax.tree.map(lambda a, b: a + weight * b, grads, g)
            return grads, (weight * loss, {k: v for k, v in pairs.items() if k not in ("loss", "pg_loss")})

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, (losses, pairs) = jax.lax.scan(micro, zeros, _split_rows(data, cfg.micro_batches))
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (jnp.sum(losses), pairs, optax.global_norm(grads))

    (params, opt_state), (losses, pairs, grad_norms) = jax.lax.scan(
        update, (params, opt_state), _split_rows((traj, adv), cfg.mini_batches))

    zoomed = traj.num_zooms > 0
    metrics = {k: jnp.sum(s) / jnp.maximum(jnp.sum(c), 1) for k, (s, c) in pairs.items()}
    metrics.update(
        loss=jnp.mean(losses),
        reward=jnp.mean(score["reward"]),
        accuracy=jnp.mean(score["acc"]),
        format_error=jnp.mean(score["format_error"]),
        tool_call_rate=jnp.mean(zoomed),
        zooms_per_trajectory=jnp.mean(traj.num_zooms),
        response_length=jnp.mean(traj.response_length),
        turns=jnp.mean(traj.num_turns),
        answered=jnp.mean(traj.end_reason == rc.END_ANSWER),
        accuracy_with_zoom=_mean(score["acc"], zoomed),
        grad_norm=jnp.mean(grad_norms),
        sampled_tokens=jnp.sum(traj.response_length),
    )
    rows = dict(reward=score["reward"], acc=score["acc"], format_error=score["format_error"], advantage=adv)
    return params, opt_state, metrics, traj, rows


def make_train_step(model, tx: optax.GradientTransformation, config: TrainConfig, templates: rc.Templates,
                    table: tools.TokenBytes):
    """-> (step, params, opt_state). step(params, opt_state, batch, rng) -> (params, opt_state, metrics,
    trajectories, per-row dict of reward / acc / advantage).

    params and opt_state are donated: `params` starts as the model's own arrays, so after the first
    step the model object no longer holds valid parameters (use `nnx.merge(graphdef, params)`).
    """
    if config.mini_batches < 1 or config.micro_batches < 1:
        raise ValueError(f"mini_batches {config.mini_batches} and micro_batches {config.micro_batches} must be >= 1")
    if config.rollout.temperature != config.grpo.temperature:
        raise ValueError(f"rollout temperature {config.rollout.temperature} != GRPO temperature "
                         f"{config.grpo.temperature}: the old log-probs would not match the loss's")
    graphdef, params = nnx.split(model)
    jitted = jax.jit(functools.partial(_step, graphdef, config, templates, tx), donate_argnums=(0, 1))
    # The frozen reference policy exists only when the KL term is on.
    ref_params = jax.tree.map(jnp.copy, params) if config.grpo.kl_coef > 0 else None

    def step(params, opt_state, batch: TrainBatch, rng):
        rows, parts = batch.answer.shape[0], config.mini_batches * config.micro_batches
        if rows % config.grpo.group_size or rows % parts:
            raise ValueError(f"batch of {rows} rows must divide into groups of {config.grpo.group_size} and into "
                             f"{config.mini_batches} mini x {config.micro_batches} micro batches")
        return jitted(params, opt_state, batch, rng, table, ref_params)

    step.jitted = jitted
    step.ref_params = ref_params
    return step, params, tx.init(params)


def make_judged_train_step(model, tx: optax.GradientTransformation, config: TrainConfig, templates: rc.Templates,
                           table: tools.TokenBytes, *, tokenizer, judge):
    """The LLM-judge variant: rollout program -> host judge -> update program (two compilations).

    step(params, opt_state, batch, rng, questions, ground_truths) -> like `make_train_step`, plus judge
    stats in the metrics. The judge (`rl.judge.JudgeClient`) decides accuracy from each response's
    `<answer>` text as DeepEyes does (math rows: its math prompt on the whole response); format errors
    and the zoom count still come from the on-device reward. A failed judgement scores 0 and is counted.
    """
    graphdef, params = nnx.split(model)
    score = jax.jit(functools.partial(rollout_and_score, graphdef, config, templates))
    update = jax.jit(functools.partial(_update, graphdef, config, tx), donate_argnums=(0, 1))
    ref_params = jax.tree.map(jnp.copy, params) if config.grpo.kl_coef > 0 else None
    r = config.reward

    def step(params, opt_state, batch: TrainBatch, rng, questions, ground_truths):
        traj, device_score = score(params, batch, rng, table)
        ids, valid, kind, zooms, fmt = jax.device_get((traj.tokens, traj.attention_mask, batch.source_kind,
                                                      traj.num_zooms, device_score["format_error"]))
        p = batch.rollout.prompt_ids.shape[1]
        texts = [tokenizer.decode(row[p:][v[p:]].tolist(), skip_special_tokens=False) for row, v in zip(ids, valid)]
        answers = [t.split("<answer>")[-1].split("</answer>")[0].strip() for t in texts]
        tool_rows = [i for i, k in enumerate(kind) if k == rewards.SOURCE_TOOL]
        math_rows = [i for i, k in enumerate(kind) if k == rewards.SOURCE_MATH]
        acc = np.zeros(len(texts), np.float32)
        tool_scores, stats = judge.judge_batch([(questions[i], ground_truths[i], answers[i]) for i in tool_rows])
        math_scores, math_stats = judge.judge_math_batch([(questions[i], ground_truths[i], texts[i])
                                                          for i in math_rows])
        acc[tool_rows], acc[math_rows] = tool_scores, math_scores
        too_long = np.array([len(a) >= r.max_answer_chars for a in answers]) & (kind == rewards.SOURCE_TOOL)
        acc[too_long] = 0.0
        reward = np.where(kind == rewards.SOURCE_TOOL,
                          r.acc_weight * acc - r.format_weight * fmt + r.tool_weight * ((zooms > 0) & (acc > 0.5)),
                          r.math_acc_weight * acc - r.math_format_weight * fmt).astype(np.float32)
        judged = dict(device_score, acc=jax.device_put(acc), reward=jax.device_put(reward))
        params, opt_state, metrics, traj, rows = update(params, opt_state, traj, judged, ref_params)
        metrics = dict(metrics, judge_failed=float(stats.get("failed", 0) + math_stats.get("failed", 0)),
                       judge_retried=float(stats.get("retried", 0) + math_stats.get("retried", 0)))
        return params, opt_state, metrics, traj, rows

    step.score, step.update = score, update
    return step, params, tx.init(params)
