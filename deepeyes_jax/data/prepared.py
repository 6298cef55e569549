"""Prepared prompt datasets: `PromptRecord`s as a TFDS array_record dataset (random access, no TensorFlow).

    write(out_dir, {"train": records, "test": ...}) -> the dataset directory
    source = open_split(directory, "train");  len(source);  source[i] -> PromptRecord

Images stay encoded (the bytes a parquet row or a benchmark file carried, or PNG for generated arrays)
and are decoded defensively on read (`records.decode_image`). The prompt is stored as JSON. A record that
cannot be read raises ValueError naming the dataset, split and index; the input pipeline counts and skips
it. `open_split` accepts the dataset directory (the one holding dataset_info.json) or a data_dir above it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from deepeyes_jax.data import chat
from deepeyes_jax.data.records import PromptRecord, decode_image, encode_png

NAME = "deepeyes_prompts"
VERSION = "1.0.0"


class _Builder(tfds.core.GeneratorBasedBuilder):
    """Writes the records it is given; `tfds.builder_from_directory` reads the result back."""

    name = NAME
    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "PromptRecord layout: prompt JSON, encoded image, ground truth, question, source."}
    # TFDS derives this via the `importlib_resources` backport, which is not installed; give it directly.
    code_path = epath.Path(__file__)

    def __init__(self, *, splits: Mapping[str, Iterable] | None = None, **kwargs):
        self._splits = splits
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            description=__doc__,
            disable_shuffling=True,  # record i of a split is the i-th record written
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes
                "prompt": text, "ground_truth": text, "question": text, "data_source": text, "category": text,
                "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                "has_box": tfds.features.Scalar(dtype=np.bool_),
                "index": tfds.features.Scalar(dtype=np.int64),
                "tool": tfds.features.Scalar(dtype=np.bool_),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the records are given
        return {split: self._generate_examples(records) for split, records in self._splits.items()}

    def _generate_examples(self, records):
        for i, r in enumerate(records):
            yield i, _encode(r)


def _encode(r: PromptRecord | Mapping) -> dict:
    get = r.get if isinstance(r, Mapping) else lambda k, d=None: getattr(r, k, d)
    image = get("image")
    box = get("box")
    return {
        "image": bytes(image) if isinstance(image, (bytes, bytearray)) else encode_png(image),
        "prompt": json.dumps([list(m) for m in chat.check(get("prompt"))]),
        "ground_truth": str(get("ground_truth")), "question": str(get("question")),
        "data_source": str(get("data_source")), "category": str(get("category", "") or ""),
        "box": np.asarray(box if box is not None else (0, 0, 0, 0), np.float32),
        "has_box": box is not None, "index": int(get("index", -1)), "tool": bool(get("tool", True)),
    }


def write(out_dir: str, splits: Mapping[str, Iterable]) -> str:
    """Write the records of each split (PromptRecords, or dicts with the same keys and `image` as encoded
    bytes or uint8[H, W, 3]), streaming; -> the dataset directory for `open_split`."""
    builder = _Builder(splits=splits, data_dir=os.fspath(out_dir))
    builder.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return os.fspath(builder.data_dir)


def dataset_dir(path: str) -> str:
    """The directory holding dataset_info.json: `path` itself or `path/deepeyes_prompts/<version>`."""
    path = os.path.abspath(os.path.expanduser(path))
    for candidate in (path, os.path.join(path, NAME, VERSION)):
        if os.path.isfile(os.path.join(candidate, "dataset_info.json")):
            return candidate
    raise FileNotFoundError(f"{path} is not a prepared prompt dataset (no dataset_info.json there or in "
                            f"{NAME}/{VERSION}/ below it)")


class Source:
    """Random access to one split of a prepared dataset: len(src), src[i] -> PromptRecord."""

    def __init__(self, directory: str, split: str, *, max_image_pixels: int | None = None):
        self.directory, self.split = dataset_dir(directory), split
        builder = tfds.builder_from_directory(self.directory)
        if split not in builder.info.splits:
            raise ValueError(f"{self.directory} has no split {split!r} (has {sorted(builder.info.splits)})")
        self._ds = builder.as_data_source(split=split)
        self._max_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> PromptRecord:
        where = f"{self.directory} [{self.split}] record {i}"
        try:
            r = self._ds[i]
            prompt = chat.check(json.loads(r["prompt"]))
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise ValueError(f"{where}: {e}") from None
        kw = {} if self._max_pixels is None else {"max_pixels": self._max_pixels}
        return PromptRecord(
            prompt=prompt, image=decode_image(r["image"], what=f"{where} image", **kw),
            ground_truth=r["ground_truth"].decode(), question=r["question"].decode(),
            data_source=r["data_source"].decode(), category=r["category"].decode(),
            box=tuple(float(v) for v in r["box"]) if bool(r["has_box"]) else None, index=int(r["index"]),
            tool=bool(r["tool"]) if "tool" in r else True)  # datasets written before the field: all with the tool


    def encoded(self, i: int) -> dict:
        """Record i for `write` with its image still the stored bytes (copying a subset re-encodes nothing)."""
        record = self[i]
        return dict(dataclasses.asdict(record), image=bytes(self._ds[i]["image"]))


def open_split(directory: str, split: str, **kw) -> Source:
    return Source(directory, split, **kw)
