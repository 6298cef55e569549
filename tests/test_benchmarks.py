"""V* Bench and HR-Bench loaders (`data.benchmarks`) on files written here in the published layouts: DeepEyes'
evaluation prompt verbatim, seeded option shuffles with the right letter tracked, lazily read images, and
malformed files named."""

import json

import pytest

from deepeyes_jax.data import benchmarks as bm
from deepeyes_jax.data.tokenizer import SYSTEM_PROMPT, USER_PROMPT, build_tokenizer
from deepeyes_jax.rl.rewards import RewardConfig, score
from deepeyes_jax.testing import benchmark_files as bf
from deepeyes_jax.testing.deepeyes_parquet import image_bytes

VSTAR = [
    dict(category="direct_attributes", question="What is the color of the cup?", options=["red", "blue", "green",
         "white"], image=image_bytes(40, 60, seed=0, fmt="JPEG"), bbox=[[10, 5, 8, 6]]),
    dict(category="direct_attributes", question="What is the material of the bag?", options=["leather", "cloth"],
         image=image_bytes(50, 30, seed=1, fmt="JPEG")),
    dict(category="relative_position", question="Is the dog left or right of the car?", options=["left", "right"],
         image=image_bytes(30, 30, seed=2, fmt="JPEG"), bbox=[[1, 2, 3, 4], [20, 10, 5, 5]]),
]
HR = [dict(question="What is written on the sign?\nRead it carefully.", answer="C", A="stop", B="go", C="exit",
           D="enter", category="single", image=image_bytes(40, 80, seed=3)),
      dict(question='Which "tall" building is nearest?', answer="A", A="first\tone", B="second", C="third",
           D="fourth", category="cross", image=image_bytes(30, 30, seed=4))]


def test_vstar_items_prompt_and_shuffles(tmp_path):
    items = bm.load_vstar(bf.write_vstar(tmp_path, VSTAR))
    assert [(i.category, i.options[0]) for i in items] == [(v["category"], v["options"][0]) for v in VSTAR]
    assert items[0].box == (10.0, 5.0, 18.0, 11.0) and items[1].box is None and items[2].box == (1, 2, 25, 15)
    source = bm.ShuffledSource(items, k=3, seed=7)
    assert len(source) == 9
    orders = set()
    for i in range(len(source)):
        r = source[i]
        item = items[i % 3]
        letter, text = r.ground_truth.split(". ", 1)
        assert text == item.options[0]  # the right option, wherever the shuffle put it
        assert f"\n{letter}. {text}\n" in r.prompt[1][1]
        assert r.category == item.category and r.index == i % 3 and r.data_source == "vstar"
        orders.add((i % 3, tuple(source.order(i))))
    assert len(orders) > 3  # the shuffles differ between repeats
    # seeded: the same seed gives the same records, another seed other orders
    assert [bm.ShuffledSource(items, k=3, seed=7)[i].ground_truth for i in range(9)] == \
        [source[i].ground_truth for i in range(9)]
    assert any(tuple(bm.ShuffledSource(items, k=3, seed=8).order(i)) != tuple(source.order(i)) for i in range(9))
    # DeepEyes' eval prompt, verbatim after the image
    r = bm.ShuffledSource(items[1:2], k=1, seed=0)[0]
    shown = [items[1].options[m] for m in bm.ShuffledSource(items[1:2], k=1, seed=0).order(0)]
    assert r.prompt == (("system", SYSTEM_PROMPT), ("user", "<image>Question: What is the material of the bag?\n"
                        f"Options: \nA. {shown[0]}\nB. {shown[1]}\n\n" + USER_PROMPT))
    assert r.image.shape == (50, 30, 3)


def test_the_ground_truth_form_scores_letters_and_option_text():
    """"<letter>. <option>" ground truths: the reward's matcher accepts the letter forms DeepEyes' rule accepts
    (the letter, "X.", "(X)", any case), the whole option and the option text alone; nothing else."""
    tokenizer = build_tokenizer()
    truth = "B. blue"
    for answer, right in [("B", 1), ("B.", 1), ("(B)", 1), ("b", 1), ("B. blue", 1), ("blue", 1), ("A", 0),
                          ("A. blue", 0), ("red", 0)]:
        got = score(f"<think>x</think><answer>{answer}</answer>", truth, data_source="vstar", tokenizer=tokenizer,
                    config=RewardConfig())["acc"]
        assert got == right, (answer, got)


@pytest.mark.parametrize("fmt", ["tsv", "parquet"])
def test_hrbench_rows_in_both_published_formats(tmp_path, fmt):
    path = (bf.write_hrbench_tsv if fmt == "tsv" else bf.write_hrbench_parquet)(tmp_path / f"hr.{fmt}", HR)
    items = bm.load_hrbench(path)
    assert [i.question for i in items] == [h["question"] for h in HR]  # a quoted newline and quotes survive
    assert items[0].options == ("exit", "stop", "go", "enter") and items[1].options[0] == "first\tone"
    assert [i.category for i in items] == ["single", "cross"]
    r = bm.ShuffledSource(items, k=1, seed=0)[0]
    assert r.image.shape == (40, 80, 3) and r.ground_truth.endswith(". exit")


@pytest.mark.parametrize("edit,needle", [
    (lambda d: (d / "direct_attributes" / "sa_0000.json").unlink(), "no annotation sa_0000.json"),
    (lambda d: (d / "direct_attributes" / "sa_0000.json").write_text('{"question": "q", "options": ["x"]}'),
     "field 'options'"),
    (lambda d: (d / "direct_attributes" / "sa_0000.json").write_text('{"options": ["x", "y"]}'), "field 'question'"),
    (lambda d: (d / "direct_attributes" / "sa_0000.json").write_text("{"), "not valid JSON"),
    (lambda d: (d / "direct_attributes" / "sa_0000.json").write_text(
        json.dumps({"question": "q", "options": ["x", "y"], "bbox": [[1, 2, "w", 4]]})), "bbox"),
    (lambda d: [p.unlink() for p in (d / "relative_position").iterdir()] and (d / "relative_position").rmdir(),
     "no relative_position/ folder"),
])
def test_malformed_vstar_is_named(tmp_path, edit, needle):
    bf.write_vstar(tmp_path, VSTAR)
    edit(tmp_path)
    with pytest.raises(bm.BenchmarkError, match="sa_0000|relative_position") as info:
        bm.load_vstar(str(tmp_path))
    assert needle in str(info.value)


def test_malformed_hrbench_is_named(tmp_path):
    bad = [dict(HR[0], answer="E")]
    with pytest.raises(bm.BenchmarkError, match=r"row 1: field 'answer' must be one of A-D"):
        bm.load_hrbench(bf.write_hrbench_tsv(tmp_path / "a.tsv", bad))
    path = tmp_path / "b.tsv"
    path.write_text("index\tquestion\tanswer\n0\tq\tA\n")
    with pytest.raises(bm.BenchmarkError, match="columns .*'A'.* missing"):
        bm.load_hrbench(str(path))
    path = bf.write_hrbench_tsv(tmp_path / "c.tsv", HR)
    lines = open(path).read().split("\n")
    lines[-2] = lines[-2][:-8] + "!!!!!!!!"  # the last record's base64 image damaged: found when read
    open(path, "w").write("\n".join(lines))
    items = bm.load_hrbench(path)
    with pytest.raises(bm.BenchmarkError, match="row 2: field 'image' is not base64"):
        items[1].read_image()
    (tmp_path / "d.tsv").write_text('index\tquestion\n0\t"never closed\n')
    with pytest.raises(bm.BenchmarkError, match="unterminated quoted field"):
        bm.load_hrbench(str(tmp_path / "d.tsv"))


def test_images_are_read_only_when_a_record_is(tmp_path):
    items = bm.load_vstar(bf.write_vstar(tmp_path, VSTAR))
    (tmp_path / "relative_position" / "sa_0002.jpg").write_bytes(b"not an image")  # after loading: not read yet
    source = bm.ShuffledSource(items, k=1)
    assert source[0].image.shape == (40, 60, 3)
    with pytest.raises(ValueError, match="sa_0002.jpg image"):
        source[2]
