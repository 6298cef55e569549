"""DeepEyes-47k parquet files written in the released schema (spec 5.2), for tests and benchmarks.

    row = make_row(question="What colour is the cup?", answer="red", image=png_bytes, data_source="vstar")
    write(path, [row, ...])

The Arrow schema is the released files': `prompt` list<struct<role, content>>, `images` list<struct<bytes,
path>>, `reward_model` struct<style, ground_truth>, `extra_info` struct<split, index, answer, question>.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq

from deepeyes_jax.data import chat

SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
    ("ability", pa.string()),
    ("env_name", pa.string()),
    ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
    ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64()), ("answer", pa.string()),
                              ("question", pa.string())])),
])


def image_bytes(height: int, width: int, *, seed: int = 0, fmt: str = "PNG") -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(rgb, "RGB").save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (no pixel data): a decompression bomb's signature."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def make_row(*, question: str, answer: str, image: bytes, data_source: str = "vstar", index: int = 0,
             prompt=None, images=None) -> dict:
    """A row as DeepEyes' builders wrote it: V* / chart prompt layout, one image, env visual_toolbox_v2."""
    messages = prompt if prompt is not None else [
        {"role": role, "content": content} for role, content in chat.deepeyes_prompt(question)]
    return {
        "data_source": data_source, "prompt": messages,
        "images": images if images is not None else [{"bytes": image, "path": None}],
        "ability": "vl_chart" if data_source == "chart" else "vl",
        "env_name": "" if data_source == "thinklite_eureka" else "visual_toolbox_v2",
        "reward_model": {"style": "model", "ground_truth": answer},
        "extra_info": {"split": "train", "index": index, "answer": answer, "question": question},
    }


def write(path, rows: list[dict], *, row_group_size: int = 4) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), str(path), row_group_size=row_group_size)
