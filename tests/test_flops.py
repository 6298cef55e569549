"""Loop-aware FLOP counting (`deepeyes_jax.flops`) against XLA's cost analysis and hand counts."""

import jax
import jax.numpy as jnp
import pytest

from deepeyes_jax.flops import loop_trips, program_flops

X = jax.ShapeDtypeStruct((8, 32), jnp.float32)
W = jax.ShapeDtypeStruct((32, 32), jnp.float32)
MATMUL = 2 * 8 * 32 * 32


def test_loop_free_program_matches_xla_cost_analysis():
    f = lambda x, w: jnp.tanh(x @ w) @ w.T  # noqa: E731
    xla = jax.jit(f).lower(X, W).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    assert program_flops(f, X, W) == 2 * MATMUL
    assert abs(xla["flops"] - 2 * MATMUL) / (2 * MATMUL) < 0.05  # XLA adds the elementwise ops


def test_scan_body_is_multiplied_by_its_length_where_xla_counts_it_once():
    def f(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=7)[0]

    xla = jax.jit(f).lower(X, W).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    assert program_flops(f, X, W) == 7 * MATMUL
    assert xla["flops"] < 2 * MATMUL


def test_while_loops_count_their_declared_trips_and_gradients_count_the_backward():
    def f(x, w):
        with loop_trips(5):
            return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ w), (0, x))[1]

    assert program_flops(f, X, W) == 5 * MATMUL
    loss = lambda x, w: jnp.sum(jnp.tanh(x @ w))  # noqa: E731
    assert program_flops(jax.grad(loss, argnums=(0, 1)), X, W) == 3 * MATMUL  # forward, dx, dw


def test_an_undeclared_while_loop_is_an_error_not_an_undercount():
    def f(x, w):
        return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ w), (0, x))[1]

    with pytest.raises(ValueError, match="no declared trip count"):
        program_flops(f, X, W)


@pytest.mark.parametrize("mesh", [False, True])
def test_splash_kernel_counts_its_visited_grid_like_the_flash_loops(mesh):
    """The splash kernel's forward (a pallas_call, in shard_map on the mesh) counts its block dots over the share
    of the grid its causal mask visits: the same matmuls as the flash path's declared key-block visits."""
    from deepeyes_jax.models import flash_attention, splash_attention
    from deepeyes_jax.sharding import Sharder, make_mesh

    q = jax.ShapeDtypeStruct((4, 512, 4, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((4, 512, 2, 16), jnp.float32)
    valid = jnp.ones((4, 512), bool)
    shard = Sharder(make_mesh((2, 2, 2)) if mesh else None)
    splash = program_flops(lambda *a: splash_attention.causal_attention(*a, valid, block=128, shard=shard), q, kv, kv)
    flash = program_flops(lambda *a: flash_attention.causal_attention(*a, valid, block=128), q, kv, kv)
    assert splash == flash == 2 * (2 * 4 * 4 * 512 * 512 * 16) * (4 + 1) / (2 * 4)
