"""Qwen2-VL's smart_resize on device, equal to the host float64 version for every input.

The host computes e.g. floor(h / sqrt(h * w / max_pixels) / 28) in float64; when the exact value
is an integer, float64 rounding decides between two results (e.g. a 38x38 crop becomes 84x84,
not 56x56). Without float64 on device, every step is redone with correctly rounded integer
arithmetic. An unsigned integer < 2^128 is uint32[8] of 16-bit limbs, little-endian; a positive
double is (m, e) meaning m * 2^e with m a 53-bit limb integer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from deepeyes_jax.data.image_processing import FACTOR as F

_NL = 8
_IDX = np.arange(_NL)
_TOEPLITZ = _IDX[None, :] - _IDX[:, None]  # [i, k] -> k - i
_ONE = np.eye(1, _NL, dtype=np.uint32)[0]


def _limbs(x):
    """int32 scalar in [0, 2^31) -> limbs."""
    x = jnp.asarray(x, jnp.int32).astype(jnp.uint32)
    return jnp.stack([x & 0xFFFF, x >> 16] + [jnp.zeros_like(x)] * (_NL - 2))


def _carry(cols):
    """uint32[8] column sums (< 2^31 each) -> limbs (anything past 128 bits is dropped)."""
    out, c = [], 0
    for i in range(_NL):
        s = cols[i] + c
        out.append(s & 0xFFFF)
        c = s >> 16
    return jnp.stack(out)


def _mul(a, b):
    """Exact product (callers keep it below 2^128)."""
    bt = jnp.where(_TOEPLITZ >= 0, b[np.clip(_TOEPLITZ, 0, _NL - 1)], 0)  # bt[i, k] = b[k - i]
    p = a[:, None] * bt  # 16 x 16 bits: fits uint32
    lo = jnp.sum(p & 0xFFFF, axis=0, dtype=jnp.uint32)
    hi = jnp.sum(p >> 16, axis=0, dtype=jnp.uint32)
    return _carry(lo + jnp.concatenate([jnp.zeros(1, jnp.uint32), hi[:-1]]))


def _cmp(a, b):
    """-1, 0 or 1 as a <, ==, > b."""
    top = jnp.max(jnp.where(a != b, _IDX, -1))
    k = jnp.maximum(top, 0)
    return jnp.where(top < 0, 0, jnp.where(a[k] > b[k], 1, -1))


def _bitlen(a):
    bits = 32 - jax.lax.clz(a).astype(jnp.int32)
    return jnp.max(jnp.where(a != 0, 16 * _IDX + bits, 0))


def _shl(a, s):
    """a << s for traced 0 <= s < 128."""
    q, r = s // 16, (s % 16).astype(jnp.uint32)
    pad = jnp.concatenate([jnp.zeros(_NL + 1, jnp.uint32), a])  # pad[i + _NL + 1] = a[i]
    hi, lo = pad[_IDX - q + _NL + 1], pad[_IDX - q + _NL]  # a[i - q], a[i - q - 1]
    return ((hi << r) & 0xFFFF) | (lo >> (16 - r))


def _shr(a, s):
    """a >> s for traced 0 <= s < 128."""
    q, r = s // 16, (s % 16).astype(jnp.uint32)
    pad = jnp.concatenate([a, jnp.zeros(_NL + 1, jnp.uint32)])
    lo, hi = pad[_IDX + q], pad[_IDX + q + 1]
    return (lo >> r) | ((hi << (16 - r)) & 0xFFFF)


def _low_bits(a, s):
    """a mod 2^s."""
    keep = jnp.clip(s - 16 * _IDX, 0, 16).astype(jnp.uint32)
    return a & ((jnp.uint32(1) << keep) - 1)


def _round53(n, e):
    """The double nearest to n * 2^e (ties to even), as (m, e)."""
    s = _bitlen(n) - 53
    sp = jnp.maximum(s, 1)
    q = _shr(n, sp)
    c = _cmp(_low_bits(n, sp), _shl(_ONE, sp - 1))
    up = (c > 0) | ((c == 0) & ((q[0] & 1) == 1))
    q = _carry(q.at[0].add(up.astype(jnp.uint32)))
    ovf = _bitlen(q) > 53  # rounded up to 2^53
    q = jnp.where(ovf, _shr(q, jnp.int32(1)), q)
    left = _shl(n, jnp.clip(-s, 0, 127))  # s <= 0: exact
    return jnp.where(s > 0, q, left), e + jnp.where(s > 0, sp + ovf.astype(jnp.int32), s)


def _f64(x):
    return _round53(_limbs(x), jnp.int32(0))


def _largest(pred, nbits):
    """Largest c < 2^nbits with pred(c), for pred true up to some c and false above it."""
    def body(k, c):
        cand = c | _shl(_ONE, nbits - 1 - k)
        return jnp.where(pred(cand), cand, c)
    return jax.lax.fori_loop(0, nbits, body, jnp.zeros(_NL, jnp.uint32))


def _fmul(a, b):
    return _round53(_mul(a[0], b[0]), a[1] + b[1])


def _fdiv(a, b):
    # 55 extra quotient bits plus a sticky bit round exactly like a correctly rounded division.
    n = _shl(a[0], jnp.int32(55))
    q = _largest(lambda c: _cmp(_mul(c, b[0]), n) <= 0, 56)
    sticky = (_cmp(_mul(q, b[0]), n) != 0).astype(jnp.uint32)
    return _round53(q.at[0].set(q[0] | sticky), a[1] - b[1] - 55)


def _fsqrt(a):
    odd = (a[1] & 1) == 1
    m = jnp.where(odd, _shl(a[0], jnp.int32(1)), a[0])
    n = _shl(m, jnp.int32(56))
    r = _largest(lambda c: _cmp(_mul(c, c), n) <= 0, 55)
    sticky = (_cmp(_mul(r, r), n) != 0).astype(jnp.uint32)
    return _round53(r.at[0].set(r[0] | sticky), (a[1] - odd.astype(jnp.int32) - 56) // 2)


def _to_i32(a):
    return (a[0] | (a[1] << 16)).astype(jnp.int32)


def _ffloor(a):
    m, e = a
    return _to_i32(jnp.where(e >= 0, _shl(m, jnp.clip(e, 0, 127)), _shr(m, jnp.clip(-e, 0, 127))))


def _fceil(a):
    m, e = a
    s = jnp.clip(-e, 0, 127)
    exact = (e >= 0) | (_cmp(_shl(_shr(m, s), s), m) == 0)
    return _ffloor(a) + (~exact).astype(jnp.int32)


def smart_resize(height, width, *, factor=F, min_pixels, max_pixels):
    """Traced int32 scalars (h, w) -> int32 (h', w'), equal to `image_processing.smart_resize`.

    Inputs: h, w >= 1 with h * w < 2^31 and aspect <= 200 (where the host version does not
    raise); min_pixels, max_pixels Python ints or traced int32; `factor` a static int. Like the
    host version, the result can exceed max_pixels when a side is clamped to `factor`. About 600
    sequential small-integer loop steps; negligible next to the resize.
    """
    h, w = jnp.asarray(height, jnp.int32), jnp.asarray(width, jnp.int32)
    lo, hi = jnp.asarray(min_pixels, jnp.int32), jnp.asarray(max_pixels, jnp.int32)

    def round_to_factor(x):  # round(x / factor) * factor, Python's half-to-even, in integers
        q, r = x // factor, x % factor
        return (q + ((2 * r > factor) | ((2 * r == factor) & (q % 2 == 1)))) * factor

    h_bar, w_bar = round_to_factor(h), round_to_factor(w)
    fh, fw, ff, fhw = _f64(h), _f64(w), _f64(factor), _f64(h * w)
    beta = _fsqrt(_fdiv(fhw, _f64(hi)))  # math.sqrt((h * w) / max_pixels)
    h_dn = jnp.maximum(factor, _ffloor(_fdiv(_fdiv(fh, beta), ff)) * factor)
    w_dn = jnp.maximum(factor, _ffloor(_fdiv(_fdiv(fw, beta), ff)) * factor)
    beta = _fsqrt(_fdiv(_f64(lo), fhw))  # math.sqrt(min_pixels / (h * w))
    h_up = _fceil(_fdiv(_fmul(fh, beta), ff)) * factor
    w_up = _fceil(_fdiv(_fmul(fw, beta), ff)) * factor
    down, up = h_bar * w_bar > hi, h_bar * w_bar < lo
    return (jnp.where(down, h_dn, jnp.where(up, h_up, h_bar)),
            jnp.where(down, w_dn, jnp.where(up, w_up, w_bar)))
