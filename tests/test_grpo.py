"""GRPO math vs an independent numpy re-computation of verl's formulas (core_algos / dp_actor)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepeyes_jax.rl import grpo
from deepeyes_jax.rl.grpo import GRPOConfig

MODES = grpo.LOSS_AGG_MODES


# ------------------------------------------------------------------------------- numpy reference (verl)


def np_agg(mat, mask, mode):
    if mode == "token-mean":
        return (mat * mask).sum() / mask.sum()
    seq = (mat * mask).sum(-1)
    if mode == "seq-mean-token-sum":
        return seq.mean()
    if mode == "seq-mean-token-mean":
        return (seq / mask.sum(-1)).mean()
    if mode == "seq-mean-token-sum-norm":
        return seq.sum() / mask.shape[-1]
    raise ValueError(mode)


def np_kl(logp, ref, kind):
    if kind == "k1":
        return logp - ref
    kl = np.clip(ref - logp, -20, 20)
    return np.clip(np.exp(kl) - kl - 1, -10, 10)


def np_loss(logp, old, adv, mask, cfg, ref=None, ent=None):
    logp, old, adv, mask = (np.asarray(x, np.float64) for x in (logp, old, adv, mask))
    neg_kl = np.clip(logp - old, -20, 20)
    ratio = np.exp(neg_kl)
    pg1 = -adv * ratio
    pg2 = -adv * np.clip(ratio, 1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high)
    c1 = np.maximum(pg1, pg2)
    if cfg.clip_ratio_c is not None:
        pg3 = -adv * cfg.clip_ratio_c
        losses = np.where(adv < 0, np.minimum(pg3, c1), c1)
        dual = ((c1 > pg3) & (adv < 0)).astype(float)
    else:
        losses, dual = c1, np.zeros_like(c1)
    loss = np_agg(losses, mask, cfg.loss_agg_mode)
    if ref is not None and cfg.kl_coef > 0:
        loss = loss + cfg.kl_coef * np_agg(np_kl(logp, np.asarray(ref, np.float64), cfg.kl_type), mask,
                                           cfg.loss_agg_mode)
    if ent is not None and cfg.entropy_coef > 0:
        loss = loss - cfg.entropy_coef * np_agg(np.asarray(ent, np.float64), mask, cfg.loss_agg_mode)
    mm = lambda x: (x * mask).sum() / mask.sum()
    metrics = {"pg_clipfrac": mm((pg2 > pg1).astype(float)), "pg_clipfrac_dual": mm(dual),
                   "ppo_kl": mm(-neg_kl), "ratio_mean": mm(ratio)}
    return loss, metrics


def make_batch(seed=0, b=6, t=9):
    rng = np.random.default_rng(seed)
    logp = -rng.gamma(2.0, 1.0, (b, t)).astype(np.float32)
    old = (logp + rng.normal(0, 0.4, (b, t))).astype(np.float32)       # ratios spread over the clip region
    adv = np.repeat(rng.normal(0, 1, (b, 1)), t, axis=1).astype(np.float32)
    adv[1] = -np.abs(adv[1]) - 0.5
    old[1, 0] = logp[1, 0] - 1.5                                         # ratio ~4.5 > c with A < 0: dual clip
    lens = rng.integers(1, t + 1, b)
    lens[2] = t
    mask = (np.arange(t)[None, :] < lens[:, None]).astype(np.float32)
    ref = (logp + rng.normal(0, 0.3, (b, t))).astype(np.float32)
    ent = rng.uniform(0, 3, (b, t)).astype(np.float32)
    return logp, old, adv, mask, ref, ent


# ------------------------------------------------------------------------------- policy loss


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dual", [3.0, None])
@pytest.mark.parametrize("kl", [None, "k1", "k3"])
@pytest.mark.parametrize("ent_coef", [0.0, 0.01])
def test_loss_matches_numpy(mode, dual, kl, ent_coef):
    logp, old, adv, mask, ref, ent = make_batch()
    cfg = GRPOConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=dual, loss_agg_mode=mode,
                     kl_coef=0.05 if kl else 0.0, kl_type=kl or "k3", entropy_coef=ent_coef)
    loss, metrics = grpo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                                     cfg, ref_logp=jnp.asarray(ref) if kl else None, entropy=jnp.asarray(ent))
    want, want_m = np_loss(logp, old, adv, mask, cfg, ref if kl else None, ent)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
    got_m = grpo.reduce_metrics(metrics)
    for k, v in want_m.items():
        np.testing.assert_allclose(got_m[k], v, rtol=2e-5, atol=1e-6, err_msg=k)
    assert got_m["pg_clipfrac"] > 0
    np.testing.assert_allclose(got_m["pg_clipfrac"], got_m["pg_clipfrac_low"] + got_m["pg_clipfrac_high"],
                               atol=1e-6)
    if dual is not None:
        assert got_m["pg_clipfrac_dual"] > 0
    np.testing.assert_allclose(got_m["entropy"], (ent * mask).sum() / mask.sum(), rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_zero_advantage_gives_zero_policy_gradient(mode):
    logp, old, _, mask, ref, ent = make_batch(1)
    cfg = GRPOConfig(loss_agg_mode=mode)
    adv = jnp.zeros_like(jnp.asarray(logp))
    g = jax.grad(lambda lp: grpo.policy_loss(lp, jnp.asarray(old), adv, jnp.asarray(mask), cfg,
                                             ref_logp=jnp.asarray(ref), entropy=jnp.asarray(ent))[0])(
        jnp.asarray(logp))
    assert np.all(np.asarray(g) == 0.0)


def test_on_policy_gradient_is_minus_advantage_over_tokens():
    """ratio == 1 (DeepEyes' single mini-batch): d loss / d logp = -A m / sum(m) for token-mean."""
    logp, _, adv, mask, _, _ = make_batch(2)
    g = jax.grad(lambda lp: grpo.policy_loss(lp, jnp.asarray(logp), jnp.asarray(adv), jnp.asarray(mask),
                                             GRPOConfig())[0])(jnp.asarray(logp))
    np.testing.assert_allclose(np.asarray(g), -adv * mask / mask.sum(), rtol=1e-6, atol=1e-8)


def test_ratio_clipping_at_the_boundaries():
    cfg = GRPOConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    ratio = np.array([1.30, 1.20, 0.70, 0.90, 5.00, 2.00, 0.70, 1.5], np.float32)
    adv = np.array([1.0, 1.0, -2.0, -2.0, -1.0, -1.0, 1.0, -1.0], np.float32)
    # expected per-token loss and d loss / d ratio
    want = np.array([-1.28, -1.20, 1.6, 1.8, 3.0, 2.0, -0.7, 1.5], np.float32)
    want_dr = np.array([0.0, -1.0, 0.0, 2.0, 0.0, 1.0, -1.0, 1.0], np.float32)
    old = np.zeros((1, 8), np.float32)

    def per_token(r):
        return grpo.clipped_surrogate(jnp.log(r), jnp.asarray(old), jnp.asarray(adv)[None], cfg)[0][0]

    r = jnp.asarray(ratio)[None]
    np.testing.assert_allclose(np.asarray(per_token(r)), want, rtol=1e-5)
    dr = jax.grad(lambda r: jnp.sum(per_token(r)))(r)[0]
    np.testing.assert_allclose(np.asarray(dr), want_dr, atol=1e-6)
    _, info = grpo.clipped_surrogate(jnp.log(r), jnp.asarray(old), jnp.asarray(adv)[None], cfg)
    np.testing.assert_array_equal(np.asarray(info["clipped_high"][0]), [1, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(info["clipped_low"][0]), [0, 0, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(info["dual_clipped"][0]), [0, 0, 0, 0, 1, 0, 0, 0])
    # without dual clip the large ratio with A < 0 is unbounded
    nodual = dataclasses.replace(cfg, clip_ratio_c=None)
    l5 = grpo.clipped_surrogate(jnp.log(r), jnp.asarray(old), jnp.asarray(adv)[None], nodual)[0][0, 4]
    np.testing.assert_allclose(float(l5), 5.0, rtol=1e-5)
    # log-ratio is clamped to +-20 before exp
    big = grpo.clipped_surrogate(jnp.full((1, 1), 100.0), jnp.zeros((1, 1)), -jnp.ones((1, 1)), nodual)[1]
    np.testing.assert_allclose(float(big["ratio"][0, 0]), np.exp(np.float32(20.0)), rtol=1e-6)


def test_empty_rows_are_ignored_by_every_mode():
    logp, old, adv, mask, _, _ = make_batch(3)
    pad = lambda x, v=0.0: np.concatenate([x, np.full((2, x.shape[1]), v, x.dtype)])
    for mode in MODES:
        cfg = GRPOConfig(loss_agg_mode=mode)
        a = grpo.policy_loss(*map(jnp.asarray, (logp, old, adv, mask)), cfg)[0]
        b = grpo.policy_loss(*map(jnp.asarray, (pad(logp, -1.0), pad(old, -3.0), pad(adv, 5.0), pad(mask))), cfg)[0]
        np.testing.assert_allclose(float(a), float(b), rtol=1e-6, err_msg=mode)
    z = grpo.policy_loss(*map(jnp.asarray, (logp, old, adv, 0 * mask)), GRPOConfig())[0]
    assert float(z) == 0.0


def test_a_trimmed_prefix_with_its_full_length_gives_the_full_loss_in_every_mode():
    """The length-bucketed update scores only the first T slots; with norm_length = the full length, every mode
    (Dr. GRPO's static-length norm included) gives the loss of the untrimmed rows."""
    logp, old, adv, mask, _, _ = make_batch(3)
    mask = np.array(mask)
    t = mask.shape[1]
    mask[:, t - 3:] = 0  # the last 3 slots are padding in every row
    for mode in MODES:
        cfg = GRPOConfig(loss_agg_mode=mode)
        full = grpo.policy_loss(*map(jnp.asarray, (logp, old, adv, mask)), cfg)[0]
        cut = lambda x: jnp.asarray(x[:, :t - 3])  # noqa: E731
        trimmed = grpo.policy_loss(cut(logp), cut(old), cut(adv) if np.ndim(adv) == 2 else jnp.asarray(adv),
                                   cut(mask), cfg, norm_length=t)[0]
        np.testing.assert_allclose(float(trimmed), float(full), rtol=1e-6, err_msg=mode)
        if mode == "seq-mean-token-sum-norm":  # without it the norm would be the prefix's length
            plain = grpo.policy_loss(cut(logp), cut(old), cut(adv) if np.ndim(adv) == 2 else jnp.asarray(adv),
                                     cut(mask), cfg)[0]
            assert abs(float(plain) - float(full)) > 1e-4 * abs(float(full))


def test_config_validation():
    assert GRPOConfig().clip_ratio_high == 0.2 and GRPOConfig().loss_agg_mode == "token-mean"
    with pytest.raises(ValueError):
        GRPOConfig(loss_agg_mode="sum")
    with pytest.raises(ValueError):
        GRPOConfig(clip_ratio_c=1.0)
    with pytest.raises(ValueError):
        GRPOConfig(kl_type="k7")
    hash(GRPOConfig())


def test_micro_batched_metrics_are_exact():
    logp, old, adv, mask, ref, ent = make_batch(4, b=8)
    cfg = GRPOConfig(kl_coef=0.1, kl_type="k3")
    args = lambda s: [jnp.asarray(x[s]) for x in (logp, old, adv, mask)]
    full = grpo.reduce_metrics(grpo.policy_loss(*args(slice(None)), cfg, jnp.asarray(ref), jnp.asarray(ent))[1])
    acc = None
    for s in (slice(0, 3), slice(3, 8)):
        m = grpo.policy_loss(*args(s), cfg, jnp.asarray(ref[s]), jnp.asarray(ent[s]))[1]
        acc = grpo.accumulate_metrics(acc, m)
    split = grpo.reduce_metrics(acc)
    for k in ("pg_clipfrac", "pg_clipfrac_dual", "ppo_kl", "ratio_mean", "entropy", "kl"):
        np.testing.assert_allclose(split[k], full[k], rtol=1e-5, err_msg=k)


def test_jitted_loss_traces_once():
    cfg = GRPOConfig(loss_agg_mode="seq-mean-token-mean", kl_coef=0.01, entropy_coef=0.01)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(logp, old, adv, mask, ref, ent):
        return jax.value_and_grad(lambda lp: grpo.policy_loss(lp, old, adv, mask, cfg, ref, ent)[0])(logp)

    for seed in range(3):
        batch = [jnp.asarray(x) for x in make_batch(seed)]
        loss, g = step(*batch)
        assert np.isfinite(float(loss)) and g.shape == batch[0].shape
    chex.clear_trace_counter()


# ------------------------------------------------------------------------------- advantages


def np_group_adv(r, n, eps=1e-6):
    g = np.asarray(r, np.float64).reshape(-1, n)
    return ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + eps)).reshape(-1)


def test_group_advantages_match_numpy():
    rng = np.random.default_rng(0)
    r = rng.uniform(0, 1, 4 * 8).astype(np.float32)
    r[8:16] = 0.7                                               # identical rewards -> exactly 0
    r[16:24] = (rng.uniform(size=8) > 0.5).astype(np.float32)
    a = np.asarray(grpo.group_advantages(jnp.asarray(r), 8))
    np.testing.assert_allclose(a, np_group_adv(r, 8), rtol=1e-4, atol=1e-5)
    assert np.all(a[8:16] == 0.0)
    np.testing.assert_allclose(a.reshape(4, 8).mean(1), 0.0, atol=1e-6)
    a_nostd = np.asarray(grpo.group_advantages(jnp.asarray(r), 8, norm_by_std=False))
    np.testing.assert_allclose(a_nostd, (r.reshape(4, 8) - r.reshape(4, 8).mean(1, keepdims=True)).reshape(-1),
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(grpo.group_advantages(jnp.asarray(r[:3]), 1)), r[:3] / (1 + 1e-6))
    with pytest.raises(ValueError):
        grpo.group_advantages(jnp.asarray(r[:7]), 4)
    jitted = jax.jit(grpo.group_advantages, static_argnums=1)
    np.testing.assert_allclose(np.asarray(jitted(jnp.asarray(r), 8)), a, rtol=1e-6)


# ------------------------------------------------------------------------------- chunked log-probs


def dense_logp_entropy(hidden, head, targets, temperature):
    logits = (hidden @ head) / temperature
    logz = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    logp_all = logits - logz
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, ent


B, T, D, V = 2, 12, 8, 37


def _lp_inputs():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k1, (B, T, D), jnp.float32)
    head = 0.5 * jax.random.normal(k2, (D, V), jnp.float32)
    targets = jax.random.randint(k3, (B, T), 0, V, jnp.int32)
    return hidden, head, targets


@pytest.mark.parametrize("chunk", [1, 4, 5, 12, 64])
def test_chunked_logprobs_match_dense(chunk):
    hidden, head, targets = _lp_inputs()
    temp = 0.7
    w1, w2 = jnp.linspace(-1, 1, B * T).reshape(B, T), jnp.linspace(0.5, 2, B * T).reshape(B, T)

    def obj(fn):
        return lambda h, w: jnp.sum(fn(h, w)[0] * w1) + jnp.sum(fn(h, w)[1] * w2)

    chunked = jax.jit(lambda h, w: grpo.token_logprobs_and_entropy(h, w, targets, chunk=chunk, temperature=temp))
    dense = lambda h, w: dense_logp_entropy(h, w, targets, temp)
    lp, ent = chunked(hidden, head)
    lp_d, ent_d = dense(hidden, head)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(lp_d), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), np.asarray(ent_d), rtol=1e-5, atol=1e-5)
    gh, gw = jax.jit(jax.grad(obj(chunked), argnums=(0, 1)))(hidden, head)
    gh_d, gw_d = jax.grad(obj(dense), argnums=(0, 1))(hidden, head)
    np.testing.assert_allclose(np.asarray(gh), np.asarray(gh_d), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(gw_d), rtol=1e-4, atol=1e-5)


def test_chunked_logprobs_never_materialise_full_logits():
    hidden, head, targets = _lp_inputs()
    chunk = 4

    def obj(h, w):
        lp, ent = grpo.token_logprobs_and_entropy(h, w, targets, chunk=chunk)
        return jnp.sum(lp) + jnp.sum(ent)

    text = str(jax.make_jaxpr(jax.grad(obj, argnums=(0, 1)))(hidden, head))
    assert f"f32[{B},{chunk},{V}]" in text                      # per-chunk logits exist ...
    assert f"f32[{B},{T},{V}]" not in text                      # ... the full ones never do,
    assert f"f32[{T // chunk},{B},{chunk},{V}]" not in text     # nor stacked per-chunk residuals.


def test_lm_head_matrix_untied_and_tied():
    from types import SimpleNamespace as NS
    kernel, emb = jnp.ones((D, V)), jnp.arange(V * D, dtype=jnp.float32).reshape(V, D)
    untied = NS(lm_head=NS(kernel=kernel))
    tied = NS(lm_head=None, model=NS(embed_tokens=NS(weight=emb)))
    assert grpo.lm_head_matrix(untied).shape == (D, V)
    np.testing.assert_array_equal(np.asarray(grpo.lm_head_matrix(tied)), np.asarray(emb).T)
