"""The real-vocabulary path: templates, the recogniser's byte table and the on-device reward built from a
151,665-token byte-level BPE with Qwen2.5's special tokens at their real ids (as a checkpoint's tokenizer)."""

import time

import jax
import numpy as np
import pytest

from deepeyes_jax.rl import rewards
from deepeyes_jax.rollout import tools
from deepeyes_jax.rollout.config import make_templates
from deepeyes_jax.testing import qwen_tokenizer

QWEN_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
            "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657,
            "</tool_call>": 151658, "<|file_sep|>": 151664}


@pytest.fixture(scope="module")
def tokenizer():
    return qwen_tokenizer.build()


def test_size_and_special_ids_are_qwen25s(tokenizer):
    assert len(tokenizer) == 151665
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_IDS} == QWEN_IDS
    text = 'héllo <tool_call>\n{"name": "image_zoom_in_tool"}\n</tool_call><|im_end|>'
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_byte_table_decodes_every_id_as_the_tokenizer_does(tokenizer):
    t0 = time.perf_counter()
    table = tools.token_bytes(tokenizer)
    seconds = time.perf_counter() - t0
    assert table.data.shape[0] == 151665 and table.data.nbytes < 8 * 2**20 and seconds < 10  # ~0.3 s, 3 MB here
    rng = np.random.default_rng(0)
    ids = list(rng.integers(0, 151665, 2000)) + list(QWEN_IDS.values())
    # the text decode(ids) gives back is the table's bytes (bytes of a partial UTF-8 character become U+FFFD in
    # text, as the byte-level decoder does); a whole sequence decodes to the concatenated bytes
    for i in ids:
        got = bytes(table.data[i, :table.lengths[i]])
        assert got.decode(errors="replace") == tokenizer.decode([int(i)], skip_special_tokens=False), i
    seq = [int(i) for i in ids[:300]]
    joined = b"".join(bytes(table.data[i, :table.lengths[i]]) for i in seq)
    assert joined.decode(errors="replace") == tokenizer.decode(seq, skip_special_tokens=False)


def test_templates_and_recogniser_and_reward_run_on_this_vocabulary(tokenizer):
    tpl = make_templates(tokenizer)
    assert tpl.im_end == 151645 and tpl.image_pad == 151655
    assert tokenizer.decode(list(tpl.zoom_prefix), skip_special_tokens=False).endswith("<|vision_start|>")
    call = ('<think>Look closer.</think>\n<tool_call>\n{"name": "image_zoom_in_tool", "arguments": '
            '{"bbox_2d": [10, 20, 300, 250]}}\n</tool_call>')
    parsed = tools.parse_turn(call, image_width=640, image_height=480, tokenizer=tokenizer)
    assert parsed["status"] == "zoom" and parsed["bbox"] == [10.0, 20.0, 300.0, 250.0]
    table = tools.token_bytes(tokenizer)
    response = tokenizer.encode("<think>ok</think> <answer>B. blue</answer><|im_end|>", add_special_tokens=False)
    ids = np.zeros(64, np.int32)
    ids[:len(response)] = response
    answer = np.zeros(16, np.uint8)
    answer[:1] = ord("B")
    score = jax.jit(lambda i, m: rewards.reward_from_tokens(i, m, answer, 1, rewards.SOURCE_TOOL, 0, table=table,
                                                            config=rewards.RewardConfig()))(
        ids, np.arange(64) < len(response))
    assert float(score["acc"]) == 1.0 and float(score["reward"]) == pytest.approx(0.8)
