"""Qwen2.5-VL for conditional generation: vision tower + merge at <|image_pad|> + decoder + LM head."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepeyes_jax.models.layers import Dense
from deepeyes_jax.models.qwen2_5_vl.config import ModelConfig
from deepeyes_jax.models.qwen2_5_vl.rope import mrope_cos_sin, mrope_position_ids
from deepeyes_jax.models.qwen2_5_vl.text import TextModel, write_rows
from deepeyes_jax.models.qwen2_5_vl.vision import VisionTower
from deepeyes_jax.sharding import Sharder, without_fsdp_on_parameters


def merge_image_features(embeds: jax.Array, input_ids: jax.Array, features: jax.Array, image_token_id: int):
    """Put features float[U, D] at the image tokens of embeds float[B, T, D], in row-major order.

    Static shapes: the k-th image token takes row k (transformers' masked_scatter).
    """
    is_img = input_ids == image_token_id
    idx = jnp.cumsum(is_img.reshape(-1), dtype=jnp.int32).reshape(is_img.shape) - 1
    idx = jnp.clip(idx, 0, features.shape[0] - 1)
    return jnp.where(is_img[..., None], features[idx].astype(embeds.dtype), embeds)


def _concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


class Qwen2_5_VL(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, mesh: jax.sharding.Mesh | None = None):
        kw = dict(rngs=rngs, param_dtype=config.param_dtype, dtype=config.dtype)
        self.shard = Sharder(mesh, config.axis_rules)
        self.visual = VisionTower(config.vision, shard=self.shard, remat=config.remat, scan=config.scan_layers, **kw)
        self.model = TextModel(config.text, shard=self.shard, remat=config.remat, scan=config.scan_layers,
                               attention_chunk=config.attention_chunk, attention_impl=config.attention_impl, **kw)
        self.lm_head = (None if config.tie_word_embeddings else
                        Dense(config.text.hidden_size, config.text.vocab_size, logical_axes=("embed", "vocab"),
                              use_bias=False, **kw))
        self.config = config
        if mesh is not None:
            self._lay_out_parameters()

    def _lay_out_parameters(self):
        """Put every freshly initialised parameter on its logical sharding (initialisers fill one device). Through the
        host: a mesh over several processes is not reachable from one process's device, and every process drew the
        same values from the same seed."""
        for _, var in nnx.to_flat_state(nnx.state(self, nnx.Param)):
            value = var.get_value()
            if not _concrete(value):  # abstract (nnx.eval_shape) or traced: nothing to move
                return
            with jax.transfer_guard("allow"):
                var.set_value(jax.device_put(np.asarray(value),
                                             self.shard.sharding(var.get_metadata()["logical_axes"], value.shape)))

    def for_decoding(self) -> Qwen2_5_VL:
        """This model with its weights cast to the compute dtype and, on a mesh, gathered over `fsdp` (still split
        over `tensor`), inside the traced program: the rollout pays one all-gather per weight instead of one per
        weight per decoded token (FSDP's per-layer gather inside the decode loop). With `scan_layers` its decoder
        layers are one prebuilt `LayerStack` (a decoding-only model: it cannot be saved as a checkpoint)."""
        graphdef, state = nnx.split(self)
        dtype = jnp.dtype(self.config.dtype)
        gathered = Sharder(self.shard.mesh, without_fsdp_on_parameters(self.config.axis_rules))

        def lay(var):
            value = var.get_value()
            if jnp.issubdtype(value.dtype, jnp.floating):
                value = value.astype(dtype)
            if self.shard.mesh is not None and "logical_axes" in var.get_metadata():
                value = gathered(value, var.get_metadata()["logical_axes"])
            return var.replace(value)

        decoding = nnx.merge(graphdef, jax.tree.map(lay, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
        if self.config.scan_layers:  # stacked once here, not in every decode step's scan
            decoding.model.layers = decoding.model.layer_stack(gathered if self.shard.mesh is not None else None)
        return decoding

    # ---------------------------------------------------------------- pieces

    def encode_images(self, pixel_values: jax.Array, image_grid_thw: jax.Array) -> jax.Array:
        """float[N, 1176] patches + int[I, 3] grids -> float[N/4, D] LLM-width image tokens."""
        return self.visual(jnp.asarray(pixel_values), jnp.asarray(image_grid_thw))

    def encode_rows(self, pixel_values: jax.Array, image_grid_thw: jax.Array) -> jax.Array:
        """Each row's own images: float[B, N, 1176] patches + int[B, I, 3] grids -> float[B, N/4, D]. The rows
        stay on their devices (`Sharder.vmap_rows`): a row's patches are never split over the mesh."""
        return self.shard.vmap_rows(self.encode_images)(pixel_values, image_grid_thw)

    def logits(self, hidden: jax.Array) -> jax.Array:
        out = self.model.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return self.shard(out, ("activation_batch", "activation_length", "activation_vocab"))

    def position_ids(self, input_ids, attention_mask=None, image_grid_thw=None):
        """int[3, B, T] M-RoPE positions and int[B, 1] decode deltas (transformers' get_rope_index)."""
        return mrope_position_ids(
            input_ids, attention_mask, image_grid_thw,
            image_token_id=self.config.image_token_id,
            spatial_merge_size=self.config.vision.spatial_merge_size,
        )

    # ---------------------------------------------------------------- decoding with a KV cache

    def init_cache(self, batch: int, length: int):
        """Empty KV cache in `kv_cache_dtype` (default: the compute dtype): per layer (k, v) float[B, S, KV, hd]
        (each updated in place by its unrolled layer); with `scan_layers` one (k, v) float[L, B, S, KV, hd], carried
        through the scan over layers and updated in place.
        """
        t = self.config.text
        shape = (batch, length, t.num_key_value_heads, t.head_dim)
        axes = ("activation_batch", "activation_length", "activation_kv_heads", None)
        dtype = self.config.kv_cache_dtype or self.config.dtype
        if self.config.scan_layers:
            shape, axes = (t.num_hidden_layers, *shape), (None, *axes)
        zeros = lambda: self.shard(jnp.zeros(shape, dtype), axes)  # noqa: E731
        return (zeros(), zeros()) if self.config.scan_layers else tuple(
            (zeros(), zeros()) for _ in range(t.num_hidden_layers))

    def decode_chunk(self, input_ids, chunk_valid, position_ids, cache, kv_valid, start, image_features=None):
        """Append T tokens per row to the cache and return their final hidden states.

        input_ids int[B, T] written at slots start int32[B] + [0, T); chunk_valid bool[B, T] marks the
        real ones (the rest are ignored); position_ids int[3, B, T]; cache from `init_cache`;
        kv_valid bool[B, S] marks filled slots; image_features float[B, U, D]: row b's image tokens
        take its rows in order. -> (hidden float[B, T, D], cache, kv_valid).
        """
        cfg = self.config
        embeds = self.model.embed_tokens(input_ids)
        if image_features is not None:
            merge = lambda e, i, f: merge_image_features(e[None], i[None], f, cfg.image_token_id)[0]  # noqa: E731
            embeds = jax.vmap(merge)(embeds, input_ids, image_features)
        kv_valid = write_rows(kv_valid, chunk_valid, start)
        cos, sin = mrope_cos_sin(position_ids, head_dim=cfg.text.head_dim, theta=cfg.text.rope_theta,
                                 mrope_section=cfg.text.mrope_section, dtype=cfg.dtype)
        hidden, cache = self.model(embeds, cos, sin, kv_valid, cache, start)
        return hidden, cache, kv_valid

    # ---------------------------------------------------------------- forward

    def __call__(self, input_ids, *, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 position_ids=None) -> jax.Array:
        """Inputs as the Hugging Face processor makes them -> logits float32[B, T, V].

        input_ids int[B, T]; attention_mask int[B, T] (1 = token, 0 = padding);
        pixel_values float[N, 1176]; image_grid_thw int[I, 3] in order of appearance.
        """
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if _concrete(input_ids, attention_mask, pixel_values, image_grid_thw):
            self._check_inputs(input_ids, attention_mask, pixel_values, image_grid_thw)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        attention_mask = jnp.asarray(attention_mask)
        embeds = self.model.embed_tokens(input_ids)
        if pixel_values is not None:
            features = self.encode_images(pixel_values, image_grid_thw)
            embeds = merge_image_features(embeds, input_ids, features, cfg.image_token_id)
        if position_ids is None:
            position_ids, _ = self.position_ids(input_ids, attention_mask, image_grid_thw)
        return self.logits(self.hidden_states(embeds, attention_mask, position_ids)).astype(jnp.float32)

    def hidden_states(self, embeds: jax.Array, attention_mask: jax.Array, position_ids: jax.Array) -> jax.Array:
        """Decoder over input embeddings float[B, T, D] (images already merged) -> final hidden float[B, T, D]."""
        cfg = self.config
        cos, sin = mrope_cos_sin(position_ids, head_dim=cfg.text.head_dim, theta=cfg.text.rope_theta,
                                 mrope_section=cfg.text.mrope_section, dtype=cfg.dtype)
        hidden, _ = self.model(embeds, cos, sin, attention_mask.astype(bool))
        return hidden

    def _check_inputs(self, input_ids, attention_mask, pixel_values, image_grid_thw):
        """Host-side validation with errors that name the offending input (explicit fetches,
        so it also works under `jax_transfer_guard=disallow`)."""
        cfg = self.config
        ids = np.asarray(jax.device_get(input_ids))
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be int[B, T], got {ids.dtype}{list(ids.shape)}")
        if attention_mask is not None and np.shape(attention_mask) != ids.shape:
            raise ValueError(f"attention_mask shape {np.shape(attention_mask)} != input_ids shape {ids.shape}")
        if (ids == cfg.video_token_id).any():
            raise ValueError("input_ids contain <|video_pad|> tokens: video inputs are not supported")
        if ids.min() < 0 or ids.max() >= cfg.text.vocab_size:
            raise ValueError(f"input_ids values must lie in [0, {cfg.text.vocab_size}), got [{ids.min()}, {ids.max()}]")
        n_tokens = int((ids == cfg.image_token_id).sum())
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw must be given together")
        if pixel_values is None:
            if n_tokens:
                raise ValueError(f"input_ids contain {n_tokens} image tokens but no pixel_values were given")
            return
        pv, grid = np.shape(pixel_values), np.asarray(jax.device_get(image_grid_thw))
        if len(pv) != 2 or pv[1] != cfg.vision.patch_dim:
            raise ValueError(f"pixel_values must be float[N, {cfg.vision.patch_dim}], got shape {pv}")
        if grid.ndim != 2 or grid.shape[1] != 3:
            raise ValueError(f"image_grid_thw must be int[I, 3], got shape {grid.shape}")
        m = cfg.vision.spatial_merge_size
        if (grid[:, 1:] % m).any() or (grid <= 0).any():
            raise ValueError(f"image_grid_thw rows must be positive with h, w multiples of {m}: {grid.tolist()}")
        patches = int(grid.prod(axis=1).sum())
        if patches > pv[0]:
            raise ValueError(f"image_grid_thw covers {patches} patches but pixel_values has only {pv[0]}")
        if n_tokens * m * m != patches:
            raise ValueError(
                f"image features and image tokens do not match: input_ids have {n_tokens} image tokens, "
                f"image_grid_thw implies {patches // (m * m)}"
            )


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, input_ids, attention_mask, pixel_values, image_grid_thw):
    model = nnx.merge(graphdef, state)
    return model(input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw)


def jit_forward(model: Qwen2_5_VL):
    """The compiled forward: f(input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> logits.

    Parameters are arguments, not constants, so one compilation serves every call of the
    same shapes (and later parameter updates).
    """
    graphdef, state = nnx.split(model)

    def forward(input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
        model._check_inputs(input_ids, attention_mask, pixel_values, image_grid_thw)
        if attention_mask is None:
            attention_mask = jnp.ones(jnp.shape(input_ids), jnp.int32)
        return _apply(graphdef, state, input_ids, attention_mask, pixel_values, image_grid_thw)

    return forward
