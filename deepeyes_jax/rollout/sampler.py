"""The one-program multi-turn rollout: decoding, the zoom-in tool and observations, all on device.

Per trajectory (DeepEyes spec sections 1 and 2), with static shapes throughout:
  prefill the prompt -> for each turn: decode until <|im_end|>, the per-turn budget or a full
  trajectory; recognise the turn's answer / last tool call from its token ids; a valid zoom crops
  the original image, re-encodes the crop with the vision tower and appends the observation
  (whole or not at all) to the KV cache; an invalid call appends a fixed error observation; a
  turn with neither, an answer, a budget hit or the last allowed turn ends the trajectory.
Turns are synchronous across the batch (as DeepEyes' per-turn vLLM calls): rows that are done
idle, rows that finished their turn wait for the others. No host callback anywhere.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepeyes_jax import sharding as shd
from deepeyes_jax.data import image_processing as ip
from deepeyes_jax.flops import loop_trips
from deepeyes_jax.models.qwen2_5_vl.rope import mrope_position_ids
from deepeyes_jax.models.qwen2_5_vl.text import write_rows
from deepeyes_jax.rollout import config as rc
from deepeyes_jax.rollout import tools, zoom
from deepeyes_jax.rollout.inputs import RolloutBatch
from deepeyes_jax.rollout.sampling import sample_tokens


class Trajectories(NamedTuple):
    tokens: jax.Array  # int32[B, S]: prompt, turns and observations, contiguous, then padding
    attention_mask: jax.Array  # bool[B, S]
    loss_mask: jax.Array  # bool[B, S]: exactly the sampled tokens (each turn's <|im_end|> included)
    logprobs: jax.Array  # float32[B, S]: log-prob of each sampled token under the sampling policy
    position_ids: jax.Array  # int32[3, B, S]: M-RoPE positions (get_rope_index of the final sequence)
    prompt_pixel_values: jax.Array  # float32[B, Np, 1176]: image 0 of each row (the prompt image)
    prompt_grid_thw: jax.Array  # int32[B, 3]
    crop_frames: jax.Array  # uint8[B, K, Pc, 588]: the crops' patch frames, in order (K = max_turns - 1);
    # `zoom.pixel_values_from_frames` gives the float32 pixel values the model saw (8x the bytes)
    crop_grid_thw: jax.Array  # int32[B, K, 3]
    num_crops: jax.Array  # int32[B]
    turn_status: jax.Array  # int32[B, max_turns]: tools.STATUS_* of each turn
    turn_error: jax.Array  # int32[B, max_turns]: tools.ERROR_* of each turn
    turn_bbox: jax.Array  # float32[B, max_turns, 4]: clipped zoom box of each turn
    num_turns: jax.Array  # int32[B]
    num_zooms: jax.Array  # int32[B]: successful zoom observations
    response_length: jax.Array  # int32[B]: sampled tokens
    end_reason: jax.Array  # int32[B]: config.END_*
    length: jax.Array  # int32[B]: used slots


class _Observation(NamedTuple):  # one turn's observation chunk, all rows
    crop_frames: jax.Array  # uint8[B, K, Pc, 588]: the trajectories' crops, this turn's stored
    crop_grid: jax.Array  # int32[B, K, 3]
    ids: jax.Array  # int32[B, C]: the chunk's tokens (zoom template or error message)
    obs_len: jax.Array  # int32[B]
    append: jax.Array  # bool[B]: the row's observation is appended
    chunk_valid: jax.Array  # bool[B, C]
    positions: jax.Array  # int32[3, B, C]
    next_pos: jax.Array  # int32[B]
    logits: jax.Array  # float32[B, V]: after the chunk's last token
    cache: tuple
    valid: jax.Array  # bool[B, S]: filled cache slots


class _State(NamedTuple):
    tokens: jax.Array
    valid: jax.Array
    loss_mask: jax.Array
    logprobs: jax.Array
    positions: jax.Array
    cache: tuple
    last_logits: jax.Array
    length: jax.Array
    next_pos: jax.Array
    active: jax.Array
    turn: jax.Array
    step: jax.Array
    crop_frames: jax.Array
    crop_grid: jax.Array
    num_crops: jax.Array
    turn_status: jax.Array
    turn_error: jax.Array
    turn_bbox: jax.Array
    num_turns: jax.Array
    num_zooms: jax.Array
    response_length: jax.Array
    end_reason: jax.Array


def bbox_scale(image_hw, grid_thw, frame: str, patch_size: int) -> jax.Array:
    """(x, y) factors from the model's box frame to original-image pixels: float32[B, 2].

    "original": DeepEyes applies the box unchanged to the original image. "resized": the box is
    in the frame of the smart-resized prompt image the model sees (grid * patch), spec issue #141.
    """
    image_wh = image_hw[:, ::-1].astype(jnp.float32)
    if frame == "resized":
        return image_wh / (grid_thw[:, 2:0:-1] * patch_size).astype(jnp.float32)
    return jnp.ones_like(image_wh)


def _row_positions(model, ids, valid, grid, start):
    """Per-row M-RoPE of a chunk (at most one image per row) continuing from start int32[B].

    -> (positions int32[3, B, T], next position int32[B]).
    """
    def one(i, v, g):
        pos, _ = mrope_position_ids(i[None], v[None], g[None], image_token_id=model.config.image_token_id,
                                    spatial_merge_size=model.config.vision.spatial_merge_size)
        return pos[:, 0]

    pos = jnp.moveaxis(jax.vmap(one)(ids, valid, grid), 0, 1) + start[None, :, None]
    nxt = jnp.max(jnp.where(valid[None], pos, -1), axis=(0, 2)) + 1
    return pos.astype(jnp.int32), jnp.where(valid.any(axis=1), nxt, start).astype(jnp.int32)


def _put(buf, slot, value, where):
    """buf[b, slot[b]] = value[b] where `where[b]` (buf [B, S] or [3, B, S] with value [3, B])."""
    rows = jnp.arange(slot.shape[0])
    if buf.ndim == 3:
        return buf.at[:, rows, slot].set(jnp.where(where[None], value, buf[:, rows, slot]))
    return buf.at[rows, slot].set(jnp.where(where, value, buf[rows, slot]))


def _row_axis(name: str) -> int:
    return 1 if name in ("positions", "position_ids") else 0  # [3, B, S]


def rows_of(tree, i, n: int):
    """Part i of n interleaved parts of a batch or Trajectories (`sharding.take_rows` on each field's row axis)."""
    return tree._replace(**{f: shd.take_rows(getattr(tree, f), i, n, _row_axis(f)) for f in tree._fields})


def _along_rows(model, tree):
    """Constrain every array of a NamedTuple along its row axis (`activation_batch`): per-row state such as the
    crop buffers must never be replicated on every device (0.46 GiB per row at DeepEyes' crop budget)."""
    def shard(x, axis):
        if x.ndim <= axis:  # scalars (turn, step counters)
            return x
        names = [None] * x.ndim
        names[axis] = "activation_batch"
        return model.shard(x, tuple(names))

    return tree._replace(**{f: shard(getattr(tree, f), _row_axis(f)) for f in tree._fields if f != "cache"})


def _logits_at(model, hidden, index):
    """hidden float[B, T, D], index int32[B] -> float32[B, V]."""
    h = jnp.take_along_axis(hidden, index[:, None, None], axis=1)
    return model.logits(h)[:, 0].astype(jnp.float32)


def rollout_program(graphdef, cfg: rc.RolloutConfig, tpl: rc.Templates, params, batch: RolloutBatch, rng, table):
    """The rollout as a traceable function (make_rollout jits it; the fused train step inlines it).

    With cfg.row_chunks = n > 1, row r belongs to chunk r % n (so that every chunk has the same rows on every
    device under row sharding); the chunks run one after the other, each writing its trajectories into their
    rows of the output."""
    model = nnx.merge(graphdef, params).for_decoding()
    n, b = cfg.row_chunks, batch.prompt_ids.shape[0]
    if n == 1:
        return _rollout_rows(model, cfg, tpl, batch, rng, table)
    if b % n:
        raise ValueError(f"batch of {b} rows does not split into rollout.row_chunks={n} chunks")

    def chunk(c, out):
        traj = _rollout_rows(model, cfg, tpl, rows_of(batch, c, n), jax.random.fold_in(rng, c), table)
        return out._replace(**{f: shd.put_rows(getattr(out, f), getattr(traj, f), c, n, _row_axis(f))
                               for f in out._fields})

    one = jax.eval_shape(lambda: _rollout_rows(model, cfg, tpl, rows_of(batch, 0, n), rng, table))
    out = Trajectories(**{f: jnp.zeros(_grow(getattr(one, f).shape, _row_axis(f), n), getattr(one, f).dtype)
                          for f in one._fields})
    return _along_rows(model, jax.lax.fori_loop(0, n, chunk, _along_rows(model, out)))


def _grow(shape, axis: int, n: int) -> tuple[int, ...]:
    return (*shape[:axis], shape[axis] * n, *shape[axis + 1:])


def _rollout_rows(model, cfg: rc.RolloutConfig, tpl: rc.Templates, batch: RolloutBatch, rng, table):
    b, p = batch.prompt_ids.shape
    s, tt = cfg.max_total_len, cfg.max_turn_tokens
    n_pre, n_suf = len(tpl.zoom_prefix), len(tpl.zoom_suffix)
    chunk = max(n_pre + cfg.crop.max_patches // 4 + n_suf, max(map(len, tpl.errors)))
    # Slack past max_total_len so fixed-size writes and turn gathers never clamp.
    s_alloc = s + max(chunk, tt)
    if p >= s:
        raise ValueError(f"prompt length {p} leaves no room in max_total_len {s}")
    n_obs = max(cfg.max_turns - 1, 1)
    n_forced = batch.first_turn.shape[1]
    image_wh = batch.image_hw[:, ::-1].astype(jnp.float32)
    box_scale = bbox_scale(batch.image_hw, batch.image_grid_thw, cfg.bbox_frame, model.config.vision.patch_size)

    # ------------------------------------------------------------------ prefill
    prompt_valid = batch.prompt_mask.astype(bool)
    pos, next_pos = _row_positions(model, batch.prompt_ids, prompt_valid, batch.image_grid_thw, jnp.zeros(b, jnp.int32))
    hidden, cache, valid = model.decode_chunk(
        batch.prompt_ids, prompt_valid, pos, model.init_cache(b, s_alloc), jnp.zeros((b, s_alloc), bool),
        jnp.zeros(b, jnp.int32), model.encode_rows(batch.pixel_values, batch.image_grid_thw[:, None]))
    pad = lambda x, fill=0: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, s_alloc - p)], constant_values=fill)  # noqa: E731
    pc = cfg.crop.max_patches
    state = _State(
        tokens=pad(batch.prompt_ids.astype(jnp.int32)), valid=valid, loss_mask=jnp.zeros((b, s_alloc), bool),
        logprobs=jnp.zeros((b, s_alloc), jnp.float32), positions=pad(pos), cache=cache,
        last_logits=_logits_at(model, hidden, jnp.full(b, p - 1)), length=jnp.full(b, p, jnp.int32),
        next_pos=next_pos, active=jnp.ones(b, bool), turn=jnp.int32(0), step=jnp.int32(0),
        crop_frames=jnp.zeros((b, n_obs, pc, ip.PATCH_VALUES), jnp.uint8),
        crop_grid=jnp.zeros((b, n_obs, 3), jnp.int32), num_crops=jnp.zeros(b, jnp.int32),
        turn_status=jnp.full((b, cfg.max_turns), tools.STATUS_NONE, jnp.int32),
        turn_error=jnp.zeros((b, cfg.max_turns), jnp.int32), turn_bbox=jnp.zeros((b, cfg.max_turns, 4)),
        num_turns=jnp.zeros(b, jnp.int32), num_zooms=jnp.zeros(b, jnp.int32),
        response_length=jnp.zeros(b, jnp.int32), end_reason=jnp.full(b, rc.END_MAX_TURNS, jnp.int32),
    )

    state = _along_rows(model, state)

    # ------------------------------------------------------------------ one decoding step
    def decode_step(carry):
        st, decoding, turn_len = carry
        tok, lp = sample_tokens(st.last_logits, jax.random.fold_in(rng, st.step), temperature=cfg.temperature,
                                top_k=cfg.top_k, top_p=cfg.top_p)
        sampled = decoding
        if n_forced:  # the first turn's forced tokens replace the sampled ones (not part of the loss)
            want = jnp.take_along_axis(batch.first_turn, jnp.minimum(turn_len, n_forced - 1)[:, None], axis=1)[:, 0]
            forced = (st.turn == 0) & (turn_len < n_forced) & (want >= 0)
            tok = jnp.where(forced, want, tok)
            logp = jax.nn.log_softmax(st.last_logits / (cfg.temperature or 1.0), axis=-1)
            lp = jnp.where(forced, jnp.take_along_axis(logp, tok[:, None], axis=1)[:, 0], lp)
            sampled = decoding & ~forced
        slot = st.length
        hidden, cache, valid = model.decode_chunk(
            tok[:, None], decoding[:, None], jnp.broadcast_to(st.next_pos[None, :, None], (3, b, 1)),
            st.cache, st.valid, slot)
        logits = _logits_at(model, hidden, jnp.zeros(b, jnp.int32))
        inc = decoding.astype(jnp.int32)
        length, turn_len = st.length + inc, turn_len + inc
        st = st._replace(
            tokens=_put(st.tokens, slot, tok, decoding), valid=valid,
            loss_mask=_put(st.loss_mask, slot, sampled, decoding), logprobs=_put(st.logprobs, slot, lp, decoding),
            positions=_put(st.positions, slot, jnp.broadcast_to(st.next_pos, (3, b)), decoding), cache=cache,
            last_logits=jnp.where(decoding[:, None], logits, st.last_logits), length=length,
            next_pos=st.next_pos + inc, step=st.step + 1, response_length=st.response_length + sampled.astype(jnp.int32))
        finished = (tok == tpl.im_end) | (turn_len >= tt) | (length >= s)
        return st, decoding & ~finished, turn_len

    # ------------------------------------------------------------------ one turn
    def turn(st: _State) -> _State:
        turned, start = st.active, st.length
        # FLOP counting: the turns share the trajectory's slots (an upper bound on the decoded tokens).
        with loop_trips(min(tt, max(1, (s - p) // cfg.max_turns))):
            st, _, _ = jax.lax.while_loop(lambda c: c[1].any(), decode_step, (st, turned, jnp.zeros(b, jnp.int32)))
        n_tok = st.length - start
        turn_ids = jax.vmap(lambda t, i: jax.lax.dynamic_slice_in_dim(t, i, tt))(st.tokens, start)
        parse = jax.vmap(lambda ids, n, wh, sc: tools.recognize_turn(ids, n, table, wh, cfg.tool, sc))(
            turn_ids, n_tok, image_wh, box_scale)
        closed = st.tokens[jnp.arange(b), jnp.maximum(st.length - 1, 0)] == tpl.im_end
        last_turn = st.turn == cfg.max_turns - 1
        is_zoom = parse.status == tools.STATUS_ZOOM
        wants_obs = turned & closed & (is_zoom | (parse.status == tools.STATUS_ERROR)) & ~last_turn & batch.tool

        rows, k = jnp.arange(b), jnp.minimum(st.num_crops, n_obs - 1)

        def observe() -> _Observation:
            """The observation: a crop encoded by the vision tower, or a fixed error message."""
            frames, crop_grid = jax.vmap(lambda im, hw, box: zoom.crop_resize_frames(im, hw, box, cfg.crop))(
                batch.image, batch.image_hw, parse.bbox)
            n_img = crop_grid[:, 0] * crop_grid[:, 1] * crop_grid[:, 2] // model.config.vision.merge_unit
            errors = jnp.asarray([e + (0,) * (chunk - len(e)) for e in tpl.errors], jnp.int32)
            err_len = jnp.asarray([len(e) for e in tpl.errors], jnp.int32)
            i = jnp.arange(chunk)[None, :]
            after = i - n_pre - n_img[:, None]
            # Selects, not gathers from the template tokens (libtpu 0.0.52 fails to tile the gathers' bounds checks).
            zoom_ids = jnp.asarray(np.pad(np.asarray(tpl.zoom_prefix, np.int32), (0, chunk - n_pre),
                                          constant_values=tpl.image_pad))[None, :]
            for t, token in enumerate(tpl.zoom_suffix):
                zoom_ids = jnp.where(after == t, token, zoom_ids)
            ids = jnp.where(is_zoom[:, None], zoom_ids, errors[parse.error])
            obs_len = jnp.where(is_zoom, n_pre + n_img + n_suf, err_len[parse.error])
            append = wants_obs & (st.length + obs_len < s)  # whole or not at all, and room to answer
            zoomed = append & is_zoom
            crop_frames = st.crop_frames.at[rows, k].set(
                jnp.where(zoomed[:, None, None], frames, st.crop_frames[rows, k]))
            crop_grids = st.crop_grid.at[rows, k].set(jnp.where(zoomed[:, None], crop_grid, st.crop_grid[rows, k]))
            # The tower reads the stored frames (those the update re-encodes; rows without a crop read stale ones,
            # which no image token takes). With the resize's taps unrolled, XLA:CPU fused the fresh `frames` into
            # the pixel values and stored every first-pass tap (3.5x the crop's time).
            feats = model.encode_rows(zoom.pixel_values_from_frames(crop_frames[rows, k]), crop_grid[:, None])
            chunk_valid = (i < obs_len[:, None]) & append[:, None]
            pos, next_pos = _row_positions(model, ids, chunk_valid, crop_grid, st.next_pos)
            hidden, cache, valid = model.decode_chunk(ids, chunk_valid, pos, st.cache, st.valid, st.length, feats)
            return _Observation(crop_frames, crop_grids, ids, obs_len, append, chunk_valid, pos, next_pos,
                                _logits_at(model, hidden, jnp.maximum(obs_len - 1, 0)), cache, valid)

        def no_observation() -> _Observation:  # nothing is appended: the cache and crop buffers pass through
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(observe))
            return zeros._replace(crop_frames=st.crop_frames, crop_grid=st.crop_grid, cache=st.cache, valid=st.valid)

        # The crop and its encoding are most of a turn's cost: skipped in the last turn (no row may append)
        # and whenever no row called the tool.
        crop_frames, crop_grid, ids, obs_len, append, chunk_valid, pos, next_pos, obs_logits, cache, valid = (
            jax.lax.cond(wants_obs.any(), observe, no_observation))
        zoomed = append & is_zoom

        reason = jnp.select(
            [~closed & (st.length >= s), ~closed, parse.status == tools.STATUS_ANSWER,
             parse.status == tools.STATUS_NONE, ~batch.tool, last_turn],
            [rc.END_LENGTH, rc.END_TURN_BUDGET, rc.END_ANSWER, rc.END_NO_TOOL_CALL, rc.END_SINGLE_TURN,
             rc.END_MAX_TURNS], rc.END_LENGTH)
        record = lambda buf, value: buf.at[:, st.turn].set(jnp.where(turned, value, buf[:, st.turn]))  # noqa: E731
        return st._replace(
            tokens=write_rows(st.tokens, ids, st.length), valid=valid,
            loss_mask=write_rows(st.loss_mask, jnp.zeros_like(chunk_valid), st.length),
            logprobs=write_rows(st.logprobs, jnp.zeros(ids.shape, jnp.float32), st.length),
            positions=jnp.moveaxis(write_rows(jnp.moveaxis(st.positions, 0, -1), jnp.moveaxis(pos, 0, -1),
                                              st.length), -1, 0),
            cache=cache,
            last_logits=jnp.where(append[:, None], obs_logits, st.last_logits),
            length=st.length + jnp.where(append, obs_len, 0),
            next_pos=jnp.where(append, next_pos, st.next_pos),
            active=append, turn=st.turn + 1,
            crop_frames=crop_frames, crop_grid=crop_grid,
            num_crops=st.num_crops + zoomed, num_zooms=st.num_zooms + zoomed,
            turn_status=record(st.turn_status, parse.status), turn_error=record(st.turn_error, parse.error),
            turn_bbox=st.turn_bbox.at[:, st.turn].set(
                jnp.where(turned[:, None], parse.bbox, st.turn_bbox[:, st.turn])),
            num_turns=st.num_turns + turned,
            end_reason=jnp.where(turned & ~append, reason, st.end_reason),
        )

    with loop_trips(cfg.max_turns):
        st = jax.lax.while_loop(lambda st: (st.turn < cfg.max_turns) & st.active.any(),
                                lambda st: _along_rows(model, turn(st)), state)
    valid = st.valid[:, :s]
    return _along_rows(model, Trajectories(
        tokens=jnp.where(valid, st.tokens[:, :s], 0), attention_mask=valid,
        loss_mask=st.loss_mask[:, :s] & valid, logprobs=jnp.where(valid, st.logprobs[:, :s], 0.0),
        position_ids=jnp.where(valid[None], st.positions[:, :, :s], 0),
        prompt_pixel_values=batch.pixel_values, prompt_grid_thw=batch.image_grid_thw,
        crop_frames=st.crop_frames, crop_grid_thw=st.crop_grid, num_crops=st.num_crops,
        turn_status=st.turn_status, turn_error=st.turn_error, turn_bbox=st.turn_bbox, num_turns=st.num_turns,
        num_zooms=st.num_zooms, response_length=st.response_length, end_reason=st.end_reason, length=st.length,
    ))


def make_rollout(model, config: rc.RolloutConfig, templates: rc.Templates, table: tools.TokenBytes):
    """-> (rollout(params, batch, rng) -> Trajectories, params): one compiled program per batch shape.

    `params` is `nnx.state(model)`; pass updated parameters to the same function without recompiling.
    """
    graphdef, params = nnx.split(model)
    jitted = jax.jit(functools.partial(rollout_program, graphdef, config, templates))

    def rollout(params, batch: RolloutBatch, rng) -> Trajectories:
        return jitted(params, batch, rng, table)

    rollout.jitted = jitted
    return rollout, params
