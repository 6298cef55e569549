"""The offline tokenizer and the on-device turn recogniser, against DeepEyes' own parsing.

The reference is `visual_toolbox_v2.execute` at DeepEyes HEAD (spec 1.5 / 1.7) copied literally
(`deepeyes_jax.testing.deepeyes_parse.reference`), its exceptions sorted into our error kinds. Every case of
the battery must give the same status / error / box, except the few listed in DEVIATIONS (also in
README, "Tool-call recognizer: deliberate differences from DeepEyes").
"""

import json
import random

import chex
import jax
import numpy as np
import pytest
import transformers

from deepeyes_jax.data.tokenizer import SPECIAL_TOKENS, SYSTEM_PROMPT, USER_PROMPT, build_tokenizer
from deepeyes_jax.rollout import tools
from deepeyes_jax.testing.deepeyes_parse import reference, result

IMAGE_SIZES = [(640, 480), (1000, 1000), (2246, 1582), (100, 3500), (3300, 200)]
CONFIG = tools.ToolConfig()
RUNNER_T = 640  # token slots of the batched runner (per-byte tokenizations need one slot per byte)
RUNNER_B = 64


# ----------------------------------------------------------------------------- the battery

def call(bbox="[10, 20, 100, 200]", name='"image_zoom_in_tool"', extra=""):
    return f'{{"name": {name}, "arguments": {{"bbox_2d": {bbox}{extra}}}}}'


def turn(body, think="I need to zoom in to see the sign."):
    return f"<think>{think}</think>\n<tool_call>\n{body}\n</tool_call><|im_end|>"


GOOD = call()
CASES = {
    "well_formed": turn(call(extra=', "label": "the apple on the desk"')),
    "prompt_example_spacing": '<tool_call>  \n' + call(extra=', "label": "the apple on the desk"') + '  \n</tool_call>',
    "compact": '<tool_call>{"name":"image_zoom_in_tool","arguments":{"bbox_2d":[50,60,400,300]}}</tool_call>',
    "floats": turn(call("[12.5, 30.25, 200.75, 180.5]")),
    "exponents": turn(call("[1e2, 2.5E1, 3e+2, 4000e-1]")),
    "negatives": turn(call("[-10, -5.5, 300, 250]")),
    "negative_zero": turn(call("[-0, -0.0, 100, 100]")),
    "partly_outside": turn(call("[500, 400, 5000, 4000]")),
    "entirely_outside": turn(call("[5000, 5000, 6000, 6000]")),
    "huge_numbers": turn(call("[0, 0, 1e10, 123456789]")),
    "tiny_box": turn(call("[10, 10, 20, 20]")),
    "min_side_exactly_30": turn(call("[0, 0, 30, 90]")),
    "min_side_31": turn(call("[0, 0, 31, 90]")),
    "degenerate_box": turn(call("[100, 100, 100, 200]")),
    "inverted_box": turn(call("[200, 200, 100, 100]")),
    "aspect_exactly_100": turn(call("[0, 0, 3100, 31]")),
    "aspect_over_100": turn(call("[0, 0, 3200, 31]")),
    "tall_aspect": turn(call("[0, 0, 40, 3500]")),
    "tall_aspect_over_100": turn(call("[0, 0, 34, 3500]")),
    "two_calls_last_invalid_box": turn(GOOD + "\n</tool_call>\n<tool_call>\n" + call("[0, 0, 5, 5]")),
    "two_calls_first_broken": turn('{"name": "image_zoom_in_tool", "arguments": {}\n</tool_call>\n<tool_call>\n'
                                   + GOOD),
    "answer_and_call": turn(GOOD) + "<answer>B</answer>",
    "answer_before_call": "<answer>The sign says STOP.</answer>\n<tool_call>" + GOOD + "</tool_call>",
    "empty_answer_and_call": "<answer></answer><tool_call>" + GOOD + "</tool_call>",
    "last_answer_empty": "<answer>A</answer> then <answer></answer><tool_call>" + GOOD + "</tool_call>",
    "answer_only": "<think>It is red.</think>  <answer>A. red</answer><|im_end|>",
    "answer_whitespace": "<answer> </answer>",
    "answer_unclosed": "<answer>A <tool_call>" + GOOD + "</tool_call>",
    "answer_nested_open": "<answer><answer></answer>",
    "no_tags": "<think>I can see it clearly.</think> The answer is B.<|im_end|>",
    "missing_close_brace": turn('{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 100, 200]}'),
    "extra_close_brace": turn(GOOD + "}"),
    "unbalanced_bracket": turn(call("[10, 20, 100, 200")),
    "trailing_comma_object": turn(call(extra=",")),
    "trailing_comma_array": turn(call("[10, 20, 100, 200,]")),
    "single_quotes": turn("{'name': 'image_zoom_in_tool', 'arguments': {'bbox_2d': [10, 20, 100, 200]}}"),
    "unquoted_keys": turn('{name: "image_zoom_in_tool", arguments: {bbox_2d: [10, 20, 100, 200]}}'),
    "missing_colon": turn('{"name" "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 100, 200]}}'),
    "missing_comma": turn(call("[10, 20 100, 200]")),
    "python_literal": turn(call(extra=', "crop": True')),
    "bad_literal": turn(call(extra=', "crop": tru')),
    "leading_zero": turn(call("[010, 20, 100, 200]")),
    "bare_dot_numbers": turn(call("[.5, 20, 100., 200]")),
    "plus_sign": turn(call("[+10, 20, 100, 200]")),
    "lone_minus": turn(call("[-, 20, 100, 200]")),
    "control_char_in_string": turn(call(extra=', "label": "two\nlines"')),
    "invalid_escape": turn(call(extra=r', "label": "a\x41"')),
    "bad_unicode_escape": turn(call(extra=r', "label": "\u12G4"')),
    "garbage_after_value": turn(GOOD + " thanks"),
    "two_objects": turn(GOOD + GOOD),
    "top_level_array": turn("[" + GOOD + "]"),
    "top_level_string": turn('"image_zoom_in_tool"'),
    "top_level_number": turn("42"),
    "unknown_tool": turn(call(name='"image_crop_tool"')),
    "name_not_string": turn(call(name="5")),
    "rotate_tool": turn('{"name": "image_rotate_tool", "arguments": {"angle": 90}}'),
    "missing_name": turn('{"arguments": {"bbox_2d": [10, 20, 100, 200]}}'),
    "missing_arguments": turn('{"name": "image_zoom_in_tool", "bbox_2d": [10, 20, 100, 200]}'),
    "unknown_tool_missing_arguments": turn('{"name": "foo"}'),
    "arguments_not_object": turn('{"name": "image_zoom_in_tool", "arguments": [10, 20, 100, 200]}'),
    "arguments_string": turn('{"name": "image_zoom_in_tool", "arguments": "bbox_2d"}'),
    "bbox_key_typo": turn('{"name": "image_zoom_in_tool", "arguments": {"bbox": [10, 20, 100, 200]}}'),
    "extra_keys": turn(call(extra=', "label": "cat", "confidence": 0.9, '
                            '"meta": {"a": [1, {"b": null}], "c": []}')),
    "label_escapes_unicode": turn(call(
        extra=r', "label": "a \"red\" \\ car\/ \u00e9\n\t café 日本 😀 \ud83d\ude00"')),
    "whitespace_everywhere": turn('{\n  "name" :\n "image_zoom_in_tool" ,\r\n\t"arguments":{ "bbox_2d" : [ 10 ,\n'
                                  ' 20 , 100 , 200 ] } }\n'),
    "arguments_before_name": turn('{"arguments": {"label": "x", "bbox_2d": [10, 20, 100, 200]}, '
                                  '"name": "image_zoom_in_tool"}'),
    "duplicate_name_last_right": turn('{"name": "foo", "arguments": {"bbox_2d": [10, 20, 100, 200]}, '
                                      '"name": "image_zoom_in_tool"}'),
    "duplicate_name_last_wrong": turn(GOOD[:-1] + ', "name": "foo"}'),
    "duplicate_bbox_last_wins": turn(call("[10, 20, 100, 200], \"bbox_2d\": [0, 0, 300, 300]")),
    "duplicate_bbox_last_bad": turn(call("[10, 20, 100, 200], \"bbox_2d\": \"none\"")),
    "duplicate_arguments": turn(GOOD[:-1] + ', "arguments": {"bbox_2d": [1, 2, 3]}}'),
    "escaped_keys": turn('{"n\\u0061me": "image_zoom\\u005fin_tool", '
                         '"arguments": {"bbox\\u005f2d": [10, 20, 100, 200]}}'),
    "near_miss_keys": turn('{"names": "image_zoom_in_tool", "arguments": {"bbox_2": [10, 20, 100, 200]}}'),
    "near_miss_name": turn(call(name='"image_zoom_in_too"')),
    "bbox_3_numbers": turn(call("[10, 20, 100]")),
    "bbox_5_numbers": turn(call("[10, 20, 100, 200, 300]")),
    "bbox_empty": turn(call("[]")),
    "bbox_strings": turn(call('["10", "20", "100", "200"]')),
    "bbox_one_string": turn(call('[10, 20, "100", 200]')),
    "bbox_is_string": turn(call('"10, 20, 100, 200"')),
    "bbox_is_4_char_string": turn(call('"abcd"')),
    "bbox_is_object": turn(call('{"x1": 10, "y1": 20, "x2": 100, "y2": 200}')),
    "bbox_nested": turn(call("[[10, 20], [100, 200]]")),
    "bbox_nested_4": turn(call("[[10], 20, 100, 200]")),
    "bbox_null": turn(call("[null, 20, 100, 200]")),
    "bbox_booleans": turn(call("[true, false, 100, 200]")),
    "bbox_nan_infinity": turn(call("[NaN, -Infinity, Infinity, 300]")),
    "bbox_infinity_left": turn(call("[Infinity, 0, 100, 300]")),
    "text_after_close": turn(GOOD) + "\nThe tool returned the crop: it shows a red car.<|im_end|>",
    "hallucinated_response": turn(GOOD) + "\n<|im_start|>user\n<tool_response>...</tool_response>",
    "open_without_close": "<think>zoom</think>\n<tool_call>\n" + GOOD + "\n<|im_end|>",
    "close_without_open": GOOD + "</tool_call>",
    "empty_call": "<tool_call></tool_call>",
    "whitespace_call": "<tool_call>  \n </tool_call>",
    "double_open": "<tool_call><tool_call>" + GOOD + "</tool_call>",
    "tags_inside_call": "<tool_call>" + GOOD + "<answer></answer></tool_call>",
    "unicode_space_edges": "<tool_call>\u00a0\u3000" + GOOD + "\u2003\x0b\x1c\u0085</tool_call>",
    "unicode_space_inside": turn(GOOD[:-1] + "\u00a0}"),
    "bom_prefix": "<tool_call>\ufeff" + GOOD + "</tool_call>",
    "chat_wrapped": "<|im_start|>assistant\n<think>look</think><tool_call>" + GOOD + "</tool_call><|im_end|>\n",
    "long_label_over_window": turn(call(extra=', "label": "' + "a very long label " * 24 + '"')),
    "deep_nesting_over_max_depth": turn(call(extra=', "meta": ' + "[" * 20 + "]" * 20)),
}

# Where we deliberately differ from DeepEyes: case -> (our result, why).
DEVIATIONS = {
    "rotate_tool": (result("error", error="unknown_tool"),
                    "only image_zoom_in_tool is implemented; DeepEyes would rotate the image"),
    "long_label_over_window": (result("error", error="json"),
                               "the call is longer than ToolConfig.max_call_bytes (static parse window)"),
    "deep_nesting_over_max_depth": (result("error", error="json"),
                                    "nesting deeper than ToolConfig.max_depth (static stack)"),
}


# Also deliberate, outside the battery's comparison (see test_error_messages and
# test_numbers_parse_to_nearest_float32): error observations use one fixed message per kind, and
# numbers / clip / validate are float32 (exact for <= 7 significant digits, else within 1 ulp).


def test_error_messages():
    assert tools.ERROR_MESSAGES[tools.ERROR_INVALID_BBOX] == "ZOOM IN ARGUMENTS ARE INVALID"  # DeepEyes' text
    assert set(tools.ERROR_MESSAGES) == set(tools.ERROR_NAMES)
    assert all(tools.ERROR_MESSAGES[k] for k in tools.ERROR_NAMES if k != tools.ERROR_NONE)
    assert sorted(tools.STATUS_NAMES.values()) == ["answer", "error", "none", "zoom"]


def test_battery_is_large_and_deviations_are_real():
    assert len(CASES) >= 40
    assert set(DEVIATIONS) <= set(CASES)
    for name, (ours, _) in DEVIATIONS.items():
        for w, h in IMAGE_SIZES:
            assert reference(CASES[name], w, h) != ours, name


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("name", sorted(CASES))
def test_battery_matches_deepeyes(tok, name):
    text = CASES[name]
    decoded = tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=False)
    assert decoded == text  # so the reference sees exactly what the model's tokens decode to
    for w, h in IMAGE_SIZES:
        ours = tools.parse_turn(text, image_width=w, image_height=h, tokenizer=tok)
        want = DEVIATIONS[name][0] if name in DEVIATIONS else reference(text, w, h)
        _assert_same(ours, want, f"{name} @ {w}x{h}")


def _assert_same(ours, want, where):
    assert (ours["status"], ours["error"]) == (want["status"], want["error"]), (where, ours, want)
    if want["bbox"] is None:
        assert ours["bbox"] is None, where
    else:  # float32 on device; realistic coordinates are exact
        np.testing.assert_allclose(ours["bbox"], np.float32(want["bbox"]), rtol=1e-6, err_msg=where)


def test_battery_covers_every_outcome(tok):
    seen = {(r["status"], r["error"]) for name, text in CASES.items()
            for r in [tools.parse_turn(text, image_width=640, image_height=480, tokenizer=tok)]}
    assert seen == {("answer", None), ("none", None), ("zoom", None), ("error", "json"), ("error", "arguments"),
                    ("error", "unknown_tool"), ("error", "invalid_bbox")}


# ----------------------------------------------------------------------------- batched runner

@pytest.fixture(scope="module")
def table(tok):
    return tools.token_bytes(tok)


@pytest.fixture(scope="module")
def runner(table):
    """Batched recogniser over [RUNNER_B, RUNNER_T] ids: list of (ids, wh, scale) -> list of dicts."""
    fn = jax.jit(jax.vmap(lambda i, n, wh, sc: tools.recognize_turn(i, n, table, wh, CONFIG, sc)))

    def run(rows):
        out = []
        for b0 in range(0, len(rows), RUNNER_B):
            chunk = rows[b0:b0 + RUNNER_B]
            ids = np.zeros((RUNNER_B, RUNNER_T), np.int32)
            n = np.zeros(RUNNER_B, np.int32)
            wh = np.ones((RUNNER_B, 2), np.float32)
            sc = np.ones((RUNNER_B, 2), np.float32)
            for r, (row_ids, row_wh, row_sc) in enumerate(chunk):
                assert len(row_ids) <= RUNNER_T
                ids[r, :len(row_ids)], n[r], wh[r], sc[r] = row_ids, len(row_ids), row_wh, row_sc
            res = jax.device_get(fn(ids, n, wh, sc))
            for r in range(len(chunk)):
                st, er = int(res.status[r]), int(res.error[r])
                out.append(result(tools.STATUS_NAMES[st],
                                   [float(v) for v in res.bbox[r]] if st == tools.STATUS_ZOOM else None,
                                   tools.ERROR_NAMES[er] if st == tools.STATUS_ERROR else None))
        return out

    return run


def _mutate(rng, text):
    alphabet = '{}[]",:0123456789.-+eE \n\t\\/atrufnlsNI_x\'é'
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(text) + 1)
        op = rng.randrange(5)
        if op == 0 and text:
            text = text[:i] + text[i + 1:]
        elif op == 1:
            text = text[:i] + rng.choice(alphabet) + text[i:]
        elif op == 2 and i < len(text):
            text = text[:i] + rng.choice(alphabet) + text[i + 1:]
        elif op == 3:
            j = rng.randrange(len(text) + 1)
            a, b = min(i, j), max(i, j)
            text = text[:a] + text[a:b] * 2 + text[b:]
        else:
            j = rng.randrange(len(text) + 1)
            a, b = min(i, j), max(i, j)
            text = text[:a] + text[b:]
    return text


def test_fuzz_json_mutations_match_deepeyes(tok, runner):
    """Random edits of valid calls (json.loads must reject / accept exactly the same)."""
    rng = random.Random(1234)
    bases = [GOOD, call("[12.5, -3, 4e2, 300.25]", extra=', "label": "a \\"b\\" \\u00e9"'),
             '{"arguments": {"bbox_2d": [0, 0, 100, 100], "x": [true, null, {}]}, "name": "image_zoom_in_tool"}',
             call("[NaN, 1E1, -0.5e-1, 99]")]
    rows, texts = [], []
    for k in range(6 * RUNNER_B):
        body = _mutate(rng, bases[k % len(bases)])
        text = f"<tool_call>{body}</tool_call>"
        ids = tok.encode(text, add_special_tokens=False)
        texts.append((tok.decode(ids, skip_special_tokens=False), IMAGE_SIZES[k % len(IMAGE_SIZES)]))
        rows.append((ids, IMAGE_SIZES[k % len(IMAGE_SIZES)], (1.0, 1.0)))
    outs = runner(rows)
    kinds = set()
    for (text, (w, h)), ours in zip(texts, outs):
        want = reference(text, w, h)
        kinds.add((want["status"], want["error"]))
        _assert_same(ours, want, repr(text))
    assert len(kinds) >= 5  # the mutations reach most outcomes


def test_fuzz_tag_structure_matches_regex(tok, runner):
    """Random sequences of (partial) tags: findall's last lazy match, found without a loop."""
    rng = random.Random(99)
    pieces = ["<answer>", "</answer>", "<tool_call>", "</tool_call>", "x", " ", "<", "answer>", "</", "tool_call>",
              "<answer", "</tool_call", GOOD, call("[0, 0, 5, 5]"), "<|im_end|>", "\n"]
    rows, texts = [], []
    for _ in range(3 * RUNNER_B):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 14)))
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) > RUNNER_T:
            continue
        texts.append(text)
        rows.append((ids, (640, 480), (1.0, 1.0)))
    for text, ours in zip(texts, runner(rows)):
        _assert_same(ours, reference(text, 640, 480), repr(text))


def test_box_scale_multiplies_before_clipping(tok, runner):
    cases = [("[10, 20, 100, 200]", (2.0, 0.5)), ("[100, 100, 400, 300]", (0.5, 0.5)),
             ("[300, 10, 700, 300]", (1.25, 3.0)), ("[10, 20, 60, 80]", (0.5, 0.5))]
    rows, want = [], []
    for bbox, scale in cases:
        text = turn(call(bbox))
        rows.append((tok.encode(text, add_special_tokens=False), (640, 480), scale))
        want.append(reference(text, 640, 480, box_scale=scale))
    for ours, w in zip(runner(rows), want):
        _assert_same(ours, w, str(w))
    assert {w["status"] for w in want} == {"zoom", "error"}


def test_numbers_parse_to_nearest_float32(tok, runner):
    """Integers, decimals and exponents with up to 7 significant digits (any realistic pixel
    coordinate) give the float32 nearest to the decimal value, as float32(json.loads(x));
    8-9 significant digits are within one float32 ulp."""
    rng = random.Random(7)

    def number(lo, hi, long):
        kind = rng.randrange(4)
        if long:
            return f"{rng.uniform(lo, hi):.5f}"
        if kind == 0:
            return str(rng.randrange(lo, hi))
        if kind == 1:
            return f"{rng.uniform(lo, hi):.{rng.randrange(1, 4)}f}"
        if kind == 2:
            return f"{rng.uniform(lo, hi):.3e}".replace("e+0", "e").replace("e-0", "e-")
        return f"{rng.randrange(lo, hi) * 100}E-{rng.choice(['2', '02'])}"

    rows, want = [], []
    for k in range(RUNNER_B):
        long = k >= RUNNER_B - 8
        coords = [number(0, 5000, long), number(0, 5000, long), number(6000, 9000, long), number(6000, 9000, long)]
        rows.append((tok.encode(turn(call(f"[{', '.join(coords)}]")), add_special_tokens=False),
                     (100000, 100000), (1, 1)))
        want.append((np.float32([json.loads(v) for v in coords]), long))
    for ours, (w, long) in zip(runner(rows), want):
        assert ours["status"] == "zoom"
        if long:
            np.testing.assert_allclose(np.float32(ours["bbox"]), w, rtol=1.2e-7, atol=0)
        else:
            np.testing.assert_array_equal(np.float32(ours["bbox"]), w)


def test_max_turn_bytes_caps_the_search(tok, table):
    text = "x" * 40 + CASES["compact"]
    ids = tok.encode(text, add_special_tokens=False)
    padded = np.zeros(128, np.int32)
    padded[:len(ids)] = ids
    wh = np.float32([640, 480])
    fn = jax.jit(tools.recognize_turn, static_argnames="config")
    full = fn(padded, np.int32(len(ids)), table, wh, CONFIG)
    capped = fn(padded, np.int32(len(ids)), table, wh, tools.ToolConfig(max_turn_bytes=64))
    assert int(full.status) == tools.STATUS_ZOOM and int(capped.status) == tools.STATUS_NONE


def _byte_ids(tok, text):
    """Every byte as its own byte-level token (no merges, no special-token ids)."""
    char = tools._bytes_to_unicode()
    ids = [tok.convert_tokens_to_ids(char[b]) for b in text.encode("utf-8")]
    assert None not in ids
    return ids


def _chunked_ids(tok, text, rng):
    """Encode random slices separately: tags get cut between tokens or glued to neighbours."""
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 12))) if len(text) > 1 else []
    ids = []
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        ids += tok.encode(text[a:b], add_special_tokens=False)
        if rng.random() < 0.3:
            ids.append(len(tok) + rng.randrange(100))  # ids beyond the tokenizer decode to nothing
    return ids


def test_unusual_tokenizations_give_the_sameresult(tok, runner):
    rng = random.Random(5)
    names = [n for n in sorted(CASES) if len(CASES[n].encode()) <= RUNNER_T]
    assert len(names) >= len(CASES) - 2
    rows = []
    for name in names:
        text = CASES[name]
        rows += [(tok.encode(text, add_special_tokens=False), (640, 480), (1, 1)),
                 (_byte_ids(tok, text), (640, 480), (1, 1)),
                 (_chunked_ids(tok, text, rng), (640, 480), (1, 1))]
    outs = runner(rows)
    for k, name in enumerate(names):
        normal, per_byte, chunked = outs[3 * k:3 * k + 3]
        assert per_byte == normal and chunked == normal, name


# ----------------------------------------------------------------------------- compilation properties

def test_traced_once_under_vmap_and_jit(tok, table):
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def batched(ids, n, wh):
        return jax.vmap(lambda i, k, s: tools.recognize_turn(i, k, table, s, CONFIG))(ids, n, wh)

    def batch(texts):
        ids = np.zeros((4, 96), np.int32)
        n = np.zeros(4, np.int32)
        for r, t in enumerate(texts):
            e = tok.encode(t, add_special_tokens=False)
            ids[r, :len(e)], n[r] = e, len(e)
        return ids, n, np.tile(np.float32([[640, 480]]), (4, 1))

    names = sorted(CASES)
    first = batched(*batch([CASES[n] for n in names[:4]]))
    second = batched(*batch([CASES[n] for n in names[4:8]]))
    assert first.status.shape == (4,) and first.bbox.shape == (4, 4) and second.error.dtype == np.int32
    for r, n in enumerate(names[4:8]):
        assert tools.STATUS_NAMES[int(second.status[r])] == reference(CASES[n], 640, 480)["status"]


def test_no_host_callback(table):
    fn = jax.jit(lambda i, n, wh: tools.recognize_turn(i, n, table, wh, CONFIG))
    args = (np.zeros(64, np.int32), np.int32(3), np.float32([640, 480]))
    assert "callback" not in fn.lower(*args).as_text().lower()
    assert "callback" not in str(jax.make_jaxpr(fn)(*args)).lower()


def test_parse_turn_reuses_compilation_and_table(tok):
    tools.parse_turn(CASES["compact"], image_width=640, image_height=480, tokenizer=tok)
    size = tools._recognize_jit._cache_size()
    for text in (CASES["floats"], CASES["unknown_tool"], CASES["no_tags"]):
        tools.parse_turn(text, image_width=500, image_height=300, tokenizer=tok)
    assert tools._recognize_jit._cache_size() == size
    assert tools._table_for(tok) is tools._table_for(tok)


# ----------------------------------------------------------------------------- tokenizer and byte table

ROUND_TRIP = [
    SYSTEM_PROMPT, USER_PROMPT, CASES["label_escapes_unicode"], CASES["unicode_space_edges"],
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
    "<|image_pad|><|vision_end|>\nWhat is it?" + USER_PROMPT + "<|im_end|>\n<|im_start|>assistant\n",
    "".join(SPECIAL_TOKENS), "  leading and trailing  \r\n\ttabs\t\t and   runs   ", "123456789.0e-5 -42",
    "Ünïcödé 日本語 한국어 emoji 😀👍🏽 mixed: الْعَرَبِيَّة", "",
]


def test_tokenizer_round_trips(tok):
    for text in ROUND_TRIP:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_special_tokens(tok):
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert type(tok).__name__ in ("Qwen2TokenizerFast", "Qwen2Tokenizer")
    assert len(tok) == 1024 + len(SPECIAL_TOKENS)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(1024, 1024 + len(SPECIAL_TOKENS)))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for t in SPECIAL_TOKENS:
        assert tok.encode("a" + t + "b", add_special_tokens=False)[1] == tok.convert_tokens_to_ids(t)
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello", add_special_tokens=False)


def test_tokenizer_saves_reloads_and_is_deterministic(tmp_path):
    a = build_tokenizer(tmp_path / "a")
    build_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "a")
    assert len(again) == len(a) and again.eos_token == "<|im_end|>" and again.pad_token == "<|endoftext|>"
    for text in ROUND_TRIP:
        assert again.encode(text, add_special_tokens=False) == a.encode(text, add_special_tokens=False)


def test_token_bytes_equal_decode(tok, table):
    data, lengths = np.asarray(table.data), np.asarray(table.lengths)
    assert data.dtype == np.uint8 and lengths.dtype == np.int32 and data.shape[0] == len(tok)

    def joined(ids):
        return b"".join(bytes(data[i, :lengths[i]]) for i in ids)

    for text in ROUND_TRIP:  # valid UTF-8: byte-exact
        ids = tok.encode(text, add_special_tokens=False)
        assert joined(ids) == tok.decode(ids, skip_special_tokens=False).encode("utf-8")
    rng = np.random.default_rng(0)
    for _ in range(200):  # random ids split UTF-8 sequences; decode() replaces them as Python does
        ids = rng.integers(0, len(tok), rng.integers(1, 60)).tolist()
        text = tok.decode(ids, skip_special_tokens=False)
        assert joined(ids).decode("utf-8", "replace") == text
        if "\ufffd" not in text:
            assert joined(ids) == text.encode("utf-8")


def test_python_space_set_is_complete():
    """_py_space marks exactly the characters str.strip() removes."""
    spaces = [chr(c) for c in range(0x110000) if chr(c).isspace()]
    text = "".join(spaces) + "ab\u00a1\u2030"
    stream = np.frombuffer(text.encode(), np.uint8).astype(np.int32)
    marked = np.asarray(tools._py_space(jax.numpy.asarray(stream)))
    expected = np.concatenate([np.full(len(c.encode()), c.isspace()) for c in text])
    np.testing.assert_array_equal(marked, expected)
