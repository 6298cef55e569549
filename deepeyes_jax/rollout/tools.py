"""On-device recogniser of one DeepEyes assistant turn (spec 1.5, 1.7, 2.3).

DeepEyes' `visual_toolbox_v2.execute` works on the decoded text of the turn:
  1. `re.findall(r'<answer>(.*?)</answer>', s, re.DOTALL)`; a non-empty last match ends the episode;
  2. else the last `<tool_call>(.*?)</tool_call>` match; none (or empty) ends the episode;
  3. `json.loads(match.strip())`, then `call["name"]`, `call["arguments"]`, name check,
     `arguments["bbox_2d"]`, clip to the image, validate (non-empty, min side > 30, aspect <= 100).
`recognize_turn` reproduces this inside a compiled sampling loop: static shapes, no host callback,
one row at a time (vmap it over a batch). Tags can be split across tokens or merged with their
neighbours, so everything runs on the decoded BYTES of the turn:
  * bytes: each token id is looked up in a `TokenBytes` table and the turn is compacted into one
    byte stream with a cumulative sum and a binary search (no loop over tokens);
  * tags: the regex's last match is found with a handful of vectorised max/min reductions (O(bytes));
  * JSON: only the last call's window (at most `max_call_bytes`) goes through a byte-level pushdown
    automaton (`lax.scan`), which validates like `json.loads` and extracts the few fields needed.
`parse_turn` is the host convenience wrapper around the same compiled function.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

STATUS_NONE, STATUS_ANSWER, STATUS_ZOOM, STATUS_ERROR = 0, 1, 2, 3
STATUS_NAMES = {STATUS_NONE: "none", STATUS_ANSWER: "answer", STATUS_ZOOM: "zoom", STATUS_ERROR: "error"}

ERROR_NONE, ERROR_JSON, ERROR_ARGUMENTS, ERROR_UNKNOWN_TOOL, ERROR_INVALID_BBOX = 0, 1, 2, 3, 4
ERROR_NAMES = {ERROR_NONE: "none", ERROR_JSON: "json", ERROR_ARGUMENTS: "arguments",
               ERROR_UNKNOWN_TOOL: "unknown_tool", ERROR_INVALID_BBOX: "invalid_bbox"}
# The text after "Error: " in the observation. DeepEyes' own text where it is fixed; where DeepEyes
# prints a dynamic exception (json error, KeyError repr, tool name) a fixed stand-in, because the
# observation tokens must be known before compilation.
ERROR_MESSAGES = {
    ERROR_NONE: "",
    ERROR_JSON: "Invalid tool call format: the text inside <tool_call></tool_call> is not valid JSON.",
    ERROR_ARGUMENTS: ('Invalid tool call arguments: expected {"name": "image_zoom_in_tool", '
                      '"arguments": {"bbox_2d": [x1, y1, x2, y2]}}.'),
    ERROR_UNKNOWN_TOOL: "Unknown tool name: only image_zoom_in_tool is available.",
    ERROR_INVALID_BBOX: "ZOOM IN ARGUMENTS ARE INVALID",
}


@dataclasses.dataclass(frozen=True)
class ToolConfig:
    """Static (hashable) settings of the recogniser; a change recompiles.

    tool_name: the only accepted `name` (ASCII). DeepEyes' `image_rotate_tool` is not supported.
    min_side: a clipped box needs both sides > min_side pixels (DeepEyes 30).
    max_aspect: and max(h, w) / min(h, w) <= max_aspect (DeepEyes 100).
    max_call_bytes: the stripped JSON of the call is parsed in a window of this many bytes; a
      longer call is reported as ERROR_JSON (DeepEyes would parse it).
    max_depth: deepest JSON nesting accepted (<= 30); deeper is ERROR_JSON.
    max_turn_bytes: bytes of the decoded turn that are searched for tags; None = all of them
      (token count x longest token). A smaller cap is cheaper but tags past it are not seen.
    """

    tool_name: str = "image_zoom_in_tool"
    min_side: float = 30.0
    max_aspect: float = 100.0
    max_call_bytes: int = 384
    max_depth: int = 16
    max_turn_bytes: int | None = None

    def __post_init__(self):
        if not self.tool_name.isascii() or not self.tool_name:
            raise ValueError(f"tool_name must be non-empty ASCII, got {self.tool_name!r}")
        if not 3 <= self.max_depth <= 30:
            raise ValueError(f"max_depth must be in [3, 30] (a bbox sits at depth 3), got {self.max_depth}")
        if self.max_call_bytes < 1 or (self.max_turn_bytes is not None and self.max_turn_bytes < 1):
            raise ValueError("max_call_bytes and max_turn_bytes must be positive")


class TokenBytes(NamedTuple):
    """What each token id decodes to: data uint8[V, L] (first lengths[id] bytes valid), lengths int32[V]."""

    data: jax.Array
    lengths: jax.Array


class TurnParse(NamedTuple):
    """status int32[] (STATUS_*), bbox float32[4] (clipped x1 y1 x2 y2 for a zoom, else 0), error int32[]."""

    status: jax.Array
    bbox: jax.Array
    error: jax.Array


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)}
    out, n = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:  # the other bytes get 256, 257, ... in increasing byte order
            out[b] = chr(256 + n)
            n += 1
    return out


def token_bytes(tokenizer) -> TokenBytes:
    """The byte table of `tokenizer` (host arrays), as `decode(ids, skip_special_tokens=False)` produces bytes.

    Byte-level tokens map back through GPT-2's character map; added (special) tokens are their
    literal text; ids without a token are empty. V = len(tokenizer).
    """
    char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    size = len(tokenizer)
    rows = []
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
        if i in added:
            rows.append(added[i].encode("utf-8"))
        elif tok is None:
            rows.append(b"")
        elif all(c in char_to_byte for c in tok):
            rows.append(bytes(char_to_byte[c] for c in tok))
        else:  # what the ByteLevel decoder does with a token outside its alphabet
            rows.append(tok.encode("utf-8"))
    width = max(1, max(len(r) for r in rows))
    data = np.zeros((size, width), np.uint8)
    for i, r in enumerate(rows):
        data[i, :len(r)] = np.frombuffer(r, np.uint8)
    return TokenBytes(data, np.array([len(r) for r in rows], np.int32))


# ----------------------------------------------------------------------------- byte stream and tags

def _turn_bytes(token_ids, num_tokens, table: TokenBytes, capacity: int):
    """The turn's decoded bytes: (int32[capacity] zero-padded, number of bytes).

    Byte p belongs to the first token whose cumulative end exceeds p (a binary search), so the
    stream is built by one gather instead of a loop over tokens.
    """
    vocab, width = table.data.shape
    t = token_ids.shape[0]
    ok = (jnp.arange(t) < num_tokens) & (token_ids >= 0) & (token_ids < vocab)
    ids = jnp.where(ok, token_ids, 0)
    lens = jnp.where(ok, jnp.asarray(table.lengths)[ids], 0)
    ends = jnp.cumsum(lens)
    p = jnp.arange(capacity, dtype=jnp.int32)
    tok = jnp.minimum(jnp.searchsorted(ends, p, side="right"), t - 1)
    j = jnp.clip(p - (ends[tok] - lens[tok]), 0, width - 1)
    byte = jnp.asarray(table.data).reshape(-1)[ids[tok] * width + j].astype(jnp.int32)
    n = jnp.minimum(ends[-1], capacity)
    return jnp.where(p < n, byte, 0), n


def _occurs(stream, tag: bytes):
    """bool[P]: `tag` starts at each byte position (zero padding never matches an ASCII tag)."""
    padded = jnp.concatenate([stream, jnp.zeros(len(tag), stream.dtype)])
    hit = jnp.ones(stream.shape, bool)
    for k, ch in enumerate(tag):
        hit = hit & (jax.lax.dynamic_slice_in_dim(padded, k, stream.shape[0]) == ch)
    return hit


def _last_match(stream, open_tag: bytes, close_tag: bytes):
    """Content span [start, end) of the LAST match of re.findall(open(.*?)close, DOTALL), and found.

    The matches of a lazy findall form a chain (open -> first close after it -> first open after
    that ...). Neither tag can start inside the other or overlap itself, which gives, without
    walking the chain: the last match contains the last open that still has a close after it
    (o); its end is the first close after o; its start is the first open after the last close
    before o.
    """
    lo, lc = len(open_tag), len(close_tag)
    big = stream.shape[0] + lo + lc + 1
    idx = jnp.arange(stream.shape[0], dtype=jnp.int32)
    opens, closes = _occurs(stream, open_tag), _occurs(stream, close_tag)
    last_close = jnp.max(jnp.where(closes, idx, -big))
    o = jnp.max(jnp.where(opens & (idx + lo <= last_close), idx, -big))
    found = o >= 0
    end = jnp.min(jnp.where(closes & (idx >= o + lo), idx, big))
    before = jnp.max(jnp.where(closes & (idx + lc <= o), idx, -big))
    start = jnp.min(jnp.where(opens & (idx >= before + lc), idx, big))
    return found, start + lo, end


def _py_space(stream):
    """bool[P]: byte is part of a character for which Python's str.isspace() holds (what .strip()
    removes): ASCII \\t-\\r, \\x1c-\\x1f, space, and the UTF-8 forms of U+0085, U+00A0, U+1680,
    U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000."""
    n = stream.shape[0]
    b1, b2 = (jnp.concatenate([stream[k:], jnp.zeros(k, stream.dtype)]) for k in (1, 2))
    ascii_ = ((stream >= 9) & (stream <= 13)) | ((stream >= 0x1C) & (stream <= 0x20))
    two = (stream == 0xC2) & ((b1 == 0x85) | (b1 == 0xA0))
    three = (((stream == 0xE1) & (b1 == 0x9A) & (b2 == 0x80))
             | ((stream == 0xE2) & (b1 == 0x80) & (((b2 >= 0x80) & (b2 <= 0x8A)) | (b2 == 0xA8) | (b2 == 0xA9)
                                                  | (b2 == 0xAF)))
             | ((stream == 0xE2) & (b1 == 0x81) & (b2 == 0x9F))
             | ((stream == 0xE3) & (b1 == 0x80) & (b2 == 0x80)))

    def shift(x, k):  # x[i - k]
        return jnp.concatenate([jnp.zeros(k, bool), x[:n - k]])

    return ascii_ | two | shift(two, 1) | three | shift(three, 1) | shift(three, 2)


# ----------------------------------------------------------------------------- JSON automaton

# Lexer modes. Structural modes come first (<= _AFTER), numbers last (>= _MINUS).
(_VALUE, _VALUE_OR_CLOSE, _KEY, _KEY_OR_CLOSE, _COLON, _AFTER, _STRING, _ESCAPE, _UHEX, _LIT,
 _MINUS, _ZERO, _INT, _DOT, _FRAC, _EXP_MARK, _EXP_SIGN, _EXP) = range(18)
_END, _ERR = -1, -2
# Number transitions by character class: '0', '1'-'9', '.', 'e'/'E', '+'/'-', 'I', other.
# _END: the number is complete and this byte is re-read as a delimiter ("01" fails there, as in
# json.loads, which reads "0" and then finds no delimiter).
_NUM_NEXT = np.array([
    [_ZERO, _INT, _ERR, _ERR, _ERR, _LIT, _ERR],                 # after '-' ('-I' starts -Infinity)
    [_END, _END, _DOT, _EXP_MARK, _END, _END, _END],             # after a leading 0
    [_INT, _INT, _DOT, _EXP_MARK, _END, _END, _END],             # integer digits
    [_FRAC, _FRAC, _ERR, _ERR, _ERR, _ERR, _ERR],                # after '.'
    [_FRAC, _FRAC, _END, _EXP_MARK, _END, _END, _END],           # fraction digits
    [_EXP, _EXP, _ERR, _ERR, _EXP_SIGN, _ERR, _ERR],             # after 'e'
    [_EXP, _EXP, _ERR, _ERR, _ERR, _ERR, _ERR],                  # after the exponent sign
    [_EXP, _EXP, _END, _END, _END, _END, _END],                  # exponent digits
], np.int32)
_NUM_CLASS = np.full(256, 6, np.int32)
_NUM_CLASS[ord("0")] = 0
_NUM_CLASS[ord("1"):ord("9") + 1] = 1
_NUM_CLASS[ord(".")] = 2
_NUM_CLASS[[ord("e"), ord("E")]] = 3
_NUM_CLASS[[ord("+"), ord("-")]] = 4
_NUM_CLASS[ord("I")] = 5
# Literals json.loads accepts (it also takes NaN and Infinity). Value as a bbox coordinate:
# Python's True/False are the ints 1/0; None is not a number.
_LITS = ("true", "false", "null", "NaN", "Infinity")
_LIT_TEXT = np.array([[ord(ch) for ch in w.ljust(8, "\0")] for w in _LITS], np.int32)
_LIT_LEN = np.array([len(w) for w in _LITS], np.int32)
_LIT_NUMERIC = np.array([True, True, False, True, True])
_LIT_VALUE = np.array([1.0, 0.0, 0.0, np.nan, np.inf], np.float32)
_INFINITY = 4
_LIT_START = np.full(256, -1, np.int32)
for _i, _w in enumerate(_LITS):
    _LIT_START[ord(_w[0])] = _i
_ESCAPED = np.full(256, -1, np.int32)  # \" \\ \/ \b \f \n \r \t -> the character
for _k, _v in zip('"\\/bfnrt', '"\\/\b\f\n\r\t'):
    _ESCAPED[ord(_k)] = ord(_v)
_HEX = np.full(256, -1, np.int32)
for _k in "0123456789abcdefABCDEF":
    _HEX[ord(_k)] = int(_k, 16)
_POW10 = np.array([10.0 ** k for k in range(39)], np.float32)  # exact up to 1e10
# Value roles: which field of the call a value is.
_OTHER, _NAME, _ARGS, _BBOX = 0, 1, 2, 3
_MAX_SIG = 9  # significant digits kept in the int32 mantissa


def _number_value(neg, mant, exp10):
    """sign * mant * 10**exp10 in float32: one rounding when mant < 2**24 and |exp10| <= 10."""
    m = mant.astype(jnp.float32)
    pow10 = jnp.asarray(_POW10)
    up = pow10[jnp.clip(exp10, 0, 38)] * pow10[jnp.clip(exp10 - 38, 0, 38)]
    down = pow10[jnp.clip(-exp10, 0, 38)] * pow10[jnp.clip(-exp10 - 38, 0, 38)]
    v = jnp.where(mant == 0, 0.0, jnp.where(exp10 >= 0, m * up, m / down))
    return jnp.where(neg, -v, v)


def _init_state():
    i, f, t = (lambda v: jnp.int32(v)), (lambda: jnp.bool_(False)), (lambda: jnp.bool_(True))
    return dict(
        mode=i(_VALUE), err=f(), depth=i(0), arrays=i(0),          # lexer + container stack (bit d: array)
        is_key=f(), str_role=i(_OTHER), upos=i(0), live=i(0), hex_left=i(0), code=i(0),  # strings
        lit=i(0), lit_pos=i(0),                                       # literals
        neg=f(), mant=i(0), nsig=i(0), exp10=i(0), exp_neg=f(), exp_val=i(0),  # numbers
        pend=i(_OTHER), top_obj=f(), name_seen=f(), name_ok=f(),      # the call
        args_seen=f(), args_obj=f(), in_args=f(),
        bbox_seen=f(), bbox_arr=f(), in_bbox=f(), count=i(0), numeric=t(), coords=jnp.zeros(4, jnp.float32),
    )


def _sel(s, cond, **changes):
    """Functional update of the fields in `changes` where cond holds."""
    return {k: (jnp.where(cond, changes[k], v) if k in changes else v) for k, v in s.items()}


def _make_step(config: ToolConfig):
    targets = [b"name", b"arguments", b"bbox_2d", config.tool_name.encode()]
    width = max(len(x) for x in targets)
    target_text = np.array([[ch for ch in x] + [-1] * (width - len(x)) for x in targets], np.int32)
    target_len = np.array([len(x) for x in targets], np.int32)
    bit = 1 << np.arange(len(targets), dtype=np.int32)
    all_live = int(bit.sum())

    def step(s, c):
        ws = (c == 32) | (c == 9) | (c == 10) | (c == 13)
        digit = (c >= 48) & (c <= 57)
        mode0 = s["mode"]

        # -- numbers: continue, complete (byte falls through as a delimiter) or fail.
        in_num = mode0 >= _MINUS
        nxt = jnp.asarray(_NUM_NEXT)[jnp.clip(mode0 - _MINUS, 0, 7), jnp.asarray(_NUM_CLASS)[c]]
        go, done = in_num & (nxt >= 0), in_num & (nxt == _END)
        m10 = s["mant"] * 10 + (c - 48)  # no overflow while nsig < _MAX_SIG
        room = s["nsig"] < _MAX_SIG
        int_digit = go & ((nxt == _INT) | (nxt == _ZERO))
        frac_digit = go & (nxt == _FRAC)
        take = (int_digit | frac_digit) & room
        elem = (s["depth"] == 3) & s["in_bbox"] & (s["count"] >= 1) & (s["count"] <= 4)
        slot = jnp.arange(4) == s["count"] - 1
        num = _number_value(s["neg"], s["mant"], s["exp10"] + jnp.where(s["exp_neg"], -s["exp_val"], s["exp_val"]))
        neg_inf = go & (nxt == _LIT)
        s = _sel(s, take, mant=m10, nsig=s["nsig"] + (m10 != 0))
        s = _sel(s, go, mode=nxt,
                 exp10=s["exp10"] + (int_digit & ~room) - (frac_digit & room),
                 exp_val=jnp.where(go & (nxt == _EXP), jnp.minimum(s["exp_val"] * 10 + (c - 48), 99999),
                                   s["exp_val"]),
                 exp_neg=s["exp_neg"] | ((nxt == _EXP_SIGN) & (c == ord("-"))))
        s = _sel(s, neg_inf, lit=_INFINITY, lit_pos=1, coords=jnp.where(elem & slot, -jnp.inf, s["coords"]))
        s = _sel(s, done, mode=_AFTER, coords=jnp.where(elem & slot, num, s["coords"]))
        err = s["err"] | (in_num & (nxt == _ERR))

        # -- structure: whitespace, values, keys, ':', ',', closing brackets.
        m = s["mode"]
        depth = s["depth"]
        top_arr = ((s["arrays"] >> jnp.maximum(depth - 1, 0)) & 1) == 1
        act = (m <= _AFTER) & ~ws
        after = act & (m == _AFTER) & (depth > 0)
        value = act & ((m == _VALUE) | ((m == _VALUE_OR_CLOSE) & (c != ord("]"))))
        close_arr = act & (((m == _VALUE_OR_CLOSE) & (c == ord("]"))) | (after & top_arr & (c == ord("]"))))
        close_obj = act & (((m == _KEY_OR_CLOSE) & (c == ord("}"))) | (after & ~top_arr & (c == ord("}"))))
        key = act & ((m == _KEY) | (m == _KEY_OR_CLOSE)) & (c == ord('"'))
        colon = act & (m == _COLON) & (c == ord(":"))
        comma_arr, comma_obj = after & top_arr & (c == ord(",")), after & ~top_arr & (c == ord(","))
        open_obj, open_arr = value & (c == ord("{")), value & (c == ord("["))
        push = open_obj | open_arr
        string = value & (c == ord('"'))
        number = value & ((c == ord("-")) | digit)
        lit = jnp.asarray(_LIT_START)[c]
        literal = value & (lit >= 0)
        known = ((value & (push | string | number | literal)) | close_arr | close_obj | key | colon
                 | comma_arr | comma_obj)
        err = err | (act & ~known) | (push & (depth >= config.max_depth))

        # What the value is, for the call: DeepEyes reads call["name"], call["arguments"],
        # arguments["bbox_2d"] and its 4 items; later duplicate keys overwrite earlier ones.
        role = s["pend"]
        is_name, is_args, is_bbox = value & (role == _NAME), value & (role == _ARGS), value & (role == _BBOX)
        item = value & (depth == 3) & s["in_bbox"]
        count = s["count"] + item
        numeric = number | (literal & jnp.asarray(_LIT_NUMERIC)[jnp.maximum(lit, 0)])
        lit_slot = item & literal & (jnp.arange(4) == count - 1)
        s = _sel(s, value, pend=_OTHER)
        s = _sel(s, value & (depth == 0), top_obj=c == ord("{"))
        s = _sel(s, is_name, name_seen=True, name_ok=False)
        s = _sel(s, is_args, args_seen=True, args_obj=c == ord("{"), bbox_seen=False)
        s = _sel(s, is_args | is_bbox, bbox_arr=is_bbox & (c == ord("[")), count=0, numeric=True)
        s = _sel(s, is_bbox, bbox_seen=True)
        s = _sel(s, item, count=count, numeric=s["numeric"] & numeric,
                 coords=jnp.where(lit_slot, jnp.asarray(_LIT_VALUE)[jnp.maximum(lit, 0)], s["coords"]))
        s = _sel(s, push & (depth == 1), in_args=is_args & open_obj)
        s = _sel(s, push & (depth == 2), in_bbox=is_bbox & open_arr)
        bit_d = jnp.left_shift(jnp.int32(1), depth)
        s = _sel(s, push, depth=depth + 1, arrays=jnp.where(open_arr, s["arrays"] | bit_d, s["arrays"] & ~bit_d))
        s = _sel(s, close_arr | close_obj, depth=depth - 1)
        new_mode = jnp.select(
            [open_obj, open_arr, close_arr | close_obj, key | string, colon | comma_arr, comma_obj, literal,
             number & (c == ord("-")), number & (c == ord("0")), number],
            [_KEY_OR_CLOSE, _VALUE_OR_CLOSE, _AFTER, _STRING, _VALUE, _KEY, _LIT, _MINUS, _ZERO, _INT], m)
        s = _sel(s, key | string, is_key=key, str_role=role, upos=0, live=all_live)
        s = _sel(s, literal, lit=lit, lit_pos=1)
        s = _sel(s, number, neg=c == ord("-"), mant=jnp.where(digit, c - 48, 0), nsig=(c >= 49) & (c <= 57),
                 exp10=0, exp_neg=False, exp_val=0)
        s = _sel(s, act, mode=new_mode)

        # -- strings: escapes, \uXXXX, control characters; keys and the name are compared
        # decoded unit by unit with the few strings that matter.
        in_str, in_esc, in_hex = mode0 == _STRING, mode0 == _ESCAPE, mode0 == _UHEX
        close = in_str & (c == ord('"'))
        backslash = in_str & (c == ord("\\"))
        raw = in_str & ~close & ~backslash & (c >= 0x20)
        esc = jnp.asarray(_ESCAPED)[c]
        simple, u = in_esc & (esc >= 0), in_esc & (c == ord("u"))
        hv = jnp.asarray(_HEX)[c]
        code = s["code"] * 16 + hv
        hex_done = in_hex & (hv >= 0) & (s["hex_left"] == 1)
        err = err | (in_str & (c < 0x20)) | (in_esc & ~simple & ~u) | (in_hex & (hv < 0))
        unit = jnp.where(raw, c, jnp.where(simple, esc, code))
        emit = raw | simple | hex_done
        col = jnp.minimum(s["upos"], width - 1)
        same = (jnp.asarray(target_text)[:, col] == unit) & (s["upos"] < jnp.asarray(target_len))
        live = jnp.where(emit, s["live"] & jnp.sum(jnp.where(same, jnp.asarray(bit), 0)), s["live"])
        upos = s["upos"] + emit
        full = (live & jnp.asarray(bit)) != 0
        full = full & (upos == jnp.asarray(target_len))
        key_role = jnp.select([(s["depth"] == 1) & full[0], (s["depth"] == 1) & full[1],
                               (s["depth"] == 2) & s["in_args"] & full[2]], [_NAME, _ARGS, _BBOX], _OTHER)
        s = _sel(s, emit, live=live, upos=upos)
        s = _sel(s, in_hex & (hv >= 0), code=code, hex_left=s["hex_left"] - 1)
        s = _sel(s, close & s["is_key"], pend=key_role)
        s = _sel(s, close & ~s["is_key"] & (s["str_role"] == _NAME), name_ok=full[3])
        s = _sel(s, u, code=0, hex_left=4)
        str_mode = jnp.select([close & s["is_key"], close, backslash, u, simple | hex_done],
                              [_COLON, _AFTER, _ESCAPE, _UHEX, _STRING], mode0)
        s = _sel(s, in_str | in_esc | in_hex, mode=str_mode)

        # -- literals: true false null NaN Infinity, byte by byte.
        in_lit = mode0 == _LIT
        want = jnp.asarray(_LIT_TEXT)[s["lit"], jnp.minimum(s["lit_pos"], 7)]
        err = err | (in_lit & (c != want))
        s = _sel(s, in_lit, lit_pos=s["lit_pos"] + 1)
        s = _sel(s, in_lit & (s["lit_pos"] == jnp.asarray(_LIT_LEN)[s["lit"]]), mode=_AFTER)
        s["err"] = err
        return s, None

    return step


def _parse_call(window, n, config: ToolConfig):
    """Run the automaton over window[:n] (int32 bytes); returns the final state.

    Bytes from n on are spaces: a space is neutral after a complete value and ends a pending
    number exactly as the end of the text does, so no per-step masking is needed.
    """
    w = window.shape[0]
    text = jnp.where(jnp.arange(w) < n, window, 32)
    text = jnp.concatenate([text, jnp.full(1, 32, text.dtype)])
    s, _ = jax.lax.scan(_make_step(config), _init_state(), text)
    return s


# ----------------------------------------------------------------------------- the recogniser

def recognize_turn(token_ids: jax.Array, num_tokens: jax.Array, table: TokenBytes, image_wh: jax.Array,
                   config: ToolConfig, box_scale=(1.0, 1.0)) -> TurnParse:
    """Classify one assistant turn as DeepEyes' `execute` would (see the module docstring).

    token_ids int32[T] (the first num_tokens are the turn), table from `token_bytes`, image_wh
    [2] = (width, height) of the image the box is clipped to, box_scale [2]: raw box x values are
    multiplied by box_scale[0] and y values by box_scale[1] before clipping. Jittable with
    `config` static; vmap over rows with `table` and `config` shared.
    """
    width = table.data.shape[1]
    cap = token_ids.shape[0] * width if config.max_turn_bytes is None else config.max_turn_bytes
    stream, _ = _turn_bytes(token_ids.astype(jnp.int32), num_tokens, table, cap)
    a_found, a_start, a_end = _last_match(stream, b"<answer>", b"</answer>")
    c_found, c_start, c_end = _last_match(stream, b"<tool_call>", b"</tool_call>")
    answer = a_found & (a_end > a_start)  # `if answer:` is False for an empty last answer
    call = c_found & (c_end > c_start)  # `if not action:` ends the episode on an empty call

    # json.loads(action.strip()): strip on the whole stream, then parse a fixed-size window.
    idx = jnp.arange(cap, dtype=jnp.int32)
    kept = (idx >= c_start) & (idx < c_end) & ~_py_space(stream)
    first = jnp.min(jnp.where(kept, idx, cap))
    length = jnp.maximum(jnp.max(jnp.where(kept, idx, -1)) - first + 1, 0)
    w = config.max_call_bytes
    too_long = length > w
    window = jax.lax.dynamic_slice_in_dim(jnp.concatenate([stream, jnp.zeros(w, stream.dtype)]), first, w)
    s = _parse_call(window, jnp.where(too_long, 0, length), config)

    json_ok = ~s["err"] & (s["mode"] == _AFTER) & (s["depth"] == 0) & ~too_long
    keys_ok = s["top_obj"] & s["name_seen"] & s["args_seen"]
    bbox_ok = s["args_obj"] & s["bbox_seen"] & s["bbox_arr"] & (s["count"] == 4) & s["numeric"]
    # maybe_resize_bbox: left = max(0, left) ... right = min(W, right) with Python's max/min
    # semantics (a NaN coordinate loses the comparison, so it is replaced), then validate_bbox.
    wh = jnp.asarray(image_wh, jnp.float32)
    scale = jnp.asarray(box_scale, jnp.float32)
    x1, y1, x2, y2 = (s["coords"][k] * scale[k % 2] for k in range(4))
    left, top = jnp.where(x1 > 0, x1, 0.0), jnp.where(y1 > 0, y1, 0.0)
    right, bottom = jnp.where(x2 < wh[0], x2, wh[0]), jnp.where(y2 < wh[1], y2, wh[1])
    h, w_ = bottom - top, right - left
    lo, hi = jnp.minimum(h, w_), jnp.maximum(h, w_)
    box_ok = ((left < right) & (bottom > top) & (hi / jnp.where(lo > 0, lo, 1.0) <= config.max_aspect)
              & (lo > config.min_side))

    # DeepEyes' order: json -> call["name"], call["arguments"] -> name -> arguments["bbox_2d"],
    # unpacking 4 numbers -> clip/validate.
    error = jnp.select([~json_ok, ~keys_ok, ~s["name_ok"], ~bbox_ok, ~box_ok],
                       [ERROR_JSON, ERROR_ARGUMENTS, ERROR_UNKNOWN_TOOL, ERROR_ARGUMENTS, ERROR_INVALID_BBOX],
                       ERROR_NONE).astype(jnp.int32)
    status = jnp.where(answer, STATUS_ANSWER, jnp.where(~call, STATUS_NONE,
                                                        jnp.where(error == ERROR_NONE, STATUS_ZOOM, STATUS_ERROR)))
    bbox = jnp.where(status == STATUS_ZOOM, jnp.stack([left, top, right, bottom]), 0.0)
    error = jnp.where(status == STATUS_ERROR, error, ERROR_NONE)
    return TurnParse(status.astype(jnp.int32), bbox.astype(jnp.float32), error.astype(jnp.int32))


_recognize_jit = jax.jit(recognize_turn, static_argnames=("config",))
_TABLES: dict[int, tuple] = {}  # id(tokenizer) -> (weakref, len(tokenizer), TokenBytes)


def _table_for(tokenizer) -> TokenBytes:
    hit = _TABLES.get(id(tokenizer))
    if hit is None or hit[0]() is not tokenizer or hit[1] != len(tokenizer):
        hit = (weakref.ref(tokenizer), len(tokenizer), token_bytes(tokenizer))
        _TABLES[id(tokenizer)] = hit
    return hit[2]


def parse_turn(text: str, *, image_width: float, image_height: float, tokenizer,
               config: ToolConfig | None = None) -> dict:
    """Host wrapper: tokenize `text` and run the compiled `recognize_turn` on it.

    Returns dict(status in {"answer", "zoom", "error", "none"}, bbox [x1, y1, x2, y2] or None,
    error in ERROR_NAMES values or None). Token ids are padded to a power of two (>= 64) so
    repeated calls reuse a few compilations.
    """
    config = ToolConfig() if config is None else config
    ids = tokenizer.encode(text, add_special_tokens=False)
    size = max(64, 1 << max(len(ids) - 1, 0).bit_length())
    padded = np.zeros(size, np.int32)
    padded[:len(ids)] = ids
    out = _recognize_jit(padded, np.int32(len(ids)), _table_for(tokenizer),
                         np.array([image_width, image_height], np.float32), config)
    status, error = int(out.status), int(out.error)
    return dict(status=STATUS_NAMES[status],
                bbox=[float(v) for v in np.asarray(out.bbox)] if status == STATUS_ZOOM else None,
                error=ERROR_NAMES[error] if status == STATUS_ERROR else None)
