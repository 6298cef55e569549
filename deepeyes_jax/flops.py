"""Matmul FLOPs of a traced program with every loop's trip count applied.

XLA's `cost_analysis()` counts a while / scan body once. Here the jaxpr is walked instead: a `scan` multiplies
its body by its length, and a `while` (data-dependent, e.g. decoding until <|im_end|>, or a flash-attention key
loop with per-block bounds) by the count its code declares with `loop_trips(n)` around it, the assumption
written where the loop is. An unannotated while loop is an error rather than a silent undercount. A `cond`
counts its costliest branch. A Pallas kernel (`pallas_call`) counts its body once per grid step, times the share
of its grid it really visits where its code declares one with `grid_share(f)` (the splash kernel skips the
blocks its mask excludes); a `shard_map` body counts once per device. Only dot products count
(2 * M * N * K per `dot_general`); elementwise work is noise at transformer sizes.

The count is logical (global): divide by the devices for a per-chip figure under even sharding.
"""

from __future__ import annotations

import math
import re

import jax
from jax.extend import core as jax_core

_TRIPS = re.compile(r"trips=(\d+(?:\.\d+)?)")
_SHARE = re.compile(r"grid_share=(\d+(?:\.\d+)?)")


def loop_trips(n: float):
    """Context manager: while loops traced inside run about `n` times (counted so by `program_flops`)."""
    return jax.named_scope(f"trips={n:g}")


def grid_share(f: float):
    """Context manager: Pallas kernels traced inside visit about this share of their grid."""
    return jax.named_scope(f"grid_share={f:g}")


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


def jaxpr_flops(jaxpr, share: float = 1.0) -> float:
    """share: the grid share declared around this jaxpr (a shard_map body starts a fresh name stack, so the
    declaration is carried down rather than read from the kernel's own equation)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        declared = _SHARE.findall(str(eqn.source_info.name_stack))
        inner = float(declared[-1]) if declared else share
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr, inner)
        elif name == "while":
            body = jaxpr_flops(eqn.params["body_jaxpr"].jaxpr, inner)
            total += _declared_trips(eqn) * body + jaxpr_flops(eqn.params["cond_jaxpr"].jaxpr, inner)
        elif name == "cond":
            total += max(jaxpr_flops(b.jaxpr, inner) for b in eqn.params["branches"])
        elif name == "pallas_call":
            total += inner * math.prod(eqn.params["grid_mapping"].grid) * jaxpr_flops(eqn.params["jaxpr"])
        elif name == "shard_map":
            devices = math.prod(eqn.params["mesh"].shape[a] for a in eqn.params["newly_manual_axes"])
            total += devices * jaxpr_flops(eqn.params["jaxpr"], inner)
        else:
            total += sum(jaxpr_flops(sub, inner) for sub in _subjaxprs(eqn))
    return total


def program_flops(fn, *args) -> float:
    """Logical FLOPs of fn(*args) (abstract args are fine: nothing runs)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
