"""Shared timing for the benchmark scripts."""

import time

import jax
import numpy as np


def median_seconds(fn, repeats: int):
    """(median wall seconds of fn(i) for i < repeats, the last result); JAX results are waited for."""
    times, out = [], None
    for i in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn(i))
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out
