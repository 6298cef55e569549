"""The fused GRPO step (rollout + reward + advantages + loss + update in one program)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepeyes_jax.models.qwen2_5_vl.model import jit_forward
from deepeyes_jax.rl.grpo import GRPOConfig
from deepeyes_jax.rl.rewards import SOURCE_TOOL
from deepeyes_jax.rl.train_step import ActorConfig, TrainBatch, TrainConfig, make_optimizer, make_train_step
from deepeyes_jax.testing import scripted

QUESTION = "Which option is right, A or B?"
# The same prompt answered both ways: the fitted policy is a coin between A and B.
BANDIT = [(QUESTION, ["<answer>A</answer>"]), (QUESTION, ["<answer>B</answer>"])]
GROUP = 8


@pytest.fixture(scope="module")
def bandit():
    setup = scripted.Setup(BANDIT)
    # 90 steps: adam at the fit's learning rate has a loss spike around step 50 that float rounding moves
    # about; by 90 it is over (loss ~0.11-0.15 on both attention paths, measured).
    return setup, scripted.fit(setup, steps=90, until_exact=False)


def _batch(setup, answer=b"A"):
    rollout = setup.make_batch([0] * 2 * GROUP)
    b = len(rollout.prompt_ids)
    gt = np.zeros((b, 8), np.uint8)
    gt[:, :len(answer)] = np.frombuffer(answer, np.uint8)
    return TrainBatch(rollout, gt, np.full(b, len(answer), np.int32), np.full(b, SOURCE_TOOL, np.int32),
                      box=np.zeros((b, 4), np.float32), has_box=np.zeros(b, bool))


# The default step of these tests (one compiled program shared through the persistent cache): a k3 KL term to a
# frozen reference, as in verl's GRPO recipes.
KL = GRPOConfig(group_size=GROUP, kl_coef=0.1, kl_type="k3")


def _train_step(setup, model, lr=2e-3, tx=None, grpo=KL, **actor):
    # The step donates its parameters; train a copy so the shared fixture model stays usable.
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    config = TrainConfig(rollout=setup.rollout_config(temperature=1.0, max_turns=2), grpo=grpo,
                         actor=ActorConfig(**actor))
    tx = make_optimizer(lr, max_grad_norm=1.0) if tx is None else tx
    return make_train_step(model, tx, config, setup.templates, setup.table)


def _p_answer_a(setup, model):
    """P(A) / (P(A) + P(B)) of the two scripted answers, teacher forced."""
    ids, mask, loss, pixels, grids = scripted.packed([setup.trajectory(0), setup.trajectory(1)])
    logits = np.asarray(jit_forward(model)(ids, mask, pixels, grids), np.float64)[:, :-1]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    tok = np.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    la, lb = (tok[i][loss[i, 1:]].sum() for i in range(2))
    return 1 / (1 + np.exp(lb - la))


def test_probability_of_the_rewarded_answer_rises_and_moves_away_from_the_reference(bandit):
    setup, model = bandit
    graphdef = nnx.split(model)[0]
    p0 = _p_answer_a(setup, model)
    assert 0.2 < p0 < 0.8, p0
    step, params, opt_state = _train_step(setup, model)
    assert step.ref_params is not None
    batch = _batch(setup)
    accuracy, kl = [], []
    for i in range(4):
        params, opt_state, metrics, _, _ = step(params, opt_state, batch, jax.random.key(i))
        accuracy.append(float(metrics["accuracy"]))
        kl.append(float(metrics["kl"]))
    p1 = _p_answer_a(setup, nnx.merge(graphdef, params))
    assert p1 > p0 + 0.2, (p0, p1, accuracy)
    # The first step evaluates the frozen reference itself (KL 0 up to float noise); then the policy moves away.
    assert abs(kl[0]) < 1e-5 and kl[-1] > 1e-4, kl


def test_loss_equals_numpy_recomputation_and_compiles_once(bandit):
    setup, model = bandit
    step, params, opt_state = _train_step(setup, model)
    batch = _batch(setup)
    _, _, metrics, traj, rows = step(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, opt_state), batch,
                                     jax.random.key(3))
    # Advantages: (r - mean) / (unbiased std + 1e-6) per group of 8.
    r = np.asarray(rows["reward"], np.float64).reshape(-1, GROUP)
    want_adv = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(rows["advantage"]), want_adv.reshape(-1), atol=1e-5)
    assert 0 < float(np.mean(np.asarray(rows["acc"]))) < 1
    # First step: the policy is the sampling policy and the reference, ratio = 1 up to ~1e-5, nothing is
    # clipped, the KL term ~0, so the token-mean loss is -sum(A * tokens) / sum(tokens).
    tokens = np.asarray(traj.loss_mask).sum(1)
    want = -(np.asarray(rows["advantage"]) * tokens).sum() / tokens.sum()
    assert abs(float(metrics["loss"]) - want) < 1e-3
    assert float(metrics["pg_clipfrac"]) == 0.0

    hlo = step.jitted.lower(params, opt_state, batch, jax.random.key(0), setup.table, None).as_text()
    assert "callback" not in hlo.lower()
    step(params, opt_state, batch, jax.random.key(4))
    assert step.jitted._cache_size() == 1


def test_micro_batching_remat_and_length_buckets_give_the_exact_update(bandit):
    """4 micro-batches of 4 rows give the full-batch update (plain SGD shows the gradient itself), also with
    ModelConfig.remat=True (decoder layers and vision blocks recomputed in the backward pass) inside the
    one-program step, rollout loops included, and with each micro-batch trimmed to a length bucket
    (ActorConfig.length_buckets: rows sorted by length into the micro-batches; a bucket that would cut a
    trajectory is passed over)."""
    import optax

    from deepeyes_jax.models.qwen2_5_vl import Qwen2_5_VL
    setup, model = bandit
    rematted = Qwen2_5_VL(model.config.replace(remat=True), rngs=nnx.Rngs(0))
    nnx.update(rematted, nnx.state(model))
    batch = _batch(setup)
    out = {}
    for micro, m in ((1, model), (4, rematted)):
        buckets = () if micro == 1 else (used // 2, -(-used // 8) * 8)
        step, params, opt_state = _train_step(setup, m, tx=optax.sgd(1.0), grpo=GRPOConfig(group_size=GROUP),
                                              micro_batches=micro, logprob_chunk=64, length_buckets=buckets)
        if m is rematted:
            jaxpr = str(jax.make_jaxpr(step.jitted)(params, opt_state, batch, jax.random.key(7), setup.table, None))
            assert "remat" in jaxpr
        params, _, metrics, traj, _ = step(params, opt_state, batch, jax.random.key(7))
        out[micro] = (jax.tree.map(np.asarray, params), float(metrics["loss"]), float(metrics["grad_norm"]))
        lengths, full = np.sort(np.asarray(traj.length)), traj.tokens.shape[1]
        used = int(lengths[-1])
        if micro == 1:
            assert float(metrics["update_length"]) == full
        else:  # each micro-batch of 4 (rows sorted by length) at the bucket of its longest row
            want = np.mean([min(b for b in buckets + (full,) if b >= g.max()) for g in lengths.reshape(4, 4)])
            assert float(metrics["update_length"]) == want < full, (lengths, buckets, full)
    (p1, l1, g1), (p4, l4, g4) = out[1], out[4]
    assert g1 > 0 and abs(g1 - g4) < 1e-5 * g1 and abs(l1 - l4) < 1e-6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), p1, p4)


class _Rows(NamedTuple):  # the two kinds of row axis of Trajectories
    length: jax.Array  # [B]
    position_ids: jax.Array  # [3, B, S]


def test_rows_are_sorted_by_length_into_micro_batches_within_their_mini_batch():
    """`by_length`: every mini-batch keeps its own rows (so the update is unchanged), and its micro-batches (the
    interleaved parts `rows_of` takes) hold successive length groups; the advantages move with their rows."""
    from deepeyes_jax.rl.train_step import by_length
    from deepeyes_jax.rollout.sampler import rows_of
    length = np.random.default_rng(0).integers(1, 100, 16).astype(np.int32)
    for n_mini, n_micro in ((1, 4), (2, 2), (2, 4), (1, 1)):
        rows = jnp.arange(16)
        t = _Rows(length=jnp.asarray(length), position_ids=jnp.stack([rows] * 3)[:, :, None])
        s, adv = by_length(t, rows.astype(jnp.float32), n_mini, n_micro)
        adv = np.asarray(adv).astype(int)
        np.testing.assert_array_equal(np.asarray(s.length), length[adv])
        np.testing.assert_array_equal(np.asarray(s.position_ids)[1, :, 0], adv)
        for m in range(n_mini):
            assert set(adv[m::n_mini] % n_mini) == {m}
            groups = [np.asarray(rows_of(s, m + n_mini * u, n_mini * n_micro).length) for u in range(n_micro)]
            assert all(a.max() <= b.min() for a, b in zip(groups, groups[1:])), groups


def test_several_updates_per_rollout_batch(bandit):
    setup, model = bandit
    step, params, opt_state = _train_step(setup, model, grpo=GRPOConfig(group_size=GROUP), mini_batches=2,
                                          micro_batches=2)
    assert step.ref_params is None  # no reference model without a KL term
    params, opt_state, metrics, _, _ = step(params, opt_state, _batch(setup), jax.random.key(1))
    counts = [np.asarray(x) for x in jax.tree.leaves(opt_state) if np.asarray(x).dtype == np.int32]
    assert counts and all(int(c) == 2 for c in counts)  # adam's step count: two updates happened
    assert np.isfinite(float(metrics["loss"]))
    with pytest.raises(ValueError, match="must divide into groups of 8 and into 2 mini x 2 micro"):
        step(params, opt_state, _batch(setup)._replace(answer=np.zeros((6, 8), np.uint8)), jax.random.key(1))


@pytest.fixture(scope="module")
def judged(bandit):
    """One judged step (judge on: rollout program -> host judge on a real HTTP server on loopback -> update
    program) -> (setup, step, params and optimizer state before it, batch, its outputs, the judge's bodies)."""
    from test_judge import _Server

    from deepeyes_jax.rl.judge import JudgeClient, JudgeConfig
    from deepeyes_jax.rl.train_step import make_judged_train_step

    setup, model = bandit
    graphdef, state = nnx.split(model)
    fresh = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    config = TrainConfig(rollout=setup.rollout_config(temperature=1.0, max_turns=2), grpo=GRPOConfig(group_size=GROUP))
    server = _Server()
    try:
        client = JudgeClient(JudgeConfig(base_url=server.url("letter_a"), timeout=5.0, backoff=0.02))
        step, params, opt_state = make_judged_train_step(fresh, make_optimizer(1e-3), config, setup.templates,
                                                         setup.table, tokenizer=setup.tokenizer, judge=client)
        batch = _batch(setup)
        before = jax.tree.map(jnp.copy, (params, opt_state))
        questions, truths = [QUESTION] * len(batch.answer), ["A"] * len(batch.answer)
        out = step(params, opt_state, batch, jax.random.key(0), questions, truths)
    finally:
        server.close()
    return setup, step, before, batch, out, server.bodies


def test_judged_step_uses_the_judge_over_http(judged):
    _, _, _, _, (_, _, metrics, _, rows), bodies = judged
    acc = np.asarray(rows["acc"])
    assert 0 < acc.mean() < 1 and float(metrics["judge_failed"]) == 0
    # The judge's verdicts drive the reward: 0.8 acc - 0.2 format error (no zooms in these single-turn answers).
    np.testing.assert_allclose(np.asarray(rows["reward"]), 0.8 * acc - 0.2 * np.asarray(rows["format_error"]),
                               atol=1e-6)
    assert sum(1 for mode, _ in bodies if mode == "letter_a") == len(acc)


def test_zero_advantages_give_zero_gradient(judged):
    """Equal rewards in every group: zero advantages, a zero gradient, unchanged parameters (the judged step's
    update program, fed the same trajectories with every reward 0)."""
    setup, step, (params, opt_state), batch, (_, _, _, traj, _), _ = judged
    score = step.score(params, batch, jax.random.key(0), setup.table)[1]
    score = dict(score, reward=jnp.zeros_like(score["reward"]))
    before = jax.tree.map(np.asarray, params)
    params, _, metrics, rows = step.update(params, opt_state, traj, score, batch.box, batch.has_box, None)
    assert float(metrics["grad_norm"]) == 0.0
    np.testing.assert_array_equal(np.asarray(rows["advantage"]), 0.0)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), before)
