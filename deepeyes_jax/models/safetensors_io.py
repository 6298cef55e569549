"""A streaming safetensors reader/writer on numpy + ml_dtypes.

Reading memory-maps the file and hands out zero-copy views, so a loader can slice each
device's shard without ever holding a whole checkpoint; bf16 works without torch.
Writing takes the header from shapes alone and then pulls one tensor at a time.
"""

from __future__ import annotations

import json
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


class SafetensorsFile:
    """Lazy, memory-mapped access to one .safetensors file."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self._start = 8 + n
        size = os.path.getsize(path)
        for name, e in header.items():
            if e["dtype"] not in _DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {e['dtype']}")
            begin, end = e["data_offsets"]
            want = int(np.prod(e["shape"], dtype=np.int64)) * _DTYPES[e["dtype"]].itemsize
            if end - begin != want or self._start + end > size:
                raise ValueError(f"{path}: tensor {name!r} data is truncated or inconsistent with its shape")
        self._mm = np.memmap(path, dtype=np.uint8, mode="r") if size else None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        begin, end = e["data_offsets"]
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
