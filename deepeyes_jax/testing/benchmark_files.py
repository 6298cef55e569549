"""V* Bench folders and HR-Bench TSV / parquet files in their published layouts, for tests and benchmarks.

    write_vstar(root, [dict(category="direct_attributes", question=..., options=[right, ...], image=png, bbox=...)])
    write_hrbench_tsv(path, [dict(question=..., answer="C", A=..., B=..., C=..., D=..., category="single",
                                  image=png), ...])
"""

from __future__ import annotations

import base64
import csv
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from deepeyes_jax.data.benchmarks import HRBENCH_COLUMNS


def write_vstar(root, items: list[dict]) -> str:
    """<root>/<category>/<name>.jpg + <name>.json per item (V* Bench's layout: the right option first)."""
    for i, it in enumerate(items):
        folder = os.path.join(root, it["category"])
        os.makedirs(folder, exist_ok=True)
        name = it.get("name", f"sa_{i:04d}")
        with open(os.path.join(folder, name + ".jpg"), "wb") as f:
            f.write(it["image"])
        anno = {"target_object": it.get("target_object", ["thing"]), "question": it["question"],
                "options": list(it["options"])}
        if it.get("bbox") is not None:
            anno["bbox"] = it["bbox"]
        with open(os.path.join(folder, name + ".json"), "w") as f:
            json.dump(anno, f)
    return str(root)


def _hr_rows(rows: list[dict]) -> list[dict]:
    return [{"index": str(i), **{k: r[k] for k in ("question", "answer", "A", "B", "C", "D", "category")},
             "image": base64.b64encode(r["image"]).decode()} for i, r in enumerate(rows)]


def write_hrbench_tsv(path, rows: list[dict]) -> str:
    """HR-Bench's TSV (pandas `to_csv(sep="\\t")` style: a header, fields with tabs / newlines / quotes quoted)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(HRBENCH_COLUMNS), delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(_hr_rows(rows))
    return str(path)


def write_hrbench_parquet(path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(_hr_rows(rows)), str(path), row_group_size=2)
    return str(path)
