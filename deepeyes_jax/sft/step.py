"""Supervised fine-tuning on packed conversations, and teacher-forced scoring of replies.

    step(params, opt_state, traj) -> (params, opt_state, metrics)    one jitted program, donated state
    score(params, traj) -> float32[B]                                 summed log-prob of the trained tokens

Both read the same `Trajectories` layout the GRPO update reads (`sft.conversation.pack`), through the
same teacher-forced pass (`rl.trajectory_forward.trajectory_logprobs`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deepeyes_jax.rl.trajectory_forward import trajectory_logprobs
from deepeyes_jax.sharding import init_on_mesh
from deepeyes_jax.sft.conversation import with_positions


def _logprobs(graphdef, params, traj, chunk):
    model = nnx.merge(graphdef, params)
    logp, _ = trajectory_logprobs(model, with_positions(model, traj), chunk=chunk)
    return logp, traj.loss_mask[:, 1:]


def _step(graphdef, tx, chunk, params, opt_state, traj):
    def loss_fn(params):
        logp, mask = _logprobs(graphdef, params, traj, chunk)
        n = jnp.maximum(jnp.sum(mask), 1)
        return -jnp.sum(jnp.where(mask, logp, 0.0)) / n, (logp, mask, n)

    (loss, (logp, mask, n)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    # A token counts as "right" when the model puts more than half its mass on it (greedy would pick it).
    metrics = dict(loss=loss, token_accuracy=jnp.sum(mask & (logp > jnp.log(0.5))) / n,
                   grad_norm=optax.global_norm(grads))
    return optax.apply_updates(params, updates), opt_state, metrics


def make_sft_step(model, tx: optax.GradientTransformation, *, chunk: int = 256):
    """-> (step, params, opt_state); params and opt_state are donated to `step`."""
    graphdef, params = nnx.split(model)
    step = jax.jit(functools.partial(_step, graphdef, tx, chunk), donate_argnums=(0, 1))
    return step, params, init_on_mesh(tx.init, params)


def make_scorer(model, *, chunk: int = 256):
    """-> score(params, traj) -> float32[B]: log-probability of each row's trained tokens."""
    graphdef = nnx.graphdef(model)

    def score(params, traj):
        logp, mask = _logprobs(graphdef, params, traj, chunk)
        return jnp.sum(jnp.where(mask, logp, 0.0), axis=1)

    return jax.jit(score)
