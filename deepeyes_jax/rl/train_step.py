"""The fused GRPO step: rollout, rewards, advantages, loss, gradient and update as ONE program.

    step(params, opt_state, batch, rng) -> (params, opt_state, metrics, trajectories, rows)

Rows of a batch come in groups: each prompt repeated `group_size` times, consecutively. The old
log-probs are the rollout's own (they equal a teacher-forced pass to ~1e-5 in fp32, see
tests/test_rollout.py), so one rollout feeds one update without a second forward. Parameters and
optimizer state are donated. The metrics are reduced inside the program (`rl.metrics`), so a host
reads a few replicated scalars, never the trajectories.
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
from jax.experimental import multihost_utils

from deepeyes_jax import sharding as shd
from deepeyes_jax.rl import grpo, metrics, rewards
from deepeyes_jax.rl.trajectory_forward import trajectory_logprobs
from deepeyes_jax.rollout import config as rc
from deepeyes_jax.rollout import tools
from deepeyes_jax.rollout.inputs import RolloutBatch
from deepeyes_jax.rollout.sampler import Trajectories, rollout_program, rows_of


@dataclasses.dataclass(frozen=True)
class ActorConfig:
    """How the update walks the rollout batch (verl: ppo_mini_batch_size / ppo_micro_batch_size_per_gpu)."""

    logprob_chunk: int = 512  # sequence positions per chunk of the log-prob computation
    mini_batches: int = 1  # optimizer updates per rollout batch (rows split evenly; old log-probs = rollout's)
    micro_batches: int = 1  # gradient accumulation steps inside each update (exact, see micro_batch_weight)
    # Sequence lengths the update may run at: each micro-batch takes the shortest one that holds its longest
    # trajectory (a `lax.switch` inside the program; the slots past it are padding, so the result is the same),
    # and a mini-batch's rows are sorted by length into its micro-batches, so the update's cost follows the tokens
    # produced instead of rollout.max_total_len. () = always the full length, rows in their order.
    length_buckets: tuple[int, ...] = ()

    def __post_init__(self):
        if self.mini_batches < 1 or self.micro_batches < 1 or self.logprob_chunk < 1:
            raise ValueError(f"mini_batches {self.mini_batches}, micro_batches {self.micro_batches} and "
                             f"logprob_chunk {self.logprob_chunk} must be >= 1")
        b = tuple(self.length_buckets)
        if any(not isinstance(n, int) or n < 1 for n in b) or list(b) != sorted(set(b)):
            raise ValueError(f"actor.length_buckets {b} must be increasing positive integers")

    def update_lengths(self, max_total_len: int) -> tuple[int, ...]:
        """The update's lengths for trajectories of `max_total_len` slots: the buckets below it, then it."""
        return tuple(n for n in self.length_buckets if n < max_total_len) + (max_total_len,)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The fused step. The log-probs of the loss use the rollout's temperature (the sampling policy's)."""

    rollout: rc.RolloutConfig
    grpo: grpo.GRPOConfig
    reward: rewards.RewardConfig = rewards.RewardConfig()
    actor: ActorConfig = ActorConfig()


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW after global-norm clipping (DeepEyes: lr 1e-6 constant, wd 0.01, clip 1.0, betas 0.9 / 0.999).
    The learning rate warms up linearly over `warmup_steps` (0: constant from the first step)."""

    learning_rate: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999


class TrainBatch(NamedTuple):
    rollout: RolloutBatch  # B = prompts * group_size rows, groups consecutive
    answer: jax.Array  # uint8[B, G]: ground truth, UTF-8
    answer_len: jax.Array  # int32[B]
    source_kind: jax.Array  # int32[B]: rewards.SOURCE_TOOL / SOURCE_MATH
    box: jax.Array  # float32[B, 4]: ground-truth region in original-image pixels (grounding IoU), if has_box
    has_box: jax.Array  # bool[B]


def make_optimizer(learning_rate, *, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                   b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
    """Gradient clipping then AdamW; `learning_rate` may be an optax schedule."""
    parts = [] if max_grad_norm is None else [optax.clip_by_global_norm(max_grad_norm)]
    return optax.chain(*parts, optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay))


def optimizer(config: OptimConfig) -> optax.GradientTransformation:
    lr = (optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps) if config.warmup_steps > 0
          else config.learning_rate)
    return make_optimizer(lr, weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
                          b1=config.b1, b2=config.b2)


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
    params, opt_state, out, rows = _update(graphdef, cfg, tx, params, opt_state, traj, score, batch.box,
                                           batch.has_box, ref_params)
    return params, opt_state, out, traj, rows


def _update(graphdef, cfg: TrainConfig, tx, params, opt_state, traj, score, box, has_box, ref_params):
    adv = grpo.group_advantages(score["reward"], cfg.grpo.group_size, eps=cfg.grpo.adv_eps,
                                norm_by_std=cfg.grpo.norm_adv_by_std)
    full_length = traj.tokens.shape[1]

    def token_logprobs(params, traj):
        return trajectory_logprobs(nnx.merge(graphdef, params), traj, chunk=cfg.actor.logprob_chunk,
                                   temperature=cfg.rollout.temperature)

    def loss_fn(params, traj, adv):
        logp, entropy = token_logprobs(params, traj)
        ref_logp = None if ref_params is None else jax.lax.stop_gradient(token_logprobs(ref_params, traj)[0])
        return grpo.policy_loss(logp, traj.logprobs[:, 1:], adv, traj.loss_mask[:, 1:], cfg.grpo,
                                ref_logp=ref_logp, entropy=entropy, norm_length=full_length - 1)

    n_mini, n_micro = cfg.actor.mini_batches, cfg.actor.micro_batches
    sizes = cfg.actor.update_lengths(full_length)
    lengths = jnp.asarray(sizes)
    # With buckets, every mini-batch's rows are sorted by length into its micro-batches, so each micro-batch runs
    # at the bucket of ITS longest row (one long trajectory no longer sets the length of the whole update).
    sorted_traj, sorted_adv = by_length(traj, adv, n_mini, n_micro) if len(sizes) > 1 else (traj, adv)

    def update(carry, m):  # mini-batch m: rows m, m + n_mini, ...; its micro-batch u: every n_micro-th of those
        params, opt_state = carry
        full_mask = shd.take_rows(sorted_traj.loss_mask, m, n_mini)[:, 1:]

        def micro(grads, u):
            i, n = m + n_mini * u, n_mini * n_micro  # the same rows of each micro-batch on every device
            part, part_adv = rows_of(sorted_traj, i, n), shd.take_rows(sorted_adv, i, n)
            weight = grpo.micro_batch_weight(part.loss_mask[:, 1:], full_mask, cfg.grpo.loss_agg_mode)
            bucket = jnp.searchsorted(lengths, jnp.max(part.length)) if len(sizes) > 1 else 0
            branches = [functools.partial(lambda size, p: jax.value_and_grad(loss_fn, has_aux=True)(
                p, trimmed(part, size), part_adv), size) for size in sizes]
            (loss, pairs), g = jax.lax.switch(bucket, branches, params)
            grads = jax.tree.map(lambda a, b: a + weight * b, grads, g)
            pairs = {k: v for k, v in pairs.items() if k not in ("loss", "pg_loss")}
            return grads, (weight * loss, pairs, lengths[bucket])

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, (losses, pairs, used) = jax.lax.scan(micro, zeros, jnp.arange(n_micro))
        updates, opt_state = tx.update(grads, opt_state, params)
        return ((optax.apply_updates(params, updates), opt_state),
                (jnp.sum(losses), pairs, optax.global_norm(grads), jnp.mean(used)))

    (params, opt_state), (losses, pairs, grad_norms, used) = jax.lax.scan(update, (params, opt_state),
                                                                          jnp.arange(n_mini))

    rows = metrics.row_metrics(traj, score, box, has_box)
    out = {k: jnp.sum(s) / jnp.maximum(jnp.sum(c), 1) for k, (s, c) in pairs.items()}
    out.update(metrics.summarize(rows), loss=jnp.mean(losses), grad_norm=jnp.mean(grad_norms),
               sampled_tokens=jnp.sum(traj.response_length), update_length=jnp.mean(used))
    return params, opt_state, out, dict(rows, advantage=adv)


def by_length(traj: Trajectories, adv: jax.Array, n_mini: int, n_micro: int):
    """(traj, adv) with each mini-batch's rows (m, m + n_mini, ...) reordered by `length` so that its micro-batch u
    (every n_micro-th of them, `rows_of`) holds the u-th shortest group. A mini-batch keeps its rows, so the update
    (a sum over each mini-batch's rows) is unchanged; the reorder copies the batch once."""
    b = traj.length.shape[0]
    per_mini, group = b // n_mini, b // (n_mini * n_micro)
    p = jnp.arange(b)
    m, j = p % n_mini, p // n_mini  # position p: mini-batch m, its j-th row = micro-batch j % n_micro, slot j // n
    rank = (j % n_micro) * group + j // n_micro  # the rank (by length, within the mini-batch) placed at p
    order = jnp.argsort(traj.length.reshape(per_mini, n_mini).T, axis=1, stable=True)  # [n_mini, per_mini]
    perm = m + n_mini * order[m, rank]
    take = lambda x, axis: jnp.take(x, perm, axis=axis)  # noqa: E731
    return traj._replace(**{f: take(getattr(traj, f), 1 if f == "position_ids" else 0) for f in traj._fields}), \
        take(adv, 0)


def trimmed(traj: Trajectories, length: int) -> Trajectories:
    """The first `length` slots of every per-slot field (the rest of a finished trajectory is padding)."""
    return traj._replace(tokens=traj.tokens[:, :length], attention_mask=traj.attention_mask[:, :length],
                         loss_mask=traj.loss_mask[:, :length], logprobs=traj.logprobs[:, :length],
                         position_ids=traj.position_ids[..., :length])


def _check(config: TrainConfig):
    if not config.rollout.temperature > 0:
        raise ValueError(f"training samples at rollout.temperature > 0 (the loss's log-probs use it), got "
                         f"{config.rollout.temperature}")


def _check_rows(config: TrainConfig, rows: int):
    u = config.actor
    if rows % config.grpo.group_size or rows % (u.mini_batches * u.micro_batches):
        raise ValueError(f"batch of {rows} rows must divide into groups of {config.grpo.group_size} and into "
                         f"{u.mini_batches} mini x {u.micro_batches} micro batches")


def programs(graphdef, config: TrainConfig, templates: rc.Templates, tx: optax.GradientTransformation) -> dict:
    """The jitted programs a training step runs, by name (parameters and optimizer state donated):

      train_step(params, opt_state, batch, rng, table, ref_params) -> (params, opt_state, metrics, traj, rows)
      rollout_and_score(params, batch, rng, table) -> (traj, score)               the judged step's first half
      update(params, opt_state, traj, score, box, has_box, ref_params) -> (params, opt_state, metrics, rows)
                                          its second half (the trajectories are its input: not returned again)
    """
    return dict(
        train_step=jax.jit(functools.partial(_step, graphdef, config, templates, tx), donate_argnums=(0, 1)),
        rollout_and_score=jax.jit(functools.partial(rollout_and_score, graphdef, config, templates)),
        update=jax.jit(functools.partial(_update, graphdef, config, tx), donate_argnums=(0, 1)))


def make_train_step(model, tx: optax.GradientTransformation, config: TrainConfig, templates: rc.Templates,
                    table: tools.TokenBytes):
    """-> (step, params, opt_state). step(params, opt_state, batch, rng) -> (params, opt_state, metrics,
    trajectories, per-row dict of reward / acc / advantage).

    params and opt_state are donated: `params` starts as the model's own arrays, so after the first
    step the model object no longer holds valid parameters (use `nnx.merge(graphdef, params)`).
    """
    _check(config)
    graphdef, params = nnx.split(model)
    jitted = programs(graphdef, config, templates, tx)["train_step"]
    # The frozen reference policy exists only when the KL term is on.
    ref_params = jax.tree.map(jnp.copy, params) if config.grpo.kl_coef > 0 else None

    def step(params, opt_state, batch: TrainBatch, rng):
        _check_rows(config, batch.answer.shape[0])
        return jitted(params, opt_state, batch, rng, table, ref_params)

    step.jitted = jitted
    step.ref_params = ref_params
    return step, params, shd.init_on_mesh(tx.init, params)


def make_judged_train_step(model, tx: optax.GradientTransformation, config: TrainConfig, templates: rc.Templates,
                           table: tools.TokenBytes, *, tokenizer, judge, mesh=None, rules=None):
    """The LLM-judge variant: rollout program -> host judge -> update program (two compilations).

    step(params, opt_state, batch, rng, questions, ground_truths) -> like `make_train_step`, plus judge
    stats in the metrics. The judge (`rl.judge.JudgeClient`) decides accuracy from each response's
    `<answer>` text as DeepEyes does (math rows: its math prompt on the whole response); format errors
    and the zoom count still come from the on-device reward. A failed judgement scores 0 and is counted.

    With a `mesh` (and its axis `rules`) the batch is row-sharded over hosts: each host decodes and judges
    only its own rows (`sharding.process_rows`; `questions` / `ground_truths` are those rows') and the
    verdicts are assembled into global arrays again. Without one, everything is on this host.
    """
    _check(config)
    graphdef, params = nnx.split(model)
    jitted = programs(graphdef, config, templates, tx)
    score, update = jitted["rollout_and_score"], jitted["update"]
    ref_params = jax.tree.map(jnp.copy, params) if config.grpo.kl_coef > 0 else None
    r = config.reward
    if mesh is None:
        local = lambda x: np.asarray(jax.device_get(x))  # noqa: E731
        to_global = jax.device_put
    else:
        local = lambda x: shd.host_rows(x, mesh, rules)  # noqa: E731
        to_global = lambda x: shd.global_batch(x, mesh, rules, len(x) * jax.process_count())  # noqa: E731

    def step(params, opt_state, batch: TrainBatch, rng, questions, ground_truths):
        _check_rows(config, batch.answer.shape[0])
        traj, device_score = score(params, batch, rng, table)
        ids, valid, kind, zooms, fmt = (local(x) for x in (traj.tokens, traj.attention_mask, batch.source_kind,
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
        with jax.transfer_guard("allow"):
            judged = dict(device_score, acc=to_global(acc), reward=to_global(reward))
        params, opt_state, metrics, rows = update(params, opt_state, traj, judged, batch.box, batch.has_box,
                                                  ref_params)
        counts = np.array([stats.get(k, 0) + math_stats.get(k, 0) for k in ("failed", "retried")], np.float32)
        if jax.process_count() > 1:
            counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
        metrics = dict(metrics, judge_failed=float(counts[0]), judge_retried=float(counts[1]))
        return params, opt_state, metrics, traj, rows

    step.score, step.update = score, update
    return step, params, shd.init_on_mesh(tx.init, params)
