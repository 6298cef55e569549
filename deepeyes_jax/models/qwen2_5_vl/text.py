"""The Qwen2 decoder of Qwen2.5-VL: GQA with q/k/v bias, M-RoPE, RMSNorm, SwiGLU."""

from __future__ import annotations

import jax
from flax import nnx

from deepeyes_jax.models import splash_attention
from deepeyes_jax.models.flash_attention import cache_attention, causal_attention
from deepeyes_jax.models.layers import Dense, Embed, GatedMLP, LayerStack, RMSNorm, apply_rope, remat_call
from deepeyes_jax.models.qwen2_5_vl.config import TextConfig
from deepeyes_jax.sharding import Sharder

_HIDDEN = ("activation_batch", "activation_length", "activation_embed")


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs, param_dtype, dtype, shard: Sharder, chunk: int = 512,
                 impl: str = "flash"):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.chunk, self.impl = chunk, impl
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.q_proj = Dense(d, cfg.num_attention_heads * hd, logical_axes=("embed", "heads"), use_bias=True, **kw)
        self.k_proj = Dense(d, cfg.num_key_value_heads * hd, logical_axes=("embed", "kv_heads"), use_bias=True, **kw)
        self.v_proj = Dense(d, cfg.num_key_value_heads * hd, logical_axes=("embed", "kv_heads"), use_bias=True, **kw)
        self.o_proj = Dense(cfg.num_attention_heads * hd, d, logical_axes=("heads", "embed"), use_bias=False, **kw)
        self.head_dim = hd
        self.shard = shard

    def __call__(self, x, cos, sin, mask, cache=None, start=None, layer=None):
        """x float[B, T, D], cos/sin float[B, T, hd] -> (float[B, T, D], cache).

        Without a cache (training, teacher forcing), mask is valid bool[B, T]: slot i sees valid slots j <= i,
        through the O(T)-memory causal flash attention (`impl="splash"`: the Pallas kernel). With cache = (k, v)
        float[B, S, KV, hd], the new keys/values are written at slots start int32[B] + [0, T) and mask is the
        filled slots bool[B, S] (this chunk's included): slot start + i sees the filled slots up to its own.
        With `layer` (int32[], inside a scan over layers) the cache is every layer's, float[L, B, S, KV, hd], and
        this layer owns slice `layer`.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, -1, self.head_dim)
        k = self.k_proj(x).reshape(b, t, -1, self.head_dim)
        v = self.v_proj(x).reshape(b, t, -1, self.head_dim)
        q = self.shard(apply_rope(q, cos, sin), ("activation_batch", "activation_length", "activation_heads", None))
        k = self.shard(apply_rope(k, cos, sin), ("activation_batch", "activation_length", "activation_kv_heads", None))
        if cache is None and self.impl == "splash":
            out = splash_attention.causal_attention(q, k, v, mask, block=self.chunk, shard=self.shard)
        elif cache is None:
            out = causal_attention(q, k, v, mask, block=self.chunk)
        else:
            cache = (write_rows(cache[0], k, start, layer), write_rows(cache[1], v, start, layer))
            k, v = cache if layer is None else (jax.lax.dynamic_index_in_dim(c, layer, keepdims=False) for c in cache)
            out = cache_attention(q, k, v, mask, start, block=self.chunk)
        return self.o_proj(out.reshape(b, t, -1)), cache


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs, param_dtype, dtype, shard: Sharder, chunk: int = 512,
                 impl: str = "flash"):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, shard=shard, chunk=chunk, impl=impl, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, use_bias=False,
                            shard=shard, **kw)
        self.shard = shard

    def __call__(self, x, cos, sin, mask, cache=None, start=None, layer=None):
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start, layer)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x), ("activation_batch", "activation_length", "activation_mlp"))
        return self.shard(x, _HIDDEN), cache


class TextModel(nnx.Module):
    """Embeddings, decoder layers and the final norm (the Hub's `model.*` tensors)."""

    def __init__(self, cfg: TextConfig, *, rngs, param_dtype, dtype, shard: Sharder, remat: bool = False,
                 attention_chunk: int = 512, attention_impl: str = "flash", scan: bool = False):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.remat, self.scan = remat, scan
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.layers = nnx.List([DecoderLayer(cfg, shard=shard, chunk=attention_chunk, impl=attention_impl, **kw)
                                for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.shard = shard

    def __call__(self, x, cos, sin, mask, cache=None, start=None):
        """x float[B, T, D] input embeddings -> (final hidden states float[B, T, D], cache).

        mask: valid bool[B, T] without a cache, the filled slots bool[B, S] with one (see `Attention`).
        cache: None, or the KV cache written at slots start int32[B] + [0, T): unrolled, one (k, v)
        float[B, S, KV, hd] per layer; with `scan`, one (k, v) float[L, B, S, KV, hd] carried through the scan.
        With `scan` the layers run as one scan over `layer_stack()` (a decoding model holds it prebuilt).
        """
        x = self.shard(x, _HIDDEN)
        if self.scan:
            stack = self.layers if isinstance(self.layers, LayerStack) else self.layer_stack()
            if cache is None:
                return self.norm(stack(x, cos, sin, mask, remat=self.remat)), None
            x, cache = stack(x, cos, sin, mask, cache=cache, start=start)
            return self.norm(x), cache
        new_cache = []
        for i, layer in enumerate(self.layers):
            args = (x, cos, sin, mask, None if cache is None else cache[i], start)
            x, layer_cache = remat_call(layer, *args) if self.remat else layer(*args)
            new_cache.append(layer_cache)
        return self.norm(x), None if cache is None else tuple(new_cache)

    def layer_stack(self, shard=None) -> LayerStack:
        """The decoder layers' parameters stacked float[L, ...] (laid out by `shard`, a Sharder, if given)."""
        return LayerStack(self.layers, shard)


def write_rows(buffer: jax.Array, new: jax.Array, start: jax.Array, layer=None) -> jax.Array:
    """Write new float[B, T, ...] into buffer float[B, S, ...] at per-row slots start int32[B] + [0, T); with
    `layer` (int32[]) into slice `layer` of buffer float[L, B, S, ...] (one scatter, in place in a loop carry).

    The caller keeps S >= start + T (dynamic_update_slice would otherwise clamp the start).
    """
    if layer is None:
        return jax.vmap(lambda b, n, s: jax.lax.dynamic_update_slice_in_dim(b, n.astype(b.dtype), s, axis=0))(
            buffer, new, start)
    at = lambda s: (layer, s) + (0,) * (buffer.ndim - 3)  # noqa: E731
    return jax.vmap(lambda b, n, s: jax.lax.dynamic_update_slice(b, n[None].astype(b.dtype), at(s)),
                    in_axes=(1, 0, 0), out_axes=1)(buffer, new, start)
