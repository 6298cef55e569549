"""GRPO math as DeepEyes configured it (verl `core_algos`): advantages, log-probs, clipped loss, metrics.

Pure, jittable functions. Shapes: B trajectories (consecutive groups of `group_size` share a prompt),
T response tokens, D hidden width, V vocabulary. Metrics are `(sum, count)` pairs so that summing
pairs over micro-batches and dividing once (`reduce_metrics`) is exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3", "low_var_kl")

Pair = tuple[jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """DeepEyes' GRPO settings (spec §4.1); hashable, so it can be a static jit argument.

    clip_ratio_c: dual-clip bound for negative advantages (verl `clip_ratio_c`, must be > 1); None disables.
    kl_coef / kl_type: verl `kl_loss_coef` / `kl_loss_type` ("k1" = logp - ref, "k2" = 0.5 (logp - ref)^2,
      "k3" = "low_var_kl" = exp(ref - logp) - (ref - logp) - 1 clamped to [-10, 10]); kl_coef 0 = off.
    entropy_coef: verl `entropy_coeff` (loss -= coef * aggregated entropy).
    adv_eps / norm_adv_by_std: verl `epsilon` / `norm_adv_by_std_in_grpo` of the GRPO advantage.
    log_ratio_clip: logp - old_logp is clamped to +-this before exp (verl and Tunix: 20).
    """

    group_size: int = 16
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float | None = 3.0
    loss_agg_mode: str = "token-mean"
    kl_coef: float = 0.0
    kl_type: str = "low_var_kl"
    entropy_coef: float = 0.0
    adv_eps: float = 1e-6
    norm_adv_by_std: bool = True
    log_ratio_clip: float = 20.0

    def __post_init__(self):
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode {self.loss_agg_mode!r} not in {LOSS_AGG_MODES}")
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"kl_type {self.kl_type!r} not in {KL_TYPES}")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 (or None), got {self.clip_ratio_c}")
        if not (0.0 <= self.clip_ratio_low < 1.0 and self.clip_ratio_high >= 0.0):
            raise ValueError("need 0 <= clip_ratio_low < 1 and clip_ratio_high >= 0")


# ------------------------------------------------------------------------------------------ advantages


def group_advantages(rewards: jax.Array, group_size: int, *, eps: float = 1e-6,
                     norm_by_std: bool = True) -> jax.Array:
    """float32[B] outcome rewards -> float32[B] GRPO advantages, per consecutive group of `group_size`.

    verl `compute_grpo_outcome_advantage`: A = (r - mean) / (std + eps) with `torch.std`, i.e. the
    **unbiased** (N - 1) std; a group of size 1 uses mean 0, std 1; `norm_by_std=False` gives r - mean.
    The caller broadcasts A over the response tokens and masks it. The mean is taken around the group's
    first reward, so a group of identical rewards gives exactly 0.
    """
    r = jnp.asarray(rewards, jnp.float32)
    (b,) = r.shape
    if b % group_size:
        raise ValueError(f"batch {b} is not a multiple of group_size {group_size}")
    g = r.reshape(b // group_size, group_size)
    if group_size == 1:
        adv = g / (1.0 + eps) if norm_by_std else g
        return adv.reshape(b)
    shift = g[:, :1]
    dev0 = g - shift                                           # exact zeros for identical rewards
    mean0 = jnp.mean(dev0, axis=1, keepdims=True)
    centred = dev0 - mean0
    if norm_by_std:
        std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / (group_size - 1))
        centred = centred / (std + eps)
    return centred.reshape(b)


# ------------------------------------------------------------------------------------------ log-probs


def _chunk_logp_entropy(head: jax.Array, hidden: jax.Array, targets: jax.Array, temperature: float):
    """float[B, C, D], int32[B, C] -> (logp float32[B, C], entropy float32[B, C]); logits exist for C only."""
    logits = jnp.einsum("bcd,dv->bcv", hidden, head, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) / temperature
    logz = jax.nn.logsumexp(logits, axis=-1, keepdims=True)                          # [B, C, 1]
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)
    probs = jnp.exp(logits - logz)
    entropy = logz[..., 0] - jnp.sum(probs * logits, axis=-1)                         # H = logZ - E_p[z]
    return (picked - logz)[..., 0], entropy


def token_logprobs_and_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, *, chunk: int,
                               temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """log softmax((hidden @ head) / temperature) at `targets`, and the entropy of that softmax.

    hidden float[B, T, D] (the hidden state that predicts token t), head float[D, V] (for tied
    embeddings pass `embed.T`; see `lm_head_matrix`), targets int32[B, T]
    -> (logp float32[B, T], entropy float32[B, T]).

    The sequence is processed in chunks of `chunk` positions with `lax.map`; each chunk is
    `jax.checkpoint`ed, so neither the forward nor the backward pass holds more than one
    [B, chunk, V] block of logits. T need not be a multiple of `chunk` (zero padding is sliced off).
    Differentiable w.r.t. hidden and head; exact vs the unchunked computation.
    """
    b, t, d = hidden.shape
    if targets.shape != (b, t) or head.shape[0] != d:
        raise ValueError(f"shape mismatch: hidden {hidden.shape}, head {head.shape}, targets {targets.shape}")
    chunk = max(1, min(int(chunk), t))
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hs = jnp.swapaxes(hidden.reshape(b, n, chunk, d), 0, 1)      # [n, B, C, D]
    ts = jnp.swapaxes(targets.reshape(b, n, chunk), 0, 1)        # [n, B, C]
    step = jax.checkpoint(_chunk_logp_entropy, static_argnums=(3,))
    logp, ent = jax.lax.map(lambda xs: step(head, xs[0], xs[1], float(temperature)), (hs, ts))
    logp = jnp.swapaxes(logp, 0, 1).reshape(b, n * chunk)[:, :t]
    ent = jnp.swapaxes(ent, 0, 1).reshape(b, n * chunk)[:, :t]
    return logp, ent


def lm_head_matrix(model) -> jax.Array:
    """float[D, V] output projection of a `Qwen2_5_VL`: `lm_head.kernel`, or the tied embedding transposed."""
    if getattr(model, "lm_head", None) is not None:
        return model.lm_head.kernel[...]
    return model.model.embed_tokens.weight[...].T


# ------------------------------------------------------------------------------------------ loss


def _masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask)


def agg_loss(loss_mat: jax.Array, mask: jax.Array, mode: str, norm_length: int | None = None) -> jax.Array:
    """float32[B, T] per-token values, {0,1}[B, T] mask -> scalar, verl `agg_loss` semantics.
    norm_length: T of the -norm mode when the values are a prefix of longer rows (default T).

    token-mean:               sum(L m) / sum(m)
    seq-mean-token-sum:       mean_b sum_t(L m)
    seq-mean-token-mean:      mean_b [sum_t(L m) / sum_t(m)]
    seq-mean-token-sum-norm:  sum(L m) / T          (Dr. GRPO; T = static response length)
    Deviation for padding only: rows whose mask is all zero are left out of the seq-means (verl has no
    such rows; it would count them as 0 / NaN), and an all-zero mask gives 0 instead of NaN.
    """
    mask = mask.astype(jnp.float32)
    if mode == "token-mean":
        return _masked_sum(loss_mat, mask) / jnp.maximum(jnp.sum(mask), 1.0)
    row_sum = jnp.sum(loss_mat * mask, axis=-1)                 # [B]
    row_len = jnp.sum(mask, axis=-1)                            # [B]
    if mode == "seq-mean-token-sum-norm":
        return jnp.sum(row_sum) / (norm_length or loss_mat.shape[-1])
    rows = jnp.maximum(jnp.sum((row_len > 0).astype(jnp.float32)), 1.0)
    if mode == "seq-mean-token-sum":
        return jnp.sum(row_sum) / rows
    if mode == "seq-mean-token-mean":
        return jnp.sum(row_sum / jnp.maximum(row_len, 1.0)) / rows
    raise ValueError(f"unknown loss_agg_mode {mode!r}")


def micro_batch_weight(mask: jax.Array, full_mask: jax.Array, mode: str) -> jax.Array:
    """Weight of one micro-batch's `agg_loss` so that the weighted sum over micro-batches equals
    `agg_loss` of the whole batch (exact gradient accumulation): its share of the tokens
    (token-mean), of the non-empty rows (seq-mean-*), or 1 (seq-mean-token-sum-norm)."""
    mask, full_mask = mask.astype(jnp.float32), full_mask.astype(jnp.float32)
    if mode == "token-mean":
        return jnp.sum(mask) / jnp.maximum(jnp.sum(full_mask), 1.0)
    if mode == "seq-mean-token-sum-norm":
        return jnp.ones((), jnp.float32)
    rows = lambda m: jnp.sum((jnp.sum(m, axis=-1) > 0).astype(jnp.float32))  # noqa: E731
    return rows(mask) / jnp.maximum(rows(full_mask), 1.0)


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kl_type: str) -> jax.Array:
    """Per-token KL estimate of pi_theta vs pi_ref (verl `kl_penalty`), float32[B, T]."""
    if kl_type == "k1":
        return logp - ref_logp
    if kl_type == "k2":
        return 0.5 * jnp.square(logp - ref_logp)
    if kl_type in ("k3", "low_var_kl"):
        kl = jnp.clip(ref_logp - logp, -20.0, 20.0)
        return jnp.clip(jnp.exp(kl) - kl - 1.0, -10.0, 10.0)
    raise ValueError(f"unknown kl_type {kl_type!r}")


def clipped_surrogate(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array,
                      config: GRPOConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token PPO loss float32[B, T] with low/high clip and dual clip, plus per-token indicators.

    r = exp(clip(logp - old_logp, +-20));  L = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high));
    for A < 0 (dual clip, c = clip_ratio_c): L = min(L, -A c).
    """
    neg_kl = jnp.clip(logp - old_logp, -config.log_ratio_clip, config.log_ratio_clip)
    ratio = jnp.exp(neg_kl)
    a = advantages
    pg1 = -a * ratio
    pg2 = -a * jnp.clip(ratio, 1.0 - config.clip_ratio_low, 1.0 + config.clip_ratio_high)
    clip1 = jnp.maximum(pg1, pg2)
    neg = a < 0
    f32 = jnp.float32
    if config.clip_ratio_c is not None:
        pg3 = -a * config.clip_ratio_c
        losses = jnp.where(neg, jnp.minimum(pg3, clip1), clip1)
        dual = (clip1 > pg3) & neg
    else:
        losses = clip1
        dual = jnp.zeros_like(neg)
    info = {
        "ratio": ratio,
        "neg_kl": neg_kl,
        "clipped": (pg2 > pg1).astype(f32),                                   # verl pg_clipfrac
        "clipped_high": ((ratio > 1.0 + config.clip_ratio_high) & (a > 0)).astype(f32),
        "clipped_low": ((ratio < 1.0 - config.clip_ratio_low) & neg).astype(f32),
        "dual_clipped": dual.astype(f32),                                     # verl pg_clipfrac_lower
    }
    return losses, info


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                config: GRPOConfig, ref_logp: jax.Array | None = None,
                entropy: jax.Array | None = None, norm_length: int | None = None) -> tuple[jax.Array, dict[str, Pair]]:
    """GRPO actor loss of one micro-batch (verl `dp_actor.update_policy`), and its metrics.

    logp, old_logp, ref_logp, entropy: float32[B, T]; advantages float32[B, T] (or [B], broadcast here);
    mask {0,1}[B, T] (1 on policy-sampled response tokens).
    loss = agg(L_pg) + kl_coef * agg(KL(logp, ref_logp))   [if kl_coef > 0 and ref_logp given]
                     - entropy_coef * agg(entropy)          [if entropy_coef > 0 and entropy given]
    with agg = `agg_loss(., mask, config.loss_agg_mode, norm_length)` (norm_length: the rows' full length when
    these are the first T slots of them, so a trimmed update is the full one).
    Returns (scalar loss, {name: (sum, count)}):
    token-level metrics have count = number of masked tokens; loss metrics have count 1 (summed over
    micro-batches they average the per-micro-batch values, as verl logs them).
    """
    logp = logp.astype(jnp.float32)
    old_logp = jax.lax.stop_gradient(old_logp.astype(jnp.float32))
    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    if advantages.ndim == 1:
        advantages = jnp.broadcast_to(advantages[:, None], logp.shape)
    maskf = mask.astype(jnp.float32)
    mode = config.loss_agg_mode

    losses, info = clipped_surrogate(logp, old_logp, advantages, config)
    pg_loss = agg_loss(losses, maskf, mode, norm_length)
    loss = pg_loss
    n_tok = jnp.sum(maskf)
    one = jnp.ones((), jnp.float32)

    def tok(x):
        return (_masked_sum(x, maskf), n_tok)

    metrics: dict[str, Pair] = {
        "pg_loss": (pg_loss, one),
        "pg_clipfrac": tok(info["clipped"]),
        "pg_clipfrac_high": tok(info["clipped_high"]),
        "pg_clipfrac_low": tok(info["clipped_low"]),
        "pg_clipfrac_dual": tok(info["dual_clipped"]),
        "ppo_kl": tok(-info["neg_kl"]),
        "ratio_mean": tok(info["ratio"]),
        "advantage_mean": tok(advantages),
    }
    if ref_logp is not None:
        kld = kl_penalty(logp, jax.lax.stop_gradient(ref_logp.astype(jnp.float32)), config.kl_type)
        metrics["kl"] = tok(kld)
        if config.kl_coef > 0:
            kl_loss = agg_loss(kld, maskf, mode, norm_length)
            loss = loss + config.kl_coef * kl_loss
            metrics["kl_loss"] = (kl_loss, one)
    if entropy is not None:
        entropy = entropy.astype(jnp.float32)
        metrics["entropy"] = tok(jax.lax.stop_gradient(entropy))
        if config.entropy_coef > 0:
            ent_loss = agg_loss(entropy, maskf, mode, norm_length)
            loss = loss - config.entropy_coef * ent_loss
    metrics["loss"] = (loss, one)
    metrics = {k: (jax.lax.stop_gradient(s), jax.lax.stop_gradient(c)) for k, (s, c) in metrics.items()}
    return loss, metrics


# ------------------------------------------------------------------------------------------ metrics


def accumulate_metrics(a: Mapping[str, Pair] | None, b: Mapping[str, Pair]) -> dict[str, Pair]:
    """Elementwise sum of two (sum, count) metric dicts (micro-batch accumulation); `a` may be None."""
    if a is None:
        return dict(b)
    return {k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in b}


def reduce_metrics(pairs: Mapping[str, Pair]) -> dict[str, float]:
    """{name: (sum, count)} -> {name: sum / count} as Python floats (0.0 when count is 0)."""
    out = {}
    for k, (s, c) in pairs.items():
        s, c = float(np.asarray(s)), float(np.asarray(c))
        out[k] = s / c if c else 0.0
    return out
