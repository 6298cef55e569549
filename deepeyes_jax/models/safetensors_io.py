"""A streaming safetensors reader/writer on numpy + ml_dtypes.

Reading memory-maps the file and hands out zero-copy views, so a loader can slice each
device's shard without ever holding a whole checkpoint; bf16 works without torch.
Writing takes the header from shapes alone and then pulls one tensor at a time.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


# The safetensors reference implementation's limit on the JSON header.
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """An untrusted checkpoint file that cannot be read as it claims, or does not match the model: the message
    names the file and the offending tensor or field."""


def strict_json(raw: bytes, what: str):
    """json.loads that refuses duplicate keys (a second entry would silently win) and non-finite numbers."""
    def pairs(items):
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})[0]
            raise CheckpointError(f"{what}: duplicate key {dup!r}")
        return dict(items)

    def constant(name):
        raise CheckpointError(f"{what}: non-finite number {name}")

    try:
        return json.loads(raw, object_pairs_hook=pairs, parse_constant=constant)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{what}: not valid JSON ({type(e).__name__}: {e})") from None


def _uint(value) -> bool:
    return type(value) is int and value >= 0  # bool is not a shape or an offset


class SafetensorsFile:
    """Lazy, memory-mapped access to one .safetensors file, validated as the reference implementation does before
    any tensor is read: header length within the file and 100 MiB, a JSON object without duplicate keys, every
    entry exactly {dtype, shape, data_offsets} with a known dtype, non-negative integer dims and offsets, sizes that
    match the shape, and data regions that tile the data section exactly (no gap, overlap or trailing bytes).
    Anything else is a `CheckpointError` naming the file and the tensor / field."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: header length {n} exceeds the file ({size} bytes) or "
                                      f"{MAX_HEADER_BYTES} bytes")
            header = strict_json(f.read(n), f"{path}: safetensors header")
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict)
                                         and all(isinstance(v, str) for v in metadata.values())):
            raise CheckpointError(f"{path}: __metadata__ must be an object of strings")
        self.metadata = metadata or {}
        self.entries = {name: self._entry(name, e) for name, e in header.items()}
        self._start = 8 + n
        end = 0
        for name, e in sorted(self.entries.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
            begin = e["data_offsets"][0]
            if begin != end:
                raise CheckpointError(f"{path}: tensor {name!r} data_offsets {e['data_offsets']} "
                                      f"{'overlap the previous tensor' if begin < end else 'leave a gap'}")
            end = e["data_offsets"][1]
        if self._start + end != size:
            raise CheckpointError(f"{path}: tensor data covers {end} bytes but the file holds {size - self._start} "
                                  "after the header (truncated or trailing bytes)")
        self._mm = np.memmap(path, dtype=np.uint8, mode="r") if end else None

    def _entry(self, name: str, e) -> dict:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: entry must be an object with exactly dtype, shape and data_offsets, got "
                                  f"{sorted(e) if isinstance(e, dict) else type(e).__name__}")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_uint(d) for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_uint(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
        want = math.prod(shape) * _DTYPES[dtype].itemsize  # Python ints: no overflow on absurd shapes
        if offsets[1] - offsets[0] != want:
            raise CheckpointError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, its "
                                  f"{dtype}{shape} needs {want}")
        return e

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        begin, end = e["data_offsets"]
        if begin == end:
            return np.zeros(e["shape"], _DTYPES[e["dtype"]])
        buf = self._mm[self._start + begin:self._start + end]
        return buf.view(_DTYPES[e["dtype"]]).reshape(e["shape"])


def write_file(path: str, specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
               fetch: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> int:
    """Write tensors given (name, shape, dtype) up front; `fetch(name)` is called once each, in order.

    Returns the number of data bytes written.
    """
    specs = list(specs)
    header, offset = {}, 0
    for name, shape, dtype in specs:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            arr = np.ascontiguousarray(fetch(name), dtype=np.dtype(dtype))
            if arr.shape != tuple(shape):
                raise ValueError(f"tensor {name!r}: fetched shape {arr.shape} != declared {tuple(shape)}")
            arr.tofile(f)
    os.replace(tmp, path)
    return offset
