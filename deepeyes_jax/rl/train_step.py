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
import optax
from flax import nnx

from deepeyes_jax.rl import grpo, rewards
from deepeyes_jax.rl.trajectory_forward import trajectory_hidden
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


def _step(graphdef, cfg: TrainConfig, templates, tx, params, opt_state, batch: TrainBatch, rng, table,
          ref_params):
    traj = rollout_program(graphdef, cfg.rollout, templates, params, batch.rollout, rng, table)
    p = batch.rollout.prompt_ids.shape[1]
    score = jax.vmap(functools.partial(rewards.reward_from_tokens, table=table, config=cfg.reward))(
        traj.tokens[:, p:], traj.attention_mask[:, p:], batch.answer, batch.answer_len, batch.source_kind,
        traj.num_zooms)
    adv = grpo.group_advantages(score["reward"], cfg.grpo.group_size, eps=cfg.grpo.adv_eps,
                                norm_by_std=cfg.grpo.norm_adv_by_std)

    def token_logprobs(params, traj):
        model = nnx.merge(graphdef, params)
        return grpo.token_logprobs_and_entropy(
            trajectory_hidden(model, traj)[:, :-1], grpo.lm_head_matrix(model), traj.tokens[:, 1:],
            chunk=cfg.logprob_chunk, temperature=cfg.grpo.temperature)

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
    rows = dict(reward=score["reward"], acc=score["acc"], advantage=adv)
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
