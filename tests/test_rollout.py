"""The compiled multi-turn rollout: reproduces scripted trajectories, its log-probs equal a
teacher-forced forward pass, it compiles once and contains no host callback."""

import dataclasses

import jax
import numpy as np
import pytest

from deepeyes_jax.data import image_processing as ip
from deepeyes_jax.models.qwen2_5_vl import mrope_position_ids
from deepeyes_jax.models.qwen2_5_vl.model import jit_forward
from deepeyes_jax.rollout import config as rc
from deepeyes_jax.rollout import tools
from deepeyes_jax.rollout.sampler import make_rollout
from deepeyes_jax.testing import scripted

# fp32 on both sides; the rollout attends over a KV cache, the reference over the whole
# sequence at once, so only summation order differs.
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def fitted():
    return scripted.fitted()


@pytest.fixture(scope="module")
def greedy(fitted):
    setup, model = fitted
    rollout, params = make_rollout(model, setup.rollout_config(), setup.templates, setup.table)
    return rollout, params, rollout(params, setup.batch, jax.random.key(0))


def _row(traj, b):
    valid = np.asarray(traj.attention_mask[b])
    return np.asarray(traj.tokens[b])[valid], np.asarray(traj.loss_mask[b])[valid]


def test_greedy_rollout_reproduces_the_scripted_trajectories(fitted, greedy):
    setup, _ = fitted
    traj = greedy[2]
    for b in range(len(scripted.SCRIPTS)):
        want_ids, want_loss, _, want_grids = setup.trajectory(b)
        ids, loss = _row(traj, b)
        np.testing.assert_array_equal(ids, want_ids, err_msg=f"row {b}")
        np.testing.assert_array_equal(loss, want_loss, err_msg=f"row {b}")
        n = int(traj.num_crops[b])
        assert n == scripted.EXPECTED_ZOOMS[b] == int(traj.num_zooms[b])
        np.testing.assert_array_equal(np.asarray(traj.crop_grid_thw[b, :n]), np.stack(want_grids[1:]) if n else
                                      np.zeros((0, 3)))
    np.testing.assert_array_equal(np.asarray(traj.end_reason), [rc.END_ANSWER] * 3)
    np.testing.assert_array_equal(np.asarray(traj.num_turns), [3, 3, 1])
    status = np.asarray(traj.turn_status)
    assert status[0, :3].tolist() == [tools.STATUS_ZOOM, tools.STATUS_ZOOM, tools.STATUS_ANSWER]
    assert status[1, :3].tolist() == [tools.STATUS_ERROR, tools.STATUS_ZOOM, tools.STATUS_ANSWER]
    assert int(traj.turn_error[1, 0]) == tools.ERROR_INVALID_BBOX
    np.testing.assert_allclose(np.asarray(traj.turn_bbox[0, 1]), [50, 40, 200, 160])
    assert int(traj.response_length[2]) == int(np.asarray(traj.loss_mask[2]).sum())


def _full_forward_inputs(traj):
    """Images of every row in order of appearance: the prompt image, then its crops."""
    pixels, grids = [], []
    for r in range(traj.tokens.shape[0]):
        g = np.asarray(traj.prompt_grid_thw[r])
        pixels.append(np.asarray(traj.prompt_pixel_values[r])[:int(np.prod(g))])
        grids.append(g)
        for k in range(int(traj.num_crops[r])):
            g = np.asarray(traj.crop_grid_thw[r, k])
            pixels.append(ip.pixel_values_from_frames(np.asarray(traj.crop_frames[r, k])[:int(np.prod(g))]))
            grids.append(g)
    return np.concatenate(pixels), np.stack(grids).astype(np.int32)


def _config(setup, temperature):
    """Sampling with top-k 50 (greedy: the `greedy` fixture's program), so tests share compiled rollouts."""
    return setup.rollout_config(temperature=temperature, **({"top_k": 50} if temperature else {}))


@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (0.7, 1), (0.7, 2)])  # one sampled program, two seeds
def test_logprobs_equal_teacher_forcing(fitted, temperature, seed):
    setup, model = fitted
    rollout, params = make_rollout(model, _config(setup, temperature), setup.templates, setup.table)
    traj = rollout(params, setup.batch, jax.random.key(seed))
    ids, mask = np.asarray(traj.tokens), np.asarray(traj.attention_mask).astype(np.int32)
    pixels, grids = _full_forward_inputs(traj)
    # The recorded positions are get_rope_index of the final sequence.
    want_pos, _ = mrope_position_ids(ids, mask, grids, image_token_id=setup.config.image_token_id,
                                     spatial_merge_size=2)
    np.testing.assert_array_equal(np.asarray(traj.position_ids)[:, mask.astype(bool)],
                                  np.asarray(want_pos)[:, mask.astype(bool)])
    logits = np.asarray(jit_forward(model)(ids, mask, pixels, grids), np.float64)
    if temperature:
        logits = logits / temperature
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    loss = np.asarray(traj.loss_mask)[:, 1:]
    assert loss.sum() > 20
    got = np.asarray(traj.logprobs)[:, 1:]
    np.testing.assert_allclose(got[loss], want[loss], atol=LOGPROB_TOL, rtol=0)


def test_second_batch_does_not_retrace_and_no_host_callback(fitted, greedy):
    setup, model = fitted
    rollout, params, _ = greedy
    before = rollout.jitted._cache_size()
    other = setup.batch._replace(image=setup.batch.image[::-1].copy())
    rollout(params, other, jax.random.key(5)).tokens.block_until_ready()
    assert rollout.jitted._cache_size() == before == 1
    hlo = rollout.jitted.lower(params, setup.batch, jax.random.key(0), setup.table).as_text()
    assert "callback" not in hlo.lower()


def test_greedy_single_turn_equals_transformers_generate(tmp_path):
    """A random (untrained) model, one turn of 24 greedy tokens, against transformers' generate."""
    import torch
    import transformers
    from flax import nnx

    from deepeyes_jax.models.qwen2_5_vl import Qwen2_5_VL, save_pretrained

    setup = scripted.Setup()
    model = Qwen2_5_VL(setup.config, rngs=nnx.Rngs(3))
    n_new = 24
    rollout, params = make_rollout(model, setup.rollout_config(max_turns=1, max_turn_tokens=n_new),
                                   setup.templates, setup.table)
    traj = rollout(params, setup.batch, jax.random.key(0))

    save_pretrained(model, str(tmp_path))
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = setup.batch
    grids = batch.image_grid_thw
    pixels = np.concatenate([batch.pixel_values[r][:int(np.prod(g))] for r, g in enumerate(grids)])
    ids = batch.prompt_ids.astype(np.int64)
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(batch.prompt_mask.astype(np.int64)),
            pixel_values=torch.from_numpy(pixels), image_grid_thw=torch.from_numpy(grids.astype(np.int64)),
            mm_token_type_ids=torch.from_numpy((ids == setup.config.image_token_id).astype(np.int64)),
            max_new_tokens=n_new, do_sample=False, eos_token_id=setup.templates.im_end,
            pad_token_id=0).numpy()[:, ids.shape[1]:]
    p = ids.shape[1]
    for b in range(len(ids)):
        ours = np.asarray(traj.tokens[b, p:p + int(traj.response_length[b])])
        ref = out[b]
        if (ref == setup.templates.im_end).any():
            ref = ref[:int(np.argmax(ref == setup.templates.im_end)) + 1]
        np.testing.assert_array_equal(ours, ref, err_msg=f"row {b}")
    assert int(traj.response_length.sum()) > 3 * 5


def test_same_trajectories_on_a_device_mesh_with_scanned_layers(fitted, greedy, tmp_path):
    """Batch sharded over data x fsdp, heads over tensor, and the layers scanned (`scan_layers`: the KV cache
    stacked [L, ...] and carried through the scan): the greedy rollout is unchanged, tokens exact and log-probs
    within 1e-5 of the `greedy` fixture's (unsharded, unrolled)."""
    from deepeyes_jax.models.qwen2_5_vl import from_pretrained, save_pretrained
    from deepeyes_jax.sharding import make_mesh

    setup, model = fitted
    rows = [0, 1, 2, 0]
    batch = setup.make_batch(rows)
    save_pretrained(model, str(tmp_path))
    sharded = from_pretrained(str(tmp_path), mesh=make_mesh((2, 2, 2)), scan_layers=True)
    assert sharded.model.layers[0].self_attn.q_proj.kernel[...].sharding.spec == jax.sharding.PartitionSpec(
        "fsdp", "tensor")
    rollout, params = make_rollout(sharded, setup.rollout_config(), setup.templates, setup.table)
    traj = rollout(params, batch, jax.random.key(0))
    for i, r in enumerate(rows):
        want_ids, _, _, _ = setup.trajectory(r)
        np.testing.assert_array_equal(_row(traj, i)[0], want_ids, err_msg=f"row {i}")
    np.testing.assert_allclose(np.asarray(traj.logprobs), np.asarray(greedy[2].logprobs)[rows], atol=1e-5)
    hlo = rollout.jitted.lower(params, batch, jax.random.key(0), setup.table).as_text()
    assert hlo.count("sharding_constraint") > 0
    # Every trajectory field leaves the compiled program split along rows over data x fsdp (4 ways), none
    # replicated (crops included); the row axis of position_ids is 1.
    compiled = rollout.jitted.lower(params, batch, jax.random.key(0), setup.table).compile()
    for name, x, sharding in zip(traj._fields, traj, compiled.output_shardings):
        axis = 1 if name == "position_ids" else 0
        assert sharding.shard_shape(x.shape)[axis] == x.shape[axis] // 4, (name, sharding)


def test_scanned_decoding_holds_one_layer_in_the_program():
    """With `scan_layers` the rollout's program (prefill, decode steps, observations) holds one decoder layer: its
    dot count is the same at 2 and 6 layers (unrolled it grows), so compile time stops growing with depth."""
    from flax import nnx

    from deepeyes_jax.models.qwen2_5_vl import Qwen2_5_VL

    setup = scripted.Setup()
    config = setup.rollout_config(max_turns=2, max_turn_tokens=4)

    def dots(layers, scan):
        text = dataclasses.replace(setup.config.text, num_hidden_layers=layers)
        model = Qwen2_5_VL(dataclasses.replace(setup.config, text=text, scan_layers=scan), rngs=nnx.Rngs(0))
        rollout, params = make_rollout(model, config, setup.templates, setup.table)
        return rollout.jitted.lower(params, setup.batch, jax.random.key(0), setup.table).as_text().count(
            "dot_general")

    assert dots(2, True) == dots(6, True) < dots(6, False)


def test_row_chunks_give_the_same_greedy_trajectories(fitted, greedy):
    """rollout.row_chunks=3 over 6 rows: rows c, c + 3 roll out together, one chunk after the other, and come back
    in row order with the scripted tokens and the same trajectories as the `greedy` fixture's rows rolled out
    all at once (tokens exact, log-probs to 1e-5)."""
    setup, model = fitted
    rows = [0, 1, 2, 2, 0, 1]
    batch = setup.make_batch(rows)
    rollout, params = make_rollout(model, setup.rollout_config(row_chunks=3), setup.templates, setup.table)
    chunked = jax.tree.map(np.asarray, rollout(params, batch, jax.random.key(0)))
    whole = jax.tree.map(np.asarray, greedy[2])
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(_row(chunked, i)[0], setup.trajectory(r)[0], err_msg=f"row {i}")
    for name, a, b in zip(whole._fields, whole, chunked):
        a = a[:, rows] if name == "position_ids" else a[rows]
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(b, a, err_msg=name)
    assert chunked.num_zooms.sum() > 0
    with pytest.raises(ValueError, match="does not split into rollout.row_chunks=4"):
        make_rollout(model, setup.rollout_config(row_chunks=4), setup.templates, setup.table)[0](
            params, batch, jax.random.key(0))


def test_a_forced_first_turn_is_executed_and_a_row_without_the_tool_has_one_turn(fitted, greedy):
    """RolloutBatch.first_turn (data selection's ground-truth zoom): row 0 forced to its own scripted first turn
    gives the greedy fixture's trajectory (tokens exact) with the forced tokens out of the loss mask; row 1 (script
    2, which answers at once) forced to open with row 0's first zoom call has that call executed like a sampled one
    (status, box, crop), then goes on decoding. RolloutBatch.tool: row 2 (script 0) without the tool (DeepEyes'
    non-agent rows) writes its zoom call but it is not executed and the trajectory ends after that one turn."""
    setup, model = fitted
    ids, loss, _, want_grids = setup.trajectory(0)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], loss.astype(np.int8), [0]])))
    first = ids[edges[0]:edges[1]]  # row 0's first assistant turn, <|im_end|> included
    assert first[-1] == setup.templates.im_end
    forced = np.full((3, 64), -1, np.int32)
    forced[:2, :len(first)] = first
    batch = setup.make_batch([0, 2, 0])._replace(first_turn=forced, tool=np.array([True, True, False]))
    rollout, params = make_rollout(model, setup.rollout_config(), setup.templates, setup.table)
    traj = jax.tree.map(np.asarray, rollout(params, batch, jax.random.key(0)))
    got_ids, got_loss = _row(traj, 0)
    np.testing.assert_array_equal(got_ids, ids)
    want_loss = loss.copy()
    want_loss[edges[0]:edges[1]] = False
    np.testing.assert_array_equal(got_loss, want_loss)
    np.testing.assert_array_equal(traj.turn_bbox[0], np.asarray(greedy[2].turn_bbox)[0])
    p = int(batch.prompt_mask[1].sum())
    ids1, loss1 = _row(traj, 1)
    np.testing.assert_array_equal(ids1[p:p + len(first)], first)
    assert not loss1[p:p + len(first)].any() and loss1[p + len(first):].any()  # then the model decodes
    assert traj.turn_status[1, 0] == tools.STATUS_ZOOM and traj.num_zooms[1] >= 1
    np.testing.assert_array_equal(traj.turn_bbox[1, 0], traj.turn_bbox[0, 0])
    np.testing.assert_array_equal(traj.crop_grid_thw[1, 0], want_grids[1])
    assert (traj.response_length == traj.loss_mask.sum(1)).all()
    ids2, loss2 = _row(traj, 2)
    np.testing.assert_array_equal(ids2, ids[:edges[1]])  # the prompt and the (unexecuted) zoom turn, nothing more
    assert (traj.num_turns[2], traj.num_zooms[2], traj.end_reason[2]) == (1, 0, rc.END_SINGLE_TURN)


def test_bbox_frame_scales():
    from deepeyes_jax.rollout.sampler import bbox_scale
    hw = np.array([[1000, 2000], [168, 224]])
    grid = np.array([[1, 36, 72], [1, 12, 16]])  # smart-resized to 504 x 1008 and 168 x 224
    np.testing.assert_allclose(np.asarray(bbox_scale(hw, grid, "resized", 14)), [[2000 / 1008, 1000 / 504], [1, 1]])
    np.testing.assert_array_equal(np.asarray(bbox_scale(hw, grid, "original", 14)), np.ones((2, 2)))
    from deepeyes_jax.rollout.zoom import CropSpec
    crop = CropSpec(image_height=64, image_width=64, min_pixels=3136, max_pixels=3136)
    with pytest.raises(ValueError, match="bbox_frame must be 'original' or 'resized', got 'model'"):
        rc.RolloutConfig(max_total_len=64, crop=crop, bbox_frame="model")


def test_device_teacher_forcing_matches_recorded_logprobs(fitted):
    """The on-device trajectory pass the GRPO update uses gives the rollout's own log-probs."""
    from flax import nnx

    from deepeyes_jax.rl.trajectory_forward import trajectory_hidden

    setup, model = fitted
    rollout, params = make_rollout(model, _config(setup, 1.0), setup.templates, setup.table)
    traj = rollout(params, setup.batch, jax.random.key(11))
    assert int(traj.num_zooms.sum()) >= 1
    graphdef, state = nnx.split(model)

    @jax.jit
    def logprobs(state, traj):
        m = nnx.merge(graphdef, state)
        logits = m.logits(trajectory_hidden(m, traj)).astype(np.float32)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return jax.numpy.take_along_axis(logp, traj.tokens[:, 1:, None], axis=-1)[..., 0]

    got = np.asarray(logprobs(state, traj))
    loss = np.asarray(traj.loss_mask)[:, 1:]
    np.testing.assert_allclose(got[loss], np.asarray(traj.logprobs)[:, 1:][loss], atol=LOGPROB_TOL, rtol=0)


def test_packed_images_match_encoding_each_image_alone(fitted, greedy):
    """The update encodes a row's prompt image and its used crops in one packed call of the vision tower:
    the same features, and the same parameter gradients, as encoding every image alone (fp32; only the
    flash attention's block order differs)."""
    import jax.numpy as jnp
    from flax import nnx

    from deepeyes_jax.rl.trajectory_forward import packed_patches, trajectory_embeddings

    setup, model = fitted
    traj = greedy[2]
    assert np.asarray(traj.num_crops).tolist() == [2, 1, 0]
    pixels, grids = _full_forward_inputs(traj)
    ends = np.cumsum(np.prod(grids, axis=1))
    packed, _ = packed_patches(traj, 4)
    assert packed.shape[1] <= 4 * traj.tokens.shape[1]
    rows, cols = np.nonzero(np.asarray(traj.tokens) == setup.config.image_token_id)
    assert len(rows) * 4 == ends[-1]
    weight = np.random.default_rng(0).normal(size=(len(rows), model.config.text.hidden_size)).astype(np.float32)
    graphdef, state = nnx.split(model)

    def packed_features(state):
        return trajectory_embeddings(nnx.merge(graphdef, state), traj)[rows, cols]

    def features_alone(state):
        m = nnx.merge(graphdef, state)
        return jnp.concatenate([m.encode_images(p, g[None]) for p, g in
                                zip(np.split(pixels, ends[:-1]), grids)])

    def value_and_grad(f):
        return jax.jit(jax.value_and_grad(lambda s: jnp.sum(f(s) * weight), allow_int=True))(state)

    np.testing.assert_allclose(np.asarray(jax.jit(packed_features)(state)),
                               np.asarray(jax.jit(features_alone)(state)), atol=1e-5, rtol=0)
    (got, got_grads), (want, want_grads) = value_and_grad(packed_features), value_and_grad(features_alone)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    visual = [(path, g) for path, g in jax.tree_util.tree_leaves_with_path(want_grads) if "visual" in str(path)]
    assert visual and any(np.abs(np.asarray(g)).max() > 0 for _, g in visual)
    for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(want_grads), jax.tree.leaves(got_grads)):
        if jnp.issubdtype(g.dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(h), np.asarray(g), atol=1e-5 * max(np.abs(np.asarray(g)).max(), 1),
                                       err_msg=str(path))
