"""Small building blocks shared by the vision tower and the decoder.

Every parameter is an `nnx.Param` carrying its logical axes in `logical_axes` metadata;
`deepeyes_jax.sharding` resolves them. Parameters are stored in `param_dtype` and cast
to the compute `dtype` at use.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _lead(v: jax.Array, ndim: int) -> jax.Array:
    """Explicit leading broadcast (tests run with rank promotion disabled)."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def _param(rngs: nnx.Rngs, init, shape, dtype, logical_axes) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(logical_axes))


class Dense(nnx.Module):
    """y = x @ kernel + bias over the trailing axis; kernel float[*in, *out]."""

    def __init__(self, in_features: int, out_shape: int | Sequence[int], *, logical_axes: Sequence[str | None],
                 use_bias: bool, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
        out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        self.kernel = _param(rngs, nnx.initializers.normal(0.02), (in_features, *out_shape), param_dtype, logical_axes)
        self.bias = (_param(rngs, nnx.initializers.zeros, out_shape, param_dtype, logical_axes[1:])
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        y = jnp.tensordot(x.astype(self.dtype), kernel, axes=1)
        if self.bias is not None:
            y = y + _lead(self.bias[...].astype(self.dtype), y.ndim)
        return y


class Embed(nnx.Module):
    """Token embedding float[V, D]; also serves as the tied output projection."""

    def __init__(self, vocab: int, features: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
        self.weight = _param(rngs, nnx.initializers.normal(0.02), (vocab, features), param_dtype, ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.weight[...].astype(self.dtype))


class RMSNorm(nnx.Module):
    """Qwen2 RMSNorm: statistics in fp32, scale applied in the input dtype."""

    def __init__(self, features: int, *, eps: float, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
        del rngs
        self.weight = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return _lead(self.weight[...].astype(self.dtype), x.ndim) * x32.astype(self.dtype)


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)); `mlp` is the tensor-parallel axis."""

    def __init__(self, features: int, hidden: int, *, act: str, use_bias: bool, rngs: nnx.Rngs,
                 param_dtype=jnp.float32, dtype=jnp.float32, shard=None):
        kw = dict(use_bias=use_bias, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.gate_proj = Dense(features, hidden, logical_axes=("embed", "mlp"), **kw)
        self.up_proj = Dense(features, hidden, logical_axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(hidden, features, logical_axes=("mlp", "embed"), **kw)
        self.act = act
        self.shard = shard

    def __call__(self, x: jax.Array, hidden_axes: Sequence[str | None]) -> jax.Array:
        h = activation(self.act)(self.gate_proj(x)) * self.up_proj(x)
        if self.shard is not None:
            h = self.shard(h, hidden_axes)
        return self.down_proj(h)


def remat_call(module: nnx.Module, *args, **static):
    """module(*args, **static), recomputed in the backward pass instead of keeping its activations.

    Functional (split, then merge inside `jax.checkpoint`) rather than `nnx.remat`, so it also traces inside
    the rollout's while_loops; there, with no backward pass, it costs nothing. `static` (callables, flags)
    is closed over rather than traced.
    """
    graphdef, state = nnx.split(module)
    return jax.checkpoint(lambda s, *a: nnx.merge(graphdef, s)(*a, **static))(state, *args)


class LayerStack(nnx.Module):
    """Modules of one structure as one: their parameters stacked along a new leading layer axis float[L, ...], run
    as ONE `lax.scan`, so the program holds one copy of the layer and compile time stops growing with depth.

    Built inside the traced program from the per-layer modules (checkpoints keep their per-layer Hub names;
    gradients flow back through the stack). `shard` (a Sharder) lays each stacked parameter out as its layer's
    `logical_axes`, the layer axis whole.
    """

    def __init__(self, modules: Sequence[nnx.Module], shard=None):
        graphdefs, states = zip(*(nnx.split(m) for m in modules))
        if any(g != graphdefs[0] for g in graphdefs[1:]):
            raise ValueError("LayerStack needs modules of one structure")

        def stack(*variables):
            value, meta = jnp.stack([v.get_value() for v in variables]), variables[0].get_metadata()
            if "logical_axes" not in meta:
                return variables[0].replace(value)
            axes = (None, *meta["logical_axes"])
            return variables[0].replace(value if shard is None else shard(value, axes), logical_axes=axes)

        self.graphdef = graphdefs[0]
        self.depth = len(modules)
        self.params = nnx.data(jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)))

    def __call__(self, x: jax.Array, *args, remat: bool = False, cache=None, **static):
        """x through layers 0, ..., L-1, each mapping (x, *args, **static) -> x or a tuple led by x; `remat`
        recomputes each layer in the backward pass. `static` (callables, flags, closed-over arrays) is not scanned.

        With `cache` (a pytree of per-layer buffers stacked as [L, ...]), layer i is called with cache=cache,
        layer=i and returns (x, cache): the buffers are carried through the scan and updated in place, never
        copied per layer. -> x, or (x, cache).
        """
        if cache is None:
            def layer(x, state):
                out = nnx.merge(self.graphdef, state)(x, *args, **static)
                return out[0] if isinstance(out, tuple) else out, None

            return jax.lax.scan(jax.checkpoint(layer) if remat else layer, x, self.params)[0]

        def cached_layer(carry, xs):
            (x, cache), (state, i) = carry, xs
            return nnx.merge(self.graphdef, state)(x, *args, cache=cache, layer=i, **static), None

        return jax.lax.scan(cached_layer, (x, cache), (self.params, jnp.arange(self.depth)))[0]


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x float[..., L, H, D] with cos/sin float[..., L, D] (broadcast over heads)."""
    cos, sin = cos[..., None, :], sin[..., None, :]
    return x * cos + rotate_half(x) * sin


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention with grouped KV heads.

    q float[..., Lq, H, D], k/v float[..., Lk, KV, D], mask bool[..., Lq, Lk] -> float[..., Lq, H, D].
    Fully masked rows (padding) give finite garbage rather than NaN.
    """
    *batch, lq, h, d = q.shape
    kv = k.shape[-2]
    q = q.reshape(*batch, lq, kv, h // kv, d)
    scores = jnp.einsum("...qkgd,...tkd->...kgqt", q, k).astype(jnp.float32) * (d**-0.5)
    mask = mask[..., None, None, :, :]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("...kgqt,...tkd->...qkgd", probs, v)
    return out.reshape(*batch, lq, h, d)
