"""V* Bench and HR-Bench in their published layouts -> evaluation `PromptRecord`s with DeepEyes' protocol.

    items = load("vstar", "path/to/vstar_bench")          # or ("hrbench", "hr_bench_4k.tsv" / ".parquet")
    source = ShuffledSource(items, k=4, seed=0)             # len k * n; source[i] -> PromptRecord

Layouts (spec 6.1 / 6.2), read as published:
  V* Bench: `<root>/direct_attributes/` and `<root>/relative_position/`, each image `<name>.<ext>` beside its
    annotation `<name>.json` {"question", "options" (the right one first), "target_object", "bbox" ([x, y, w, h]
    per target)}; the category is the folder.
  HR-Bench 4K / 8K: one TSV (or parquet) with columns index, question, answer (the right letter), A, B, C, D,
    category ("single" = FSP, "cross" = FCP) and image (base64).
Prompt (DeepEyes' eval scripts): the system prompt, then the image followed by
`"Question: {question}\\nOptions: \\nA. ...\\nB. ...\\n" + USER_PROMPT`. Unlike the original (V*: the right
answer always first) the options are shuffled with a seed: record j * n + i is item i under shuffle j, so avg@k
is the mean over the k shuffles. The ground truth is "<letter>. <option>": the reward's matcher accepts the
letter alone, "X." / "(X)" forms, or the option text (DeepEyes' rule: letter, 2-char with '.', or the option).

Images stay encoded until a record is read (HR-Bench 8K: ~800 images of 33 MP); a TSV is indexed once by byte
offset and each record is read back with a seek. Anything malformed is a `BenchmarkError` naming the file and
the field.
"""

from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import json
import os

import numpy as np

from deepeyes_jax.data import chat
from deepeyes_jax.data.records import PromptRecord, decode_image
from deepeyes_jax.data.tokenizer import SYSTEM_PROMPT, USER_PROMPT

BENCHMARKS = ("vstar", "hrbench")
VSTAR_CATEGORIES = ("direct_attributes", "relative_position")
HRBENCH_COLUMNS = ("index", "question", "answer", "A", "B", "C", "D", "category", "image")
LETTERS = "ABCDEFGH"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class BenchmarkError(ValueError):
    """A benchmark file that is not in its published layout: names the file and the field."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One benchmark question; `read_image()` returns its encoded bytes."""

    question: str
    options: tuple[str, ...]  # the right option first
    category: str
    name: str  # file name or row index, for logs
    read_image: object  # () -> bytes
    box: tuple[float, float, float, float] | None = None  # [x1, y1, x2, y2] around every target, if annotated


def eval_prompt(question: str, options: list[str]) -> chat.Messages:
    """DeepEyes' `instruction_prompt_before` verbatim after the image (its options string starts and ends with a
    newline, and USER_PROMPT starts with one)."""
    lettered = "\n" + "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(options))
    return (("system", SYSTEM_PROMPT), ("user", f"{chat.IMAGE}Question: {question}\nOptions: {lettered}\n{USER_PROMPT}"))


class ShuffledSource:
    """Random access to k option shuffles of the items: record j * n + i is item i under shuffle j."""

    def __init__(self, items: list[Item], *, k: int = 1, seed: int = 0, data_source: str = "vstar",
                 max_image_pixels: int | None = None):
        if not items:
            raise ValueError("the benchmark has no items")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.items, self.k, self.seed, self.data_source = items, k, seed, data_source
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return self.k * len(self.items)

    def order(self, i: int) -> np.ndarray:
        """The permutation of record i's options (option order[m] is shown as letter m)."""
        j, item = divmod(i, len(self.items))
        rng = np.random.default_rng([self.seed, j, item])
        return rng.permutation(len(self.items[item].options))

    def _shown(self, i: int) -> tuple[Item, list[str], str]:
        """(item, its options in shown order, the ground truth "<letter>. <option>") of record i."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        item, order = self.items[i % len(self.items)], self.order(i)
        shown = [item.options[m] for m in order]
        right = int(np.flatnonzero(order == 0)[0])
        return item, shown, f"{LETTERS[right]}. {shown[right]}"

    def truth(self, i: int) -> tuple[str, str]:
        """(question, ground truth) of record i, without reading its image (for the LLM judge)."""
        item, _, truth = self._shown(i)
        return item.question, truth

    def __getitem__(self, i: int) -> PromptRecord:
        item, shown, truth = self._shown(i)
        kw = {} if self.max_image_pixels is None else {"max_pixels": self.max_image_pixels}
        return PromptRecord(prompt=eval_prompt(item.question, shown),
                            image=decode_image(item.read_image(), what=f"{item.name} image", **kw),
                            ground_truth=truth, question=item.question, data_source=self.data_source, box=item.box,
                            category=item.category, index=i % len(self.items))


def load(benchmark: str, path: str) -> list[Item]:
    if benchmark == "vstar":
        return load_vstar(path)
    if benchmark == "hrbench":
        return load_hrbench(path)
    raise BenchmarkError(f"unknown benchmark {benchmark!r}: expected one of {BENCHMARKS}")


# ----------------------------------------------------------------------------- V* Bench


def _read_file(path: str):
    def read() -> bytes:
        with open(path, "rb") as f:
            return f.read()
    return read


def _union_xywh(boxes, where: str):
    if boxes is None:
        return None
    try:
        arr = np.asarray(boxes, np.float64).reshape(-1, 4)
    except (TypeError, ValueError):
        raise BenchmarkError(f"{where}: bbox must be a list of [x, y, w, h], got {boxes!r}") from None
    if not len(arr) or not np.isfinite(arr).all() or (arr[:, 2:] < 0).any():
        raise BenchmarkError(f"{where}: bbox must be finite [x, y, w, h] with w, h >= 0, got {boxes!r}")
    return (float(arr[:, 0].min()), float(arr[:, 1].min()), float((arr[:, 0] + arr[:, 2]).max()),
            float((arr[:, 1] + arr[:, 3]).max()))


def load_vstar(root: str) -> list[Item]:
    """Every image of the two category folders with its annotation, in sorted file order."""
    items = []
    for category in VSTAR_CATEGORIES:
        folder = os.path.join(root, category)
        if not os.path.isdir(folder):
            raise BenchmarkError(f"{root}: no {category}/ folder (expected the V* Bench layout)")
        for name in sorted(os.listdir(folder)):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            where = os.path.join(folder, stem + ".json")
            try:
                with open(where, "rb") as f:
                    anno = json.loads(f.read())
            except FileNotFoundError:
                raise BenchmarkError(f"{os.path.join(folder, name)}: no annotation {stem}.json beside it") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BenchmarkError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(anno, dict) or not isinstance(anno.get("question"), str):
                raise BenchmarkError(f"{where}: field 'question' missing or not a string")
            options = anno.get("options")
            if not (isinstance(options, list) and 2 <= len(options) <= len(LETTERS)
                    and all(isinstance(o, str) for o in options)):
                raise BenchmarkError(f"{where}: field 'options' must be 2-{len(LETTERS)} strings, got {options!r}")
            items.append(Item(anno["question"], tuple(options), category, os.path.join(category, name),
                              _read_file(os.path.join(folder, name)), _union_xywh(anno.get("bbox"), where)))
    if not items:
        raise BenchmarkError(f"{root}: no images in {' or '.join(VSTAR_CATEGORIES)}/")
    return items


# ----------------------------------------------------------------------------- HR-Bench


def _tsv_records(path: str):
    """(byte offset, byte length) of every TSV record after the header; a quoted field may hold newlines."""
    out, quotes, start, offset = [], 0, None, 0
    with open(path, "rb") as f:
        for line in f:
            if start is None:
                start, quotes = offset, 0
            quotes += line.count(b'"')
            offset += len(line)
            if quotes % 2 == 0:
                out.append((start, offset - start))
                start = None
    if start is not None:
        raise BenchmarkError(f"{path}: the last record has an unterminated quoted field")
    return out


def _parse_tsv_record(raw: bytes, path: str, row: int) -> list[str]:
    csv.field_size_limit(1 << 31)
    try:
        return next(csv.reader([raw.decode("utf-8")], delimiter="\t"))
    except (UnicodeDecodeError, csv.Error, StopIteration) as e:
        raise BenchmarkError(f"{path} row {row}: not a TSV record ({type(e).__name__}: {e})") from None


def _b64(value: str, where: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise BenchmarkError(f"{where}: field 'image' is not base64") from None


def _hr_item(fields: dict, where: str, read_image) -> Item:
    for key in HRBENCH_COLUMNS:
        if key != "image" and not isinstance(fields.get(key), str):
            raise BenchmarkError(f"{where}: field {key!r} missing")
    answer = fields["answer"].strip()
    if answer not in "ABCD" or len(answer) != 1:
        raise BenchmarkError(f"{where}: field 'answer' must be one of A-D, got {fields['answer']!r}")
    options = [fields[k] for k in "ABCD"]
    right = "ABCD".index(answer)
    return Item(fields["question"], tuple([options[right]] + options[:right] + options[right + 1:]),
                fields["category"], where, read_image)


def load_hrbench(path: str) -> list[Item]:
    """Every row of an HR-Bench TSV or parquet file; images decoded from base64 only when read."""
    if path.endswith(".parquet"):
        return _load_hrbench_parquet(path)
    records = _tsv_records(path)
    if not records:
        raise BenchmarkError(f"{path}: empty file")
    with open(path, "rb") as f:
        f.seek(records[0][0])
        header = _parse_tsv_record(f.read(records[0][1]), path, 0)
    missing = [c for c in HRBENCH_COLUMNS if c not in header]
    if missing:
        raise BenchmarkError(f"{path}: columns {missing} missing (have {header})")

    def reader(offset, length, row):
        def read() -> bytes:
            with open(path, "rb") as f:
                f.seek(offset)
                fields = _parse_tsv_record(f.read(length), path, row)
            return _b64(fields[header.index("image")], f"{path} row {row}")
        return read

    items = []
    for row, (offset, length) in enumerate(records[1:], start=1):
        with open(path, "rb") as f:
            f.seek(offset)
            values = _parse_tsv_record(f.read(length), path, row)
        if len(values) != len(header):
            raise BenchmarkError(f"{path} row {row}: {len(values)} fields, the header has {len(header)}")
        fields = dict(zip(header, values))
        items.append(_hr_item(fields, f"{path} row {row}", reader(offset, length, row)))
    return items


def _load_hrbench_parquet(path: str) -> list[Item]:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        names = f.schema_arrow.names
    except Exception as e:  # noqa: BLE001  pyarrow raises several types for a file that is not parquet
        raise BenchmarkError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    missing = [c for c in HRBENCH_COLUMNS if c not in names]
    if missing:
        raise BenchmarkError(f"{path}: columns {missing} missing (have {names})")
    meta = f.read(columns=[c for c in HRBENCH_COLUMNS if c != "image"]).to_pylist()
    starts = np.cumsum([0] + [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)])

    def reader(row):
        def read() -> bytes:
            group = int(np.searchsorted(starts, row, side="right") - 1)
            value = pq.ParquetFile(path).read_row_group(group, columns=["image"]).column(0)[row - starts[group]]
            value = value.as_py()
            return value if isinstance(value, bytes) else _b64(value, f"{path} row {row}")
        return read

    return [_hr_item({k: (str(v) if k == "index" else v) for k, v in r.items()}, f"{path} row {row}", reader(row))
            for row, r in enumerate(meta)]
