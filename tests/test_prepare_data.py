"""`launch.prepare_data`: DeepEyes-47k parquet files (the released schema, written here) with corrupt rows, a
damaged row group and a file that is not parquet -> a prepared dataset of exactly the good rows, bad rows counted
by reason, the summary JSON as the last line printed."""

import io
import json
import os
import subprocess
import sys

import PIL.Image
import pytest

from deepeyes_jax.data import chat, prepared
from deepeyes_jax.testing import deepeyes_parquet as dp
from deepeyes_jax.testing import qwen_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_PROMPT_TOKENS = 1200  # the good rows are ~810 tokens (the verbatim system prompt); a 1000x1000 image is 1,296


def _good(i, source="vstar", h=40, w=60, fmt="PNG"):
    return dp.make_row(question=f"What colour is thing {i}?", answer="red", data_source=source, index=100 + i,
                       image=dp.image_bytes(h, w, seed=i, fmt=fmt))


def _files(tmp_path):
    """-> (parquet glob, the good rows, the expected skip counts)."""
    png = dp.image_bytes(40, 60)
    two = [{"role": "system", "content": "s"}, {"role": "user", "content": "<image><image> two images?"}]
    a = [
        _good(0), _good(1, "chart", fmt="JPEG"),
        _good(2, "thinklite_eureka", h=20, w=300),  # tiny: kept, upscaled by smart_resize like verl's fetch_image
        dp.make_row(question="q", answer="red", image=png, data_source="coco"),  # unknown_source
        dp.make_row(question="q", answer="", image=png),  # no_ground_truth
        dp.make_row(question="q", answer="red", image=png[:len(png) // 2]),  # image: truncated PNG
        dp.make_row(question="q", answer="red", image=b"GIF89a not really"),  # image
        dp.make_row(question="q", answer="red", image=dp.png_header_only(100_000, 100_000)),  # bomb
        dp.make_row(question="q", answer="red", image=dp.image_bytes(1, 300)),  # aspect_ratio 300
        dp.make_row(question="q", answer="red", image=png, prompt=two),  # schema: two <image>
        dp.make_row(question="q", answer="red", image=png, images=[{"bytes": png, "path": None}] * 2),  # schema
        dp.make_row(question="q", answer="red", image=png, images=[{"bytes": None, "path": "x.png"}]),  # schema
        dp.make_row(question="q", answer="red", image=png, prompt=[]),  # schema: no messages
        dp.make_row(question="q", answer="red", image=dp.image_bytes(1000, 1000)),  # prompt_too_long
        _good(3, "chart"),
    ]
    dp.write(tmp_path / "data_a.parquet", a, row_group_size=4)
    b = [_good(10 + i) for i in range(12)]
    dp.write(tmp_path / "data_b.parquet", b, row_group_size=4)
    _damage_row_group(tmp_path / "data_b.parquet", 1)  # rows 4..7 of data_b are unreadable
    (tmp_path / "data_c.parquet").write_bytes(b"PAR1 this is not parquet")
    good = [a[0], a[1], a[2], a[14]] + b[:4] + b[8:]
    skipped = {"schema": 4, "unknown_source": 1, "no_ground_truth": 1, "image": 2, "bomb": 1, "aspect_ratio": 1,
               "prompt_too_long": 1, "unreadable": 4}
    return str(tmp_path / "data_*.parquet"), good, skipped


def _damage_row_group(path, group):
    import pyarrow.parquet as pq
    col = pq.ParquetFile(path).metadata.row_group(group).column(1)
    raw = bytearray(path.read_bytes())
    raw[col.data_page_offset:col.data_page_offset + col.total_compressed_size] = b"\xab" * col.total_compressed_size
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    pattern, good, skipped = _files(root)
    tok_dir = root / "tokenizer"
    qwen_tokenizer.build(tok_dir)
    out = root / "out"
    proc = subprocess.run([sys.executable, "-m", "launch.prepare_data", f"--parquet={pattern}", f"--out_dir={out}",
                           f"--tokenizer={tok_dir}", f"--max_prompt_tokens={MAX_PROMPT_TOKENS}", "--batch_rows=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(root=root, out=out, good=good, skipped=skipped, proc=proc, pattern=pattern)


def test_counts_per_reason_are_exact_and_the_summary_is_the_last_line(prepared_run):
    r = prepared_run
    summary = json.loads(r["proc"].stdout.strip().splitlines()[-1])
    assert summary["rows"] == 15 + 12 and summary["written"] == len(r["good"]) == 12
    assert summary["skipped"] == r["skipped"]
    assert summary["by_source"] == {"chart": 2, "thinklite_eureka": 1, "vstar": 9}
    assert summary["tiny_upscaled"] == 1
    assert summary["unreadable_files"] == [str(r["root"] / "data_c.parquet")]
    # every skipped row is logged with its file and row index
    log = r["proc"].stderr
    assert "skipped (bomb) " + str(r["root"] / "data_a.parquet") + " row 7" in log
    assert "skipped (unreadable) " + str(r["root"] / "data_b.parquet") + " rows 4..7" in log


def test_the_dataset_holds_exactly_the_good_rows_with_their_original_bytes(prepared_run):
    r = prepared_run
    source = prepared.open_split(str(r["out"]), "train")
    assert len(source) == len(r["good"])
    for i, row in enumerate(r["good"]):
        record = source[i]
        assert record.data_source == row["data_source"] and record.ground_truth == "red"
        assert record.question == row["extra_info"]["question"] and record.index == row["extra_info"]["index"]
        assert record.tool == (row["data_source"] != "thinklite_eureka")  # ThinkLite rows are non-agent
        assert record.prompt == chat.check([(m["role"], m["content"]) for m in row["prompt"]])
        assert record.image.shape[:2] == PIL.Image.open(io.BytesIO(row["images"][0]["bytes"])).size[::-1]
    raw = source._ds[0]["image"]
    assert raw == r["good"][0]["images"][0]["bytes"]  # stored as the row's encoded bytes, not re-encoded
    assert json.load(open(os.path.join(prepared.dataset_dir(str(r["out"])), "prepare_report.json")))["written"] == 12


def test_an_existing_dataset_is_not_overwritten_and_no_match_is_an_error(prepared_run):
    r = prepared_run
    proc = subprocess.run([sys.executable, "-m", "launch.prepare_data", f"--parquet={r['pattern']}",
                           f"--out_dir={r['out']}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "already holds a prepared dataset" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "launch.prepare_data", f"--parquet={r['root']}/nothing_*.parquet",
                           f"--out_dir={r['root'] / 'other'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "matches no file" in proc.stderr


def test_without_a_tokenizer_only_image_tokens_count(tmp_path):
    """The image-token bound alone: the 1000x1000 row (1,296 image tokens) is still refused at 1,200."""
    from deepeyes_jax.data import deepeyes47k
    checks = deepeyes47k.Checks(sources=("vstar",), max_prompt_tokens=MAX_PROMPT_TOKENS)
    with pytest.raises(deepeyes47k.RowError, match="1296 image tokens") as info:
        deepeyes47k.convert(dp.make_row(question="q", answer="a", image=dp.image_bytes(1000, 1000)), checks, position=0)
    assert info.value.reason == "prompt_too_long"
    kept = deepeyes47k.convert(_good(0), checks, position=5)
    assert kept["index"] == 100 and not kept["tiny"]
    assert deepeyes47k.convert(dict(_good(0), extra_info=None), checks, position=5)["index"] == 5


def test_nothing_usable_is_a_clear_failure_with_the_summary(tmp_path):
    dp.write(tmp_path / "bad.parquet", [dp.make_row(question="q", answer="", image=dp.image_bytes(8, 8))])
    proc = subprocess.run([sys.executable, "-m", "launch.prepare_data", f"--parquet={tmp_path}/*.parquet",
                           f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no row passed the checks" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["skipped"] == {"no_ground_truth": 1}
