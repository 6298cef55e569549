"""DeepEyes' outcome reward (spec 3), computed on device from the response token ids.

DeepEyes scores `solution_str = tokenizer.decode(response_ids[:valid_len])` (the whole multi-turn
response: assistant turns, observation wrappers with the literal USER_PROMPT_V2, expanded image-pad
blocks; spec 2.4 / 3.1) with `vl_agent.compute_score` (tool data: vstar, vl_agent, chart) or
`vl_agent.compute_score_math` (thinklite_eureka, xince). `reward_from_tokens` reproduces both on the
decoded BYTES of the response, with static shapes and no host callback (jit it, vmap it over rows):

Tool data (spec 3.2), all counts over the whole response string:
  fmt_err  = count("<think>") != count("</think>")
           | count("<|vision_start|><|image_pad|>") != count("<|image_pad|><|vision_end|>")
           | tail.count("<answer>") != tail.count("</answer>"),  tail = s.split("</think>")[-1]
  answer   = s.split("<answer>")[-1].split("</answer>")[0].strip()
  acc      = MATCH(answer, ground_truth); if len(answer) >= 1000 chars: acc = 0, fmt_err = True
  tool     = num_zooms > 0 and acc > 0.5
  reward   = 0.8 acc - 0.2 fmt_err + 1.2 tool
Math data (spec 3.4):
  fmt_err  = count("<think>") != count("</think>"); boxed = re.findall(r'\\boxed{([^}]+)}', tail)
  no match: acc = 0, fmt_err = True; more than one: fmt_err = True
  pred     = the last match (see `RewardConfig.boxed_balanced`); acc = MATCH(pred, ground_truth)
  reward   = 1.2 acc - 0.4 fmt_err                (no tool term, no 1000-char guard)

MATCH replaces DeepEyes' LLM judge / math_verify with a rule-based matcher (`judge.py` has the
judge for those who serve one). Both strings are first `.strip()`ped (Python's whitespace set).
  * Too long: an answer of more than `max_answer_bytes` UTF-8 bytes (after stripping) is wrong.
  * Option letter: a string "has letter X" if it is "(X)..." or "X" alone or "X." / "X)" / "X:"
    followed by anything, X an ASCII letter (case-insensitive). Its "option text" is what follows
    that prefix (else the whole string). "A man" has no letter (a letter needs . ) : or the end).
  1. both have a letter      -> correct iff the letters are equal (case-insensitive);
  2. else both option texts are numbers -> correct iff |a - g| <= abs_tol + rel_tol * max(|a|, |g|).
     Number: remove ASCII whitespace and ',' anywhere, then one trailing '%' and one leading '$';
     what is left must be [+-]? then digits with at most one '.', 1..18 digits ("5.", ".5" ok;
     no exponent). Parsed in float32 on device (float64 in the host reference).
  3. else correct iff NORM(option text a) == NORM(option text g) != "" or NORM(a) == NORM(g) != "".
     NORM: ASCII letters lowercased; every ASCII byte that is not [a-z0-9] is a separator; runs of
     separators become one space, leading/trailing separators are dropped; non-ASCII characters
     are kept verbatim (no Unicode case folding or normalisation).
     E.g. "The sky." == "the  SKY", "3.5 m" != "35 m", "B. red" ~ "red", "(C)" ~ "C. Tree".

`num_zooms` is the number of successful zoom observations, which equals DeepEyes' count of
"<|vision_start|><|image_pad|>" in the response (error observations carry no image).

Byte-level notes: the byte stream is what `decode(ids, skip_special_tokens=False)` gives (see
`rollout.tools.token_bytes`), built up to `max_response_bytes` (tags past it are not seen). The
1000-character guard counts UTF-8 lead bytes (exact for valid UTF-8; DeepEyes' decode would map
an invalid byte sequence to U+FFFD characters).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from deepeyes_jax.rollout.tools import TokenBytes, _occurs, _py_space, _table_for, _turn_bytes

SOURCE_TOOL, SOURCE_MATH = 0, 1
IMAGE_OPEN = "<|vision_start|><|image_pad|>"
IMAGE_CLOSE = "<|image_pad|><|vision_end|>"
_BOXED = b"\\boxed{"
_MAX_DIGITS = 18


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Static (hashable) reward settings; a change recompiles.

    acc/format/tool weights: DeepEyes' "reward 2" (0.8, 0.2, 1.2); math: 1.2 and 0.4.
    max_answer_chars: the anti judge-hacking guard (answer of >= this many characters: acc 0,
      format error); tool data only.
    max_answer_bytes: static window the answer is matched in; a longer (stripped) answer is wrong.
    abs_tol / rel_tol: numeric equality.
    max_response_bytes: bytes of the decoded response that are searched; None = all (tokens x
      longest token).
    boxed_balanced: the math prediction is the last `\\boxed{` match of DeepEyes' regex (which
      decides how many matches there are), extended to its balanced closing brace
      (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`); False keeps DeepEyes' regex content (`\\frac{1`).
      An unbalanced box falls back to the regex content.
    """

    acc_weight: float = 0.8
    format_weight: float = 0.2
    tool_weight: float = 1.2
    math_acc_weight: float = 1.2
    math_format_weight: float = 0.4
    tool_sources: tuple[str, ...] = ("vstar", "vl_agent", "chart")
    math_sources: tuple[str, ...] = ("thinklite_eureka", "xince")
    max_answer_chars: int = 1000
    max_answer_bytes: int = 256
    abs_tol: float = 1e-6
    rel_tol: float = 1e-4
    max_response_bytes: int | None = None
    boxed_balanced: bool = True

    def __post_init__(self):
        if self.max_answer_bytes < 8:
            raise ValueError(f"max_answer_bytes must be >= 8, got {self.max_answer_bytes}")
        if set(self.tool_sources) & set(self.math_sources):
            raise ValueError("a data_source cannot be both a tool and a math source")
        if self.max_response_bytes is not None and self.max_response_bytes < 1:
            raise ValueError("max_response_bytes must be positive")

    def source_kind(self, data_source: str) -> int:
        if data_source in self.tool_sources:
            return SOURCE_TOOL
        if data_source in self.math_sources:
            return SOURCE_MATH
        raise ValueError(f"unknown data_source {data_source!r}: expected one of "
                         f"{self.tool_sources + self.math_sources}")


# ----------------------------------------------------------------------------- byte helpers

def _count(stream, tag: bytes, start=0):
    idx = jnp.arange(stream.shape[0], dtype=jnp.int32)
    return jnp.sum(_occurs(stream, tag) & (idx >= start)).astype(jnp.int32)


def _last(stream, tag: bytes):
    """Start of the last occurrence of `tag`, or -1."""
    idx = jnp.arange(stream.shape[0], dtype=jnp.int32)
    return jnp.max(jnp.where(_occurs(stream, tag), idx, -1))


def _strip(space, start, end):
    """(first, length) of [start, end) without leading/trailing Python whitespace."""
    idx = jnp.arange(space.shape[0], dtype=jnp.int32)
    kept = (idx >= start) & (idx < end) & ~space
    first = jnp.min(jnp.where(kept, idx, space.shape[0]))
    last = jnp.max(jnp.where(kept, idx, -1))
    length = jnp.maximum(last - first + 1, 0)
    return jnp.where(length > 0, first, 0), length


def _window(stream, first, length, width: int):
    """stream[first:first+length] in a zero-padded int32[width] (length > width is cut)."""
    w = jax.lax.dynamic_slice_in_dim(jnp.concatenate([stream, jnp.zeros(width, stream.dtype)]), first, width)
    return jnp.where(jnp.arange(width) < length, w, 0)


def _compact(values, keep):
    """values[keep] moved to the front of a zero-padded array of the same size, and their count."""
    w = values.shape[0]
    pos = jnp.cumsum(keep) - 1
    out = jnp.zeros(w, values.dtype).at[jnp.where(keep, pos, w)].set(values, mode="drop")
    return out, jnp.sum(keep).astype(jnp.int32)


def _is_letter(c):
    low = c | 32
    return (low >= 97) & (low <= 122)


# ----------------------------------------------------------------------------- the matcher

def _letter(a, n):
    """(has a letter, the letter lowercased, start of the option text)."""
    c0, c1, c2 = a[0], a[1], a[2]
    paren = (n >= 3) & (c0 == ord("(")) & _is_letter(c1) & (c2 == ord(")"))
    plain = ~paren & (n >= 1) & _is_letter(c0) & ((n == 1) | (c1 == ord(".")) | (c1 == ord(")")) | (c1 == ord(":")))
    letter = jnp.where(paren, c1 | 32, c0 | 32)
    rest = jnp.where(paren, 3, jnp.where(plain, jnp.minimum(2, n), 0))
    return paren | plain, letter, rest


def _number(r, m):
    """(parses as a number, float32 value) of r[:m] per the module docstring."""
    w = r.shape[0]
    idx = jnp.arange(w, dtype=jnp.int32)
    valid = idx < m
    ws = (r == 32) | ((r >= 9) & (r <= 13))
    c, k = _compact(r, valid & ~ws & (r != ord(",")))
    k = k - ((k >= 1) & (c[jnp.maximum(k - 1, 0)] == ord("%")))
    s0 = ((k >= 1) & (c[0] == ord("$"))).astype(jnp.int32)
    head = c[jnp.minimum(s0, w - 1)]
    sign = (k > s0) & ((head == ord("+")) | (head == ord("-")))
    neg = sign & (head == ord("-"))
    s1 = s0 + sign
    body = (idx >= s1) & (idx < k)
    dig = (c >= 48) & (c <= 57)
    dot = c == ord(".")
    ndig = jnp.sum(body & dig)
    ok = (jnp.all(~body | dig | dot) & (jnp.sum(body & dot) <= 1) & (ndig >= 1) & (ndig <= _MAX_DIGITS))
    d = jnp.min(jnp.where(body & dot, idx, k))
    power = jnp.where(idx < d, d - 1 - idx, d - idx).astype(jnp.float32)
    terms = jnp.where(body & dig, (c - 48).astype(jnp.float32) * jnp.power(jnp.float32(10.0), power), 0.0)
    value = jnp.sum(terms)
    return ok, jnp.where(neg, -value, value)


def _normalise(a, n):
    """NORM(a[:n]) (module docstring) as (int32 bytes zero-padded, length)."""
    idx = jnp.arange(a.shape[0], dtype=jnp.int32)
    valid = idx < n
    lower = jnp.where((a >= 65) & (a <= 90), a + 32, a)
    alnum = ((lower >= 97) & (lower <= 122)) | ((lower >= 48) & (lower <= 57))
    kept = valid & (alnum | (a >= 128))
    sep = valid & ~kept
    prev_kept = jnp.concatenate([jnp.zeros(1, bool), kept[:-1]])
    later_kept = (jnp.sum(kept) - jnp.cumsum(kept)) > 0
    emit = kept | (sep & prev_kept & later_kept)
    return _compact(jnp.where(kept, lower, 32), emit)


def _equal(x, nx, y, ny):
    w = max(x.shape[0], y.shape[0])
    x = jnp.concatenate([x, jnp.zeros(w - x.shape[0], x.dtype)])
    y = jnp.concatenate([y, jnp.zeros(w - y.shape[0], y.dtype)])
    return (nx == ny) & (nx > 0) & jnp.all(x == y)  # both zero-padded past their length


def match(a, na, g, ng, config: RewardConfig):
    """The rule-based judge: stripped answer a[:na] (int32[W]) vs stripped ground truth g[:ng].

    The two strings go through the same (vmapped) letter / number / NORM code, which keeps the
    compiled program small.
    """
    w = max(a.shape[0], g.shape[0])
    x = jnp.stack([jnp.pad(a, (0, w - a.shape[0])), jnp.pad(g, (0, w - g.shape[0]))])
    nx = jnp.stack([na, ng]).astype(jnp.int32)
    has, letter, rest = jax.vmap(_letter)(x, nx)
    nopt = nx - rest
    opt = jax.vmap(lambda s, r, n: _window(s, r, n, w))(x, rest, nopt)
    num, val = jax.vmap(_number)(opt, nopt)
    norm, nnorm = jax.vmap(_normalise)(jnp.concatenate([opt, x]), jnp.concatenate([nopt, nx]))
    close = (jnp.abs(val[0] - val[1])
             <= config.abs_tol + config.rel_tol * jnp.maximum(jnp.abs(val[0]), jnp.abs(val[1])))
    text = _equal(norm[0], nnorm[0], norm[1], nnorm[1]) | _equal(norm[2], nnorm[2], norm[3], nnorm[3])
    return jnp.where(has[0] & has[1], letter[0] == letter[1], jnp.where(num[0] & num[1], close, text))


def _boxed_span(stream, tail_start, balanced: bool):
    """(number of regex matches in the tail, content start, content end) of the last match."""
    p_len = stream.shape[0]
    idx = jnp.arange(p_len, dtype=jnp.int32)
    big = jnp.int32(p_len + 16)
    closes = stream == ord("}")
    occ = _occurs(stream, _BOXED) & (idx >= tail_start)
    next_close = jax.lax.cummin(jnp.where(closes, idx, big), reverse=True)
    after = idx + len(_BOXED)
    nc = jnp.where(after < p_len, next_close[jnp.minimum(after, p_len - 1)], big)
    valid = occ & (nc > after) & (nc < big)  # `[^}]+` needs one character and a closing brace
    # A valid occurrence is a match unless an earlier match's content covers it, i.e. unless an
    # earlier valid occurrence lies in the same '}'-delimited segment.
    seg = jnp.cumsum(closes)
    prev = jnp.concatenate([jnp.full(1, -1, jnp.int32), jax.lax.cummax(jnp.where(valid, idx, -1))[:-1]])
    first = valid & ((prev < 0) | (seg[jnp.maximum(prev, 0)] != seg))
    count = jnp.sum(first).astype(jnp.int32)
    p = jnp.max(jnp.where(first, idx, -1))
    start = p + len(_BOXED)
    end = nc[jnp.maximum(p, 0)]
    if balanced:
        depth = jnp.cumsum((stream == ord("{")).astype(jnp.int32) - closes.astype(jnp.int32))
        d0 = depth[jnp.clip(start - 1, 0, p_len - 1)]
        bal = jnp.min(jnp.where((idx >= start) & (depth < d0), idx, big))
        end = jnp.where(bal < big, bal, end)
    return count, start, end


# ----------------------------------------------------------------------------- the reward

def reward_from_tokens(response_ids, response_mask, ground_truth, ground_truth_len, source_kind, num_zooms,
                       table: TokenBytes, config: RewardConfig = RewardConfig()) -> dict:
    """DeepEyes' reward of one response (module docstring), on device.

    response_ids int32[T], response_mask bool[T] (the valid response tokens, observations
    included, in order; need not be a prefix), ground_truth uint8[G] (UTF-8, first
    ground_truth_len bytes valid), source_kind int32 (SOURCE_TOOL / SOURCE_MATH), num_zooms int32
    (successful zoom observations), table from `rollout.tools.token_bytes`. `config` is static.
    Returns float32 scalars: reward, acc, format_error (0/1), tool (0/1).
    """
    t = response_ids.shape[0]
    mask = jnp.asarray(response_mask, bool)
    order = jnp.argsort(~mask, stable=True)
    ids = jnp.asarray(response_ids, jnp.int32)[order]
    cap = t * table.data.shape[1] if config.max_response_bytes is None else config.max_response_bytes
    stream, n = _turn_bytes(ids, jnp.sum(mask), table, cap)
    idx = jnp.arange(cap, dtype=jnp.int32)
    space = _py_space(stream)

    # Shared: think balance and the tail after the last "</think>".
    think_err = _count(stream, b"<think>") != _count(stream, b"</think>")
    last_think = _last(stream, b"</think>")
    tail = jnp.where(last_think >= 0, last_think + len(b"</think>"), 0)

    # Ground truth, stripped.
    width = config.max_answer_bytes
    gt = jnp.asarray(ground_truth).astype(jnp.int32)
    if gt.shape[0] < 8:  # the letter rule reads 3 bytes
        gt = jnp.concatenate([gt, jnp.zeros(8 - gt.shape[0], jnp.int32)])
    g_len = gt.shape[0]
    gt = jnp.where(jnp.arange(g_len) < ground_truth_len, gt, 0)
    g_first, g_n = _strip(_py_space(gt), 0, jnp.minimum(ground_truth_len, g_len))
    g = _window(gt, g_first, g_n, g_len)

    # Tool data (3.2).
    img_err = _count(stream, IMAGE_OPEN.encode()) != _count(stream, IMAGE_CLOSE.encode())
    tag_err = _count(stream, b"<answer>", tail) != _count(stream, b"</answer>", tail)
    last_open = _last(stream, b"<answer>")
    a_start = jnp.where(last_open >= 0, last_open + len(b"<answer>"), 0)
    close_at = _occurs(stream, b"</answer>") & (idx >= a_start)
    a_end = jnp.minimum(jnp.min(jnp.where(close_at, idx, cap)), n)
    a_first, a_n = _strip(space, a_start, a_end)
    lead = (stream & 0xC0) != 0x80
    chars = jnp.sum((idx >= a_first) & (idx < a_first + a_n) & lead)
    too_many = chars >= config.max_answer_chars

    # Math data (3.4).
    n_boxed, b_start, b_end = _boxed_span(stream, tail, config.boxed_balanced)
    b_first, b_n = _strip(space, b_start, b_end)

    # One matcher, vmapped over the two candidate answers.
    preds = jnp.stack([_window(stream, a_first, a_n, width), _window(stream, b_first, b_n, width)])
    hits = jax.vmap(lambda p, n: match(p, n, g, g_n, config))(preds, jnp.stack([a_n, b_n]))
    tool_acc = hits[0] & (a_n <= width) & ~too_many
    tool_fmt = think_err | img_err | tag_err | too_many
    tool_bonus = (num_zooms > 0) & tool_acc
    tool_reward = (config.acc_weight * tool_acc - config.format_weight * tool_fmt
                   + config.tool_weight * tool_bonus)
    math_acc = hits[1] & (n_boxed > 0) & (b_n <= width)
    math_fmt = think_err | (n_boxed != 1)
    math_reward = config.math_acc_weight * math_acc - config.math_format_weight * math_fmt

    is_math = source_kind == SOURCE_MATH
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return dict(reward=f32(jnp.where(is_math, math_reward, tool_reward)),
                acc=f32(jnp.where(is_math, math_acc, tool_acc)),
                format_error=f32(jnp.where(is_math, math_fmt, tool_fmt)),
                tool=f32(~is_math & tool_bonus))


def batched_reward_fn(config: RewardConfig = RewardConfig()):
    """jit(vmap(reward_from_tokens)) over rows: (ids [B,T], mask [B,T], gt [B,G], gt_len [B],
    source_kind [B], num_zooms [B], table) -> dict of float32[B]."""
    fn = functools.partial(reward_from_tokens, config=config)
    return jax.jit(jax.vmap(fn, in_axes=(0, 0, 0, 0, 0, 0, None)))


# ----------------------------------------------------------------------------- host API

_reward_jit = jax.jit(reward_from_tokens, static_argnames=("config",))


def _bucket(size: int) -> int:
    return max(256, 1 << max(size - 1, 0).bit_length())


def score(response_text: str, ground_truth: str, *, data_source: str, tokenizer, num_zooms: int | None = None,
          config: RewardConfig | None = None) -> dict:
    """Host wrapper: tokenize `response_text` and run the compiled `reward_from_tokens` on it.

    The scored string is `tokenizer.decode(tokenizer.encode(response_text))` (the text itself for
    NFC text). num_zooms None: counted as DeepEyes does, occurrences of
    "<|vision_start|><|image_pad|>" in the text. Unknown data_source: ValueError. Returns
    dict(reward float, acc float, format_error bool, tool bool). Shapes are padded to powers of
    two, and the byte table is cached per tokenizer, so repeated calls reuse a few compilations.
    """
    config = RewardConfig() if config is None else config
    kind = config.source_kind(data_source)
    if num_zooms is None:
        num_zooms = response_text.count(IMAGE_OPEN)
    ids = tokenizer.encode(response_text, add_special_tokens=False)
    size = _bucket(len(ids))
    padded = np.zeros(size, np.int32)
    padded[:len(ids)] = ids
    gt = ground_truth.encode("utf-8")
    gt_buf = np.zeros(_bucket(max(len(gt), config.max_answer_bytes)), np.uint8)
    gt_buf[:len(gt)] = np.frombuffer(gt, np.uint8)
    out = _reward_jit(padded, np.arange(size) < len(ids), gt_buf, np.int32(len(gt)), np.int32(kind),
                      np.int32(num_zooms), _table_for(tokenizer), config)
    out = jax.device_get(out)
    return dict(reward=float(out["reward"]), acc=float(out["acc"]), format_error=bool(out["format_error"] > 0.5),
                tool=bool(out["tool"] > 0.5))
