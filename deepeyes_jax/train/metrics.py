"""Per-step training metrics: JSON lines, TensorBoard scalars and a console progress line.

    writer = MetricsWriter(workdir, total_steps=cfg.total_steps, resume_step=start_step)
    for step in range(start_step, cfg.total_steps):
        ...
        writer.write(step, {"reward": r, "accuracy": acc, "tool_call_rate": tcr})
    writer.close()

* ``workdir/metrics.jsonl``: one JSON object per step, keys = the metric names plus
  ``"step"``. Each line is written and flushed in one go, so a killed run keeps every
  finished step. Non-finite values are written as ``null``.
* ``workdir/tensorboard/``: TensorBoard scalar event files (tensorboardX when installed,
  otherwise a minimal built-in writer producing the same record format). Non-finite
  values are skipped there.
* console: one progress line (step/total, steps/s, ETA, a few chosen metrics); rewritten
  in place with ``\\r`` when stdout is a TTY, otherwise logged with absl every
  ``log_every`` steps.

On a resumed run pass ``resume_step``: lines of metrics.jsonl with ``step >= resume_step``
are removed (they were written after the checkpoint that is being resumed), and the
TensorBoard writer records a purge at ``resume_step`` so TensorBoard drops the stale
points from the earlier event files.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging

try:  # Optional: fall back to the built-in event-file writer below.
    from tensorboardX import SummaryWriter as _TbxSummaryWriter
except ImportError:  # pragma: no cover - depends on the environment
    _TbxSummaryWriter = None

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Metrics shown on the console line, in this order, when present.
DEFAULT_CONSOLE_KEYS = (
    "reward",
    "accuracy",
    "tool_call_rate",
    "zooms_per_trajectory",
    "grounding_iou",
    "response_length",
    "loss",
    "kl",
)


# ---------------------------------------------------------------------------------------
# Value conversion


def to_python_number(value: Any) -> float | int:
    """float/int from a Python number, numpy scalar/0-d array or jax scalar."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    arr = np.asarray(value)  # works for numpy and (host-fetches) jax arrays
    if arr.size != 1:
        raise ValueError(f"metric value must be a scalar, got shape {arr.shape}")
    item = arr.reshape(()).item()
    if isinstance(item, bool):
        return int(item)
    if isinstance(item, (int, float)):
        return item
    return float(item)


def _is_finite(x: float | int) -> bool:
    return isinstance(x, int) or math.isfinite(x)


# ---------------------------------------------------------------------------------------
# metrics.jsonl


def read_metrics_jsonl(path: str) -> list[dict]:
    """All complete, parseable records of a metrics.jsonl file (a torn last line is skipped)."""
    records = []
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn write from a killed process
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "step" in rec:
                records.append(rec)
    return records


def truncate_metrics_jsonl(path: str, resume_step: int | None) -> int:
    """Drop lines with step >= resume_step (and any torn/unparseable line). Returns #dropped."""
    if not os.path.exists(path):
        return 0
    with open(path, "r", encoding="utf-8") as f:
        lines = f.readlines()
    kept, dropped = [], 0
    for line in lines:
        if not line.endswith("\n"):
            dropped += 1
            continue
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            dropped += int(bool(line.strip()))
            continue
        if resume_step is not None and step >= resume_step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


# ---------------------------------------------------------------------------------------
# Minimal TensorBoard event-file writer (used only when tensorboardX is missing)


def _make_crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def _event_header(wall_time: float, step: int) -> bytes:
    # Event.wall_time = 1 (double), Event.step = 2 (int64)
    return _varint((1 << 3) | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)


def encode_file_version_event(wall_time: float) -> bytes:
    return _event_header(wall_time, 0) + _len_field(3, b"brain.Event:2")  # Event.file_version


def encode_scalars_event(wall_time: float, step: int, scalars: Mapping[str, float]) -> bytes:
    values = b""
    for tag, value in scalars.items():
        # Summary.Value: tag = 1 (string), simple_value = 2 (float)
        v = _len_field(1, tag.encode("utf-8")) + _varint((2 << 3) | 5) + struct.pack("<f", value)
        values += _len_field(1, v)  # Summary.value = 1
    return _event_header(wall_time, step) + _len_field(5, values)  # Event.summary = 5


def encode_session_start_event(wall_time: float, step: int) -> bytes:
    # Event.session_log = 7; SessionLog.status = 1, START = 1
    return _event_header(wall_time, step) + _len_field(7, _varint(1 << 3) + _varint(1))


def tfrecord(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header)) + data
            + struct.pack("<I", masked_crc32c(data)))


def _unique_suffix() -> str:
    # tensorboardX names files by the second and opens them with "wb": without a unique
    # suffix a writer restarted within the same second would overwrite the previous file.
    return ".%d.%d" % (os.getpid(), time.time_ns())


class MinimalEventWriter:
    """Append-only TensorBoard scalar event file, API-compatible with the subset we use."""

    def __init__(self, logdir: str, purge_step: int | None = None):
        os.makedirs(logdir, exist_ok=True)
        name = "events.out.tfevents.%010d.%s%s" % (time.time(), socket.gethostname(), _unique_suffix())
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, "ab")
        self._f.write(tfrecord(encode_file_version_event(time.time())))
        if purge_step is not None:
            self._f.write(tfrecord(encode_session_start_event(time.time(), purge_step)))
        self._f.flush()

    def add_scalars_at(self, step: int, scalars: Mapping[str, float]) -> None:
        self._f.write(tfrecord(encode_scalars_event(time.time(), step, scalars)))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            self._f.close()


class _TbxAdapter:
    def __init__(self, logdir: str, purge_step: int | None = None):
        self._w = _TbxSummaryWriter(logdir=logdir, purge_step=purge_step, flush_secs=10,
                                    filename_suffix=_unique_suffix())

    def add_scalars_at(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self._w.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


# ---------------------------------------------------------------------------------------
# Console


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def _fmt_value(v: float | int | None) -> str:
    if v is None:
        return "nan"
    if isinstance(v, int):
        return str(v)
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.3g}"
    return f"{v:.4g}" if abs(v) >= 100 else f"{v:.3f}"


# ---------------------------------------------------------------------------------------


class MetricsWriter:
    """Writes per-step scalar metrics to metrics.jsonl, TensorBoard and the console.

    Args:
      workdir: run directory; created if needed.
      total_steps: number of the last step + 1, for the progress bar and ETA (optional).
      log_every: console line every this many steps (the JSON/TensorBoard outputs get
        every step).
      resume_step: first step this run will write; existing metrics.jsonl lines with
        ``step >= resume_step`` are removed and TensorBoard is told to purge them.
      console_keys: metric names shown on the console line (those present, in order).
      tensorboard: set False to skip TensorBoard output.
      active: set False on non-primary hosts; every method becomes a no-op.
      stream: console stream (default sys.stdout).
    """

    def __init__(
        self,
        workdir: str,
        *,
        total_steps: int | None = None,
        log_every: int = 1,
        resume_step: int | None = None,
        console_keys: Sequence[str] = DEFAULT_CONSOLE_KEYS,
        tensorboard: bool = True,
        active: bool = True,
        stream=None,
    ):
        self.workdir = workdir
        self.total_steps = total_steps
        self.log_every = max(1, int(log_every))
        self.console_keys = tuple(console_keys)
        self.active = active
        self._stream = stream if stream is not None else sys.stdout
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._f = None
        self._tb = None
        self._closed = False
        self._first_step = None
        self._first_time = None
        self._last_console_len = 0
        self._printed_tty_line = False
        if not active:
            return
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        dropped = truncate_metrics_jsonl(self.path, resume_step)
        if dropped:
            logging.info("MetricsWriter: removed %d line(s) of %s at or after resume step %s",
                         dropped, self.path, resume_step)
        self._f = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            tb_dir = os.path.join(workdir, TENSORBOARD_DIR)
            cls = _TbxAdapter if _TbxSummaryWriter is not None else MinimalEventWriter
            self._tb = cls(tb_dir, purge_step=resume_step)

    # -- writing ------------------------------------------------------------------------

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Records one step. Returns the JSON record that was written."""
        if not self.active:
            return {}
        if self._closed:
            raise RuntimeError("MetricsWriter.write() after close()")
        step = int(step)
        if "step" in metrics:
            raise ValueError("'step' is reserved; pass it as the step argument")
        record: dict[str, Any] = {"step": step}
        scalars: dict[str, float] = {}
        for name, value in metrics.items():
            v = to_python_number(value)
            if _is_finite(v):
                record[name] = v
                scalars[name] = float(v)
            else:
                logging.warning("MetricsWriter: metric %r is %s at step %d; writing null to %s "
                                "and skipping it in TensorBoard", name, v, step, METRICS_FILE)
                record[name] = None
        # One write + flush per line: a killed process leaves only complete lines.
        self._f.write(json.dumps(record, allow_nan=False) + "\n")
        self._f.flush()
        if self._tb is not None and scalars:
            self._tb.add_scalars_at(step, scalars)
        self._console(step, record)
        return record

    def flush(self) -> None:
        if self._f is not None and not self._f.closed:
            self._f.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._closed or not self.active:
            self._closed = True
            return
        self._closed = True
        if self._f is not None:
            self._f.flush()
            self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._printed_tty_line:
            self._stream.write("\n")
            self._stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- console ------------------------------------------------------------------------

    def progress_line(self, step: int, record: Mapping[str, Any], now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        if self._first_step is None:
            self._first_step, self._first_time = step, now
        done = step + 1  # steps are 0-based; after writing step s, s+1 are finished
        parts = []
        if self.total_steps:
            frac = min(1.0, done / self.total_steps)
            width = 20
            filled = int(frac * width)
            parts.append(f"step {done}/{self.total_steps} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{100 * frac:3.0f}%")
        else:
            parts.append(f"step {done}")
        elapsed = now - self._first_time
        n = step - self._first_step
        if n > 0 and elapsed > 0:
            rate = n / elapsed
            parts.append(f"{rate:.3g} step/s")
            if self.total_steps:
                parts.append(f"ETA {_fmt_duration((self.total_steps - done) / rate)}")
        else:
            parts.append("? step/s")
        shown = [f"{k}={_fmt_value(record[k])}" for k in self.console_keys if k in record]
        if shown:
            parts.append(" ".join(shown))
        return " | ".join(parts)

    def _console(self, step: int, record: Mapping[str, Any]) -> None:
        line = self.progress_line(step, record)
        last = self.total_steps is not None and step + 1 >= self.total_steps
        if step % self.log_every != 0 and not last:
            return
        if self._tty:
            pad = max(0, self._last_console_len - len(line))
            self._stream.write("\r" + line + " " * pad)
            self._stream.flush()
            self._last_console_len = len(line)
            self._printed_tty_line = True
        else:
            logging.info("%s", line)
