"""The on-device reward against a Python reference of DeepEyes' compute_score / compute_score_math.

REFERENCE below is `vl_agent.compute_score` ("reward 2") and `vl_agent.compute_score_math` as given
in spec 3.2 / 3.4, on the decoded response string, with the LLM judge and math_verify replaced by
`ref_match`: a plain-Python statement of the rule-based matcher documented in
`deepeyes_jax/rl/rewards.py`. Every case of the battery must give the same reward / acc /
format error / tool bonus through `rewards.score` (host, tokenize + jit) and through the jitted,
vmapped `batched_reward_fn`.
"""

import dataclasses
import re
import string

import chex
import jax
import numpy as np
import pytest

from deepeyes_jax.data.tokenizer import USER_PROMPT, build_tokenizer
from deepeyes_jax.rl import rewards
from deepeyes_jax.rollout import tools

CONFIG = rewards.RewardConfig()


# ----------------------------------------------------------------------------- reference

def _norm(s: str) -> str:
    mapped = "".join(ch.lower() if (ch.isascii() and ch.isalnum()) else (ch if ord(ch) >= 128 else " ") for ch in s)
    return " ".join(t for t in mapped.split(" ") if t)


def _letter(s: str):
    if len(s) >= 3 and s[0] == "(" and s[1] in string.ascii_letters and s[2] == ")":
        return s[1].lower(), s[3:]
    if len(s) >= 1 and s[0] in string.ascii_letters and (len(s) == 1 or s[1] in ".):"):
        return s[0].lower(), s[2:]
    return None, s


def _number(s: str):
    t = "".join(ch for ch in s if ch not in " \t\n\x0b\x0c\r,")
    if t.endswith("%"):
        t = t[:-1]
    if t.startswith("$"):
        t = t[1:]
    m = re.fullmatch(r"([+-]?)([0-9.]*)", t)
    if not m or m.group(2).count(".") > 1:
        return None
    digits = sum(ch.isdigit() for ch in m.group(2))
    if not 1 <= digits <= 18:
        return None
    return float(t)


def ref_match(pred: str, gt: str, config=CONFIG) -> float:
    a, g = pred.strip(), gt.strip()
    if len(a.encode("utf-8")) > config.max_answer_bytes:
        return 0.0
    la, ra = _letter(a)
    lg, rg = _letter(g)
    if la is not None and lg is not None:
        return float(la == lg)
    na, ng = _number(ra), _number(rg)
    if na is not None and ng is not None:
        return float(abs(na - ng) <= config.abs_tol + config.rel_tol * max(abs(na), abs(ng)))
    same = lambda x, y: _norm(x) != "" and _norm(x) == _norm(y)  # noqa: E731
    return float(same(ra, rg) or same(a, g))


def ref_compute_score(solution_str: str, ground_truth: str, num_zooms=None, config=CONFIG) -> dict:
    """vl_agent.compute_score, spec 3.2, judge -> ref_match."""
    is_format_error = False
    if solution_str.count("<think>") != solution_str.count("</think>"):
        is_format_error = True
    count_vision_1 = solution_str.count("<|vision_start|><|image_pad|>")
    count_vision_2 = solution_str.count("<|image_pad|><|vision_end|>")
    if count_vision_1 != count_vision_2:
        is_format_error = True
    predict_no_think = solution_str.split("</think>")[-1].strip()
    if predict_no_think.count("<answer>") != predict_no_think.count("</answer>"):
        is_format_error = True
    answer_text = solution_str.split("<answer>")[-1].split("</answer>")[0].strip()
    acc_reward = ref_match(answer_text, ground_truth, config)
    if len(answer_text) >= 1000:
        acc_reward = 0.0
        is_format_error = True
    zooms = count_vision_1 if num_zooms is None else num_zooms
    tool_reward = 1.0 if zooms > 0 and acc_reward > 0.5 else 0.0
    format_reward = -1.0 if is_format_error else 0.0
    return dict(reward=0.8 * acc_reward + 0.2 * format_reward + 1.2 * tool_reward, acc=acc_reward,
                format_error=is_format_error, tool=tool_reward > 0)


def ref_compute_score_math(solution_str: str, ground_truth: str, config=CONFIG) -> dict:
    """vl_agent.compute_score_math, spec 3.4, math_verify + judge -> ref_match."""
    is_format_error = False
    if solution_str.count("<think>") != solution_str.count("</think>"):
        is_format_error = True
    tail = solution_str.split("</think>")[-1].strip()
    matches = list(re.finditer(r"\\boxed{([^}]+)}", tail, flags=re.DOTALL))
    if not matches:
        acc_reward = 0.0
        is_format_error = True
    else:
        if len(matches) > 1:
            is_format_error = True
        last = matches[-1]
        pred = last.group(1)
        if config.boxed_balanced:  # our extension: to the balanced closing brace, if any
            depth = 1
            for j in range(last.start(1), len(tail)):
                depth += {"{": 1, "}": -1}.get(tail[j], 0)
                if depth == 0:
                    pred = tail[last.start(1):j]
                    break
        acc_reward = ref_match(pred, ground_truth, config)
    format_reward = -1.0 if is_format_error else 0.0
    return dict(reward=1.2 * acc_reward + 0.4 * format_reward, acc=acc_reward, format_error=is_format_error,
                tool=False)


def reference(text, gt, source, num_zooms=None, config=CONFIG):
    if source in config.math_sources:
        return ref_compute_score_math(text, gt, config)
    return ref_compute_score(text, gt, num_zooms, config)


# ----------------------------------------------------------------------------- battery

def obs(pads=4):
    """A successful zoom observation (spec 1.4), model stream (pads expanded)."""
    return ("\n<|im_start|>user\n<tool_response><|vision_start|>" + "<|image_pad|>" * pads + "<|vision_end|>"
            + USER_PROMPT + "</tool_response><|im_end|>\n<|im_start|>assistant\n")


def err_obs(msg="ZOOM IN ARGUMENTS ARE INVALID"):
    return "\n<|im_start|>user\nError: " + msg + "<|im_end|>\n<|im_start|>assistant\n"


CALL = '<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 100, 200]}}\n</tool_call>'
T1 = "<think>I need to zoom in on the sign.</think>\n" + CALL + "<|im_end|>"
END = "<|im_end|>"


def ans(a, think="The sign is clearly visible now."):
    return f"<think>{think}</think>\n<answer>{a}</answer>{END}"


LONG_ASCII = "word " * 210  # 1050 chars
CASES = [
    # (name, response, ground truth, data_source, num_zooms or None)
    ("letter", ans("A"), "A", "vstar", None),
    ("zoom_paren_letter", T1 + obs() + ans("(B)"), "B", "vstar", None),
    ("zoom_wrong", T1 + obs() + ans("C. the red car"), "B", "vstar", None),
    ("two_zooms", T1 + obs(6) + T1 + obs(2) + ans("B. red"), "red", "chart", None),
    ("error_obs_only", T1 + err_obs() + ans("B"), "B", "vstar", None),
    ("error_then_zoom", T1 + err_obs("Unknown tool name: crop") + T1 + obs(3) + ans("yes"), "Yes", "vl_agent", None),
    ("no_answer_tag", "<think>hmm</think> It is the red one." + END, "red", "vstar", None),
    ("no_answer_tag_bare", "red", "red", "vstar", None),
    ("no_answer_after_obs", T1 + obs() + "<think>still unsure</think>" + END, "...", "vstar", None),
    ("answer_in_obs_only", T1 + obs() + "<think>x</think> B" + END, "B", "vstar", None),
    ("extra_open_answer", "<think>a</think><answer>A</answer> <answer>B" + END, "B", "vstar", None),
    ("extra_close_answer", "<think>a</think><answer>A</answer></answer>" + END, "A", "vstar", None),
    ("answer_before_think_close", "<think>x <answer>A</answer></think> done" + END, "A", "vstar", None),
    ("double_think_open", "<think><think>x</think>" + "<answer>red</answer>" + END, "red", "vstar", None),
    ("think_close_only", "x</think> </think><answer>A</answer>", "A", "vstar", None),
    ("no_think", "<answer>A</answer>" + END, "A", "vstar", None),
    ("unbalanced_vision", T1 + "<|vision_start|><|image_pad|> oops " + ans("A"), "A", "vstar", None),
    ("unbalanced_vision_close", T1 + "<|image_pad|><|vision_end|>" + ans("A"), "A", "vstar", None),
    ("zoom_override_0", T1 + obs() + ans("A"), "A", "vstar", 0),
    ("zoom_override_2", ans("A"), "A", "vstar", 2),
    ("long_answer_guard", T1 + obs() + ans(LONG_ASCII), LONG_ASCII, "vstar", None),
    ("long_no_answer_tag", LONG_ASCII, "word", "vstar", None),
    ("answer_999_chars", ans("x" * 999), "x" * 999, "vstar", None),
    ("answer_1000_chars", ans("y" * 1000), "y", "vstar", None),
    ("unicode_400_chars", ans("é" * 400), "é" * 400, "vstar", None),
    ("unicode_1000_chars", ans("中" * 1000), "中", "vstar", None),
    ("unicode_999_chars", ans("中" * 999), "中", "vstar", None),
    ("unicode_answer", T1 + obs() + ans("红色"), "红色", "vstar", None),
    ("unicode_mismatch", ans("Rouge"), "rouge ", "vstar", None),
    ("unicode_case_not_folded", ans("Été"), "été", "vstar", None),
    ("unicode_space_strip", ans("\u3000A\u00a0"), "A", "vstar", None),
    ("case_punct", ans("The  Sky."), "the sky", "vstar", None),
    ("paraphrase_not_matched", ans("it is pink"), "pink", "vstar", None),
    ("yes_dot", ans("Yes."), "yes", "vstar", None),
    ("num_trailing_zero", T1 + obs() + ans("3.50"), "3.5", "chart", None),
    ("num_thousands", ans("1,000"), "1000", "chart", None),
    ("num_percent", ans("50%"), "50", "chart", None),
    ("num_dollar", ans("$12"), "12.0", "chart", None),
    ("num_sign", ans("-2"), "2", "chart", None),
    ("num_with_unit", ans("3.5 m"), "35 m", "chart", None),
    ("num_vs_words", ans("12 apples"), "12", "chart", None),
    ("num_tolerance", ans("0.33334"), "0.33333", "chart", None),
    ("num_not_close", ans("0.334"), "0.333", "chart", None),
    ("option_text", ans("B. red car"), "red car", "vstar", None),
    ("option_paren_vs_letter", ans("C) tree"), "(C)", "vstar", None),
    ("letters_differ", ans("A. red"), "B. red", "vstar", None),
    ("lower_letter", ans("a"), "A", "vstar", None),
    ("a_man_is_text", ans("A man"), "a man", "vstar", None),
    ("letter_vs_text_unknown", ans("B"), "red car", "vstar", None),
    ("empty_answer", ans(""), "A", "vstar", None),
    ("newlines_in_answer", "<think>x</think><answer>\n\n B \n</answer>" + END, "B", "vstar", None),
    ("option_letter_number", ans("A. 3"), "3", "chart", None),
    ("answer_over_window", ans("z" * 300), "z" * 300, "vstar", None),
    # math
    ("math_boxed", "<think>2+3</think> The answer is \\boxed{5}." + END, "5", "thinklite_eureka", None),
    ("math_no_boxed", "<think>2+3</think> The answer is 5." + END, "5", "thinklite_eureka", None),
    ("math_two_boxed", "<think>a</think> \\boxed{4} or \\boxed{5}" + END, "5", "xince", None),
    ("math_frac", "<think>a</think> \\boxed{\\frac{1}{2}}" + END, "\\frac{1}{2}", "thinklite_eureka", None),
    ("math_empty_boxed", "<think>a</think> \\boxed{} then \\boxed{7}" + END, "7", "thinklite_eureka", None),
    ("math_boxed_in_think", "<think>\\boxed{3}</think> so three" + END, "3", "thinklite_eureka", None),
    ("math_unbalanced_think", "<think>a \\boxed{3}" + END, "3", "thinklite_eureka", None),
    ("math_letter", "<think>a</think>\\boxed{B}" + END, "B", "xince", None),
    ("math_number", "<think>a</think>\\boxed{0.50}" + END, "0.5", "xince", None),
    ("math_nested_unbalanced", "<think>a</think>\\boxed{a \\boxed{b}" + END, "a boxed b", "xince", None),
    ("math_unicode", "<think>a</think>\\boxed{ π }" + END, "π", "thinklite_eureka", None),
    ("math_no_think", "\\boxed{12}" + END, "12", "thinklite_eureka", None),
    ("math_sqrt", "<think>a</think>\\boxed{2\\sqrt{3}} and \\boxed{x}y}" + END, "x", "thinklite_eureka", None),
    ("math_with_obs_tags", T1 + obs() + "<think>a</think>\\boxed{9}" + END, "9", "thinklite_eureka", None),
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _check(got, want, name):
    assert got["format_error"] == want["format_error"], (name, got, want)
    assert got["tool"] == want["tool"], (name, got, want)
    assert got["acc"] == pytest.approx(want["acc"]), (name, got, want)
    assert got["reward"] == pytest.approx(want["reward"], abs=1e-5), (name, got, want)


def test_battery_is_broad():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)
    outcomes = {(reference(t, g, s, z)["acc"], reference(t, g, s, z)["format_error"]) for _, t, g, s, z in CASES}
    assert outcomes == {(0.0, False), (0.0, True), (1.0, False), (1.0, True)}


def test_score_matches_reference(tok):
    for name, text, gt, source, zooms in CASES:
        decoded = tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=False)
        assert decoded == text, name  # the scored string is the text itself
        _check(rewards.score(text, gt, data_source=source, tokenizer=tok, num_zooms=zooms),
               reference(text, gt, source, zooms), name)


def test_regex_boxed_content(tok):
    """boxed_balanced=False keeps DeepEyes' regex content exactly (`\\frac{1`)."""
    config = dataclasses.replace(CONFIG, boxed_balanced=False)
    for text, gt in [("<think>a</think> \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
                     ("<think>a</think> \\boxed{\\frac{1}{2}}", "\\frac{1"),
                     ("\\boxed{a \\boxed{b}", "a boxed b")]:
        _check(rewards.score(text, gt, data_source="xince", tokenizer=tok, config=config),
               ref_compute_score_math(text, gt, config), text)


def test_outcome_values(tok):
    """Spec 3.2 / 3.4 outcome table."""
    s = lambda t, g, src="vstar": rewards.score(t, g, data_source=src, tokenizer=tok)["reward"]  # noqa: E731
    assert s(T1 + obs() + ans("A"), "A") == pytest.approx(2.0)
    assert s(ans("A"), "A") == pytest.approx(0.8)
    assert s(ans("A"), "B") == pytest.approx(0.0)
    assert s("<think>" + T1 + obs() + ans("A"), "A") == pytest.approx(1.8)
    assert s("<think>" + ans("A"), "B") == pytest.approx(-0.2)
    assert s("<think>a</think>\\boxed{1}", "1", "thinklite_eureka") == pytest.approx(1.2)
    assert s("<think>a</think>1", "1", "thinklite_eureka") == pytest.approx(-0.4)


def test_tiny_ground_truth_buffer(tok):
    """A ground-truth buffer narrower than the letter rule's 3 bytes is padded on device."""
    table = tools.token_bytes(tok)
    ids = np.asarray(tok.encode(ans("(B)"), add_special_tokens=False), np.int32)
    fn = jax.jit(rewards.reward_from_tokens, static_argnames="config")
    out = fn(ids, np.ones(len(ids), bool), np.frombuffer(b"B", np.uint8), np.int32(1),
                 np.int32(0), np.int32(1), table, CONFIG)
    assert float(out["reward"]) == pytest.approx(2.0) and float(out["tool"]) == 1.0


def test_unknown_source(tok):
    with pytest.raises(ValueError, match="geoguessr"):
        rewards.score(ans("A"), "A", data_source="geoguessr", tokenizer=tok)
    with pytest.raises(ValueError, match="nope"):
        rewards.score(ans("A"), "A", data_source="nope", tokenizer=tok)


def test_jit_vmap_traced_once_no_callback(tok):
    """All short cases in one batch, with junk tokens interleaved outside the response mask."""
    t_len, g_len = 384, 64
    rows = []
    for name, text, gt, source, zooms in CASES:
        ids = tok.encode(text, add_special_tokens=False)
        if 2 * len(ids) > t_len or len(gt.encode()) > g_len:
            continue
        rows.append((name, ids, text, gt, source, zooms))
    assert len(rows) >= 40
    # Tags split across tokens: one token per character.
    for name, text, gt, source, zooms in CASES:
        per_char = [i for ch in text for i in tok.encode(ch, add_special_tokens=False)]
        if name in ("letter", "extra_open_answer", "math_two_boxed", "math_frac", "unicode_space_strip"):
            assert 2 * len(per_char) <= t_len
            rows.append((name + "/per_char", per_char, text, gt, source, zooms))
    rng = np.random.default_rng(0)
    b = len(rows)
    ids_b = rng.integers(0, len(tok), size=(b, t_len)).astype(np.int32)
    mask_b = np.zeros((b, t_len), bool)
    gt_b = np.zeros((b, g_len), np.uint8)
    gt_len, kind, zooms_b = np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros(b, np.int32)
    for i, (name, ids, text, gt, source, zooms) in enumerate(rows):
        pos = np.sort(rng.choice(2 * len(ids), size=len(ids), replace=False))  # holes between tokens
        ids_b[i, pos], mask_b[i, pos] = ids, True
        g = gt.encode()
        gt_b[i, :len(g)], gt_len[i] = np.frombuffer(g, np.uint8), len(g)
        kind[i] = CONFIG.source_kind(source)
        zooms_b[i] = text.count(rewards.IMAGE_OPEN) if zooms is None else zooms
    table = tools.token_bytes(tok)
    def row(*a):
        return rewards.reward_from_tokens(*a, config=CONFIG)

    axes = (0, 0, 0, 0, 0, 0, None)
    fn = jax.vmap(row, in_axes=axes)
    traced = jax.jit(jax.vmap(chex.assert_max_traces(row, n=1), in_axes=axes))
    args = (ids_b, mask_b, gt_b, gt_len, kind, zooms_b, table)
    jaxpr = str(jax.make_jaxpr(fn)(*args))
    assert "callback" not in jaxpr and "pure_callback" not in jaxpr
    out = jax.device_get(traced(*args))
    for i, (name, ids, text, gt, source, zooms) in enumerate(rows):
        got = dict(reward=float(out["reward"][i]), acc=float(out["acc"][i]),
                   format_error=bool(out["format_error"][i] > 0.5), tool=bool(out["tool"][i] > 0.5))
        _check(got, reference(text, gt, source, zooms), name)
    batched = jax.device_get(rewards.batched_reward_fn(CONFIG)(*args))
    for key in ("reward", "acc", "format_error", "tool"):
        np.testing.assert_array_equal(batched[key], out[key])
    # Same shapes again (different data): no retrace.
    out2 = traced(ids_b[::-1].copy(), mask_b[::-1].copy(), gt_b, gt_len, kind, zooms_b, table)
    assert out2["reward"].shape == (b,)
