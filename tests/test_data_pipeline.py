"""Prompts into the train step: the chat layout (against the Qwen2-VL chat template run by transformers),
prepared TFDS datasets and defensive image decoding, and the global batches each host assembles from its
own rows (order, groups, bad records replaced the same way on any host count, resume, padding)."""

import io

import grain
import jax
import numpy as np
import PIL.Image
import pytest
import transformers

from deepeyes_jax import sharding as shd
from deepeyes_jax.data import chat, prepared
from deepeyes_jax.data.records import PromptRecord, decode_image
from deepeyes_jax.data.tokenizer import SYSTEM_PROMPT, USER_PROMPT, build_tokenizer
from deepeyes_jax.rollout.zoom import CropSpec
from deepeyes_jax.train.input_pipeline import DataConfig, PromptBatches

# Qwen2-VL / Qwen2.5-VL's chat template (tokenizer_config.json of the released checkpoints), which verl's
# RLHFDataset applies to DeepEyes' rows after splitting the user text on "<image>" (spec 1.4).
QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
CROP = CropSpec(image_height=64, image_width=64, min_pixels=28 * 28, max_pixels=56 * 56)
DATA = DataConfig(seed=3, prompt_len=128, num_patches=16, min_pixels=28 * 28, max_pixels=56 * 56, answer_bytes=8)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(vocab_size=512)


def _verl_parts(messages):
    """verl's RLHFDataset: each content string split on <image> into text / image parts."""
    out = []
    for role, content in messages:
        pieces = content.split(chat.IMAGE)
        parts = [{"type": "text", "text": pieces[0]}]
        for p in pieces[1:]:
            parts += [{"type": "image"}, {"type": "text", "text": p}]
        out.append({"role": role, "content": parts})
    return out


@pytest.mark.parametrize("messages", [
    chat.deepeyes_prompt("Is the cup red?\nOptions: A. yes B. no"),
    (("user", f"<image>\nWhat is shown?{USER_PROMPT}"),),  # no system message: the template's default one
    (("system", "Be brief."), ("user", "Look: <image> and answer.")),
])
def test_prompt_layout_is_the_qwen_vl_chat_template(tokenizer, messages):
    want = tokenizer.apply_chat_template(_verl_parts(messages), chat_template=QWEN_VL_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    assert chat.expand(messages, 1) == want
    if messages[0][0] == "system" and messages[0][1] == SYSTEM_PROMPT:
        assert want.endswith(f"<|vision_end|>\nIs the cup red?\nOptions: A. yes B. no{USER_PROMPT}<|im_end|>\n"
                             "<|im_start|>assistant\n")


@pytest.mark.parametrize("bad,match", [([], "no messages"), ([("user", "no image")], "0 <image>"),
                                       ([("user", "<image><image>")], "2 <image>"),
                                       ([("robot", "<image>")], "unknown role"), ([("user",)], "pairs")])
def test_prompts_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        chat.check(bad)


def _png(array, mode="RGB"):
    buf = io.BytesIO()
    PIL.Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_image_refuses_bad_bytes_before_decoding_them():
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(_png(rgb)), rgb)
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent: composited onto white, as the HF processor does
    assert (decode_image(_png(rgba, "RGBA")) == 255).all()
    huge = io.BytesIO()
    PIL.Image.new("L", (20000, 20000)).save(huge, format="PNG")  # ~400 MB of pixels in a few hundred bytes
    assert len(huge.getvalue()) < 1_000_000
    cases = [(b"", "no image bytes"), (b"GIF89a garbage", "not a readable image"),
             (_png(rgb)[:60], "not a readable image"), (huge.getvalue(), "exceed the limit"), (_png(np.zeros((100, 100, 3), np.uint8)), "exceed the limit"),
             (_png(np.zeros((1, 300, 3), np.uint8)), "aspect ratio")]
    for k, (data, match) in enumerate(cases):
        limit = dict(max_pixels=5000) if k == 4 else {}  # 100 x 100 over a 5000-pixel limit: our own check
        with pytest.raises(ValueError, match=f"row 7 image: .*{match}"):
            decode_image(data, what="row 7 image", **limit)


def _record(i, source="vstar", size=56):
    image = np.full((size, size, 3), (i * 37) % 256, np.uint8)
    return PromptRecord(prompt=chat.deepeyes_prompt(f"q{i}?", "sys"), image=image, ground_truth="ABCD"[i % 4],
                        question=f"q{i}?", data_source=source, box=(1.0, 2.0, 30.0, 40.0) if i % 2 else None,
                        category="odd" if i % 2 else "even", index=i)


def test_prepared_dataset_round_trip_and_a_corrupt_record_named(tmp_path):
    records = [_record(i) for i in range(5)]
    raw = dict(prompt=records[0].prompt, image=b"\x89PNG broken", ground_truth="A", question="q", data_source="vstar")
    directory = prepared.write(str(tmp_path), {"train": records, "test": [raw]})
    assert prepared.dataset_dir(str(tmp_path)) == directory  # the data_dir above it is accepted too
    train = prepared.open_split(directory, "train")
    assert len(train) == 5
    for i, r in enumerate(records):
        got = train[i]
        np.testing.assert_array_equal(got.image, r.image)
        assert (got.prompt, got.ground_truth, got.box, got.category, got.index) == (
            r.prompt, r.ground_truth, r.box, r.category, r.index)
    with pytest.raises(ValueError, match=r"\[test\] record 0 image: not a readable image"):
        prepared.open_split(directory, "test")[0]
    with pytest.raises(ValueError, match="has no split 'validation'"):
        prepared.open_split(directory, "validation")
    with pytest.raises(FileNotFoundError, match="not a prepared prompt dataset"):
        prepared.open_split(str(tmp_path / "nowhere"), "train")


class _Source(list):
    """A list of records whose `bad` indices raise on read, like a corrupt file."""

    def __init__(self, records, bad=()):
        super().__init__(records)
        self.bad, self.reads = set(bad), []

    def __getitem__(self, i):
        self.reads.append(i)
        if i in self.bad:
            raise ValueError(f"record {i} is corrupt")
        return list.__getitem__(self, i)


def _batches(tokenizer, source, mesh, **kw):
    kw = dict(dict(prompts=4, group_size=2, shuffle=True), **kw)
    return PromptBatches(source, tokenizer=tokenizer, data=DATA, crop=CROP, mesh=mesh,
                         rules=shd.DEFAULT_AXIS_RULES, **kw)


@pytest.fixture(scope="module")
def mesh():
    return shd.make_mesh((2, 2, 2))


def test_global_batches_are_row_sharded_groups_in_a_seeded_order(tokenizer, mesh):
    source = _Source([_record(i) for i in range(8)])
    batches = _batches(tokenizer, source, mesh)
    seen = []
    for _ in range(2):  # one epoch
        batch, rows = batches.next()
        assert batch.rollout.prompt_ids.shape == (8, DATA.prompt_len)
        assert batch.rollout.prompt_ids.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
        ids = np.asarray(batch.rollout.prompt_ids)
        np.testing.assert_array_equal(ids[0::2], ids[1::2])  # each prompt twice, consecutively
        assert [r["index"] for r in rows[0::2]] == [r["index"] for r in rows[1::2]]
        np.testing.assert_array_equal(np.asarray(batch.has_box), [r["record"].box is not None for r in rows])
        seen += [r["index"] for r in rows[0::2]]
    assert sorted(seen) == list(range(8)) and seen != list(range(8))  # a shuffled epoch, every prompt once
    epoch2 = [r["index"] for _ in range(2) for r in batches.next()[1][0::2]]
    assert sorted(epoch2) == list(range(8)) and epoch2 != seen  # the next epoch is reshuffled
    assert batches.state() == {"position": 16}


def test_bad_records_are_replaced_by_the_next_slot_and_resume_is_exact(tokenizer, mesh):
    records = [_record(i) for i in range(7)] + [_record(7, source="unknown_source")]
    first = _batches(tokenizer, _Source(records, bad={2}), mesh)
    out = [first.next() for _ in range(3)]
    order = grain.MapDataset.source(range(8)).shuffle(seed=DATA.seed).repeat()
    bad_slots = [p for p in range(12) if order[p] in (2, 7)]  # the epoch-1 and epoch-2 positions read
    assert len(bad_slots) >= 2  # both bad records in the first epoch
    substituted = [b * 4 + i for b, (_, rows) in enumerate(out) for i, r in enumerate(rows[0::2]) if r["substitute"]]
    assert substituted == bad_slots and first.skipped >= len(bad_slots)
    for b, (_, rows) in enumerate(out):
        assert not {r["index"] for r in rows} & {2, 7}
        for p in bad_slots:  # the replacement is the next usable slot of the same batch, cyclically
            if p // 4 == b:
                nxt = next(q for q in [b * 4 + (p + k) % 4 for k in range(1, 4)] if order[q] not in (2, 7))
                assert rows[2 * (p % 4)]["index"] == order[nxt]
    # a second reader (another host count would build the same batches) and a resumed one agree
    again = _batches(tokenizer, _Source(records, bad={2}), mesh)
    resumed = _batches(tokenizer, _Source(records, bad={2}), mesh, position=first.state()["position"] - 4)
    for (b1, r1), (b2, r2) in zip(out, [again.next() for _ in range(3)]):
        assert [r["index"] for r in r1] == [r["index"] for r in r2]
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(b1), jax.device_get(b2))
    assert [r["index"] for r in resumed.next()[1]] == [r["index"] for r in out[2][1]]


def test_unusable_batches_and_settings_name_the_cause(tokenizer, mesh):
    with pytest.raises(ValueError, match="no usable prompt"):
        _batches(tokenizer, _Source([_record(i, size=300) for i in range(4)]), mesh).next()  # > 64 px buffer
    with pytest.raises(ValueError, match="empty"):
        _batches(tokenizer, _Source([]), mesh)


def test_evaluation_pass_is_in_order_and_pads_the_last_batch(tokenizer, mesh):
    batches = _batches(tokenizer, _Source([_record(i) for i in range(6)]), mesh, group_size=1, shuffle=False)
    assert batches.num_batches == 2
    _, first = batches.next()
    _, last = batches.next()
    assert [r["index"] for r in first] == [0, 1, 2, 3] and [r["index"] for r in last] == [4, 5, 5, 5]
    assert [r["padded"] for r in first + last] == [False] * 6 + [True] * 2
