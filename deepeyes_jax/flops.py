"""Matmul FLOPs of a traced program with every loop's trip count applied.

XLA's `cost_analysis()` counts a while / scan body once. Here the jaxpr is walked instead: a `scan` multiplies
its body by its length, and a `while` (data-dependent, e.g. decoding until <|im_end|>, or a flash-attention key
loop with per-block bounds) by the count its code declares with `loop_trips(n)` around it, the assumption
written where the loop is. An unannotated while loop is an error rather than a silent undercount. A `cond`
counts its costliest branch. Only dot products count (2 * M * N * K per `dot_general`); elementwise work is
noise at transformer sizes.

The count is logical (global): divide by the devices for a per-chip figure under even sharding.
"""

from __future__ import annotations

import math
import re

import jax
from jax.extend import core as jax_core

_TRIPS = re.compile(r"trips=(\d+(?:\.\d+)?)")


def loop_trips(n: float):
    """Context manager: while loops traced inside run about `n` times (counted so by `program_flops`)."""
    return jax.named_scope(f"trips={n:g}")


def _dot_flops(eqn) -> float:
    (contracting, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)


def _declared_trips(eqn) -> float:
    found = _TRIPS.findall(str(eqn.source_info.name_stack))
    if not found:
        raise ValueError(f"a while loop has no declared trip count (wrap it in flops.loop_trips(n)), under "
                         f"name scope {str(eqn.source_info.name_stack)!r}")
    return float(found[-1])


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jax_core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax_core.Jaxpr):
                yield v


def jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "while":
            body = jaxpr_flops(eqn.params["body_jaxpr"].jaxpr)
            total += _declared_trips(eqn) * body + jaxpr_flops(eqn.params["cond_jaxpr"].jaxpr)
        elif name == "cond":
            total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
        else:
            total += sum(jaxpr_flops(sub) for sub in _subjaxprs(eqn))
    return total


def program_flops(fn, *args) -> float:
    """Logical FLOPs of fn(*args) (abstract args are fine: nothing runs)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
