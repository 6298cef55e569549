"""Data selection's pieces (`train.selection`): the drop decision of spec 5.3, the ground-truth zoom handed to the
model (recognised by the rollout's own recogniser as a zoom on that box), accuracy over k samples, and copying
selected records with their stored image bytes."""

import numpy as np
import pytest

from deepeyes_jax.data import chat, prepared
from deepeyes_jax.data.records import PromptRecord
from deepeyes_jax.data.tokenizer import build_tokenizer
from deepeyes_jax.rollout import tools
from deepeyes_jax.testing.deepeyes_parquet import image_bytes
from deepeyes_jax.train import selection


@pytest.mark.parametrize("accuracy,has_box,solved,want", [
    (None, False, None, "unusable"), (1.0, True, None, "all_right"), (0.0, False, None, "none_right"),
    (0.5, True, False, "not_solved_with_gt_crop"), (0.5, True, None, "not_solved_with_gt_crop"),
    (0.5, True, True, None), (0.25, False, None, None),
])
def test_decisions(accuracy, has_box, solved, want):
    assert selection.decide(accuracy, has_box, solved) == want


def test_the_ground_truth_zoom_is_a_zoom_on_that_box():
    tok = build_tokenizer()
    text = selection.gt_zoom_call((40.4, 30, 180, 150.6))
    assert text.endswith("</tool_call><|im_end|>")
    got = tools.parse_turn(text.removesuffix("<|im_end|>"), image_width=224, image_height=168, tokenizer=tok)
    assert got["status"] == "zoom" and got["bbox"] == [40, 30, 180, 151]


def test_accuracy_over_k_samples():
    rows = [dict(index=i, acc=a) for i, a in [(0, 1), (0, 0), (1, 1), (1, 1), (2, 0), (2, 0)]]
    assert selection._accuracy(rows) == {0: 0.5, 1: 1.0, 2: 0.0}


def test_selected_records_keep_their_stored_image_bytes(tmp_path):
    raw = image_bytes(30, 40, fmt="JPEG")
    record = dict(prompt=chat.deepeyes_prompt("q?"), image=raw, ground_truth="A", question="q?", data_source="vstar",
                  box=(1.0, 2.0, 3.0, 4.0), category="c", index=7)
    source = prepared.open_split(prepared.write(str(tmp_path / "a"), {"train": [record]}), "train")
    copy = prepared.open_split(prepared.write(str(tmp_path / "b"), {"train": [source.encoded(0)]}), "train")
    assert copy._ds[0]["image"] == raw
    a, b = source[0], copy[0]
    assert isinstance(b, PromptRecord) and (a.prompt, a.box, a.index, a.category) == (b.prompt, b.box, b.index, b.category)
    np.testing.assert_array_equal(a.image, b.image)
