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
