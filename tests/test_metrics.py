"""MetricsWriter (jsonl / TensorBoard / console) and the launch.plot_metrics command."""

import glob
import io
import json
import logging as py_logging
import math
import os
import struct
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from deepeyes_jax.train import metrics as metrics_lib
from deepeyes_jax.train.metrics import MetricsWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return f.read().splitlines(keepends=True)


# --- independent TensorBoard reader: CRCs checked with tensorboardX's crc32c, events parsed
# --- with tensorboardX's generated protobuf classes (not with our own encoder).


def _read_events(path):
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto import event_pb2

    def masked_crc32c(b):
        c = crc32c(b)
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    events = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        assert hcrc == masked_crc32c(header), f"bad length crc in {path}"
        body = data[pos + 12:pos + 12 + length]
        (bcrc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        assert bcrc == masked_crc32c(body), f"bad data crc in {path}"
        pos += 16 + length
        ev = event_pb2.Event()
        ev.ParseFromString(body)
        events.append(ev)
    return events


def _read_scalars(logdir):
    """{tag: {step: value}} over all event files, with TensorBoard's purge-on-START semantics."""
    from tensorboardX.proto import event_pb2

    files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
    assert files, f"no event files in {logdir}"
    out = {}
    for path in files:
        events = _read_events(path)
        assert events[0].file_version.startswith("brain.Event:")
        for ev in events:
            if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
                for tag in out:
                    out[tag] = {s: v for s, v in out[tag].items() if s < ev.step}
            if ev.HasField("summary"):
                for v in ev.summary.value:
                    out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


@pytest.fixture(params=["tensorboardX", "builtin"])
def tb_backend(request, monkeypatch):
    if request.param == "builtin":
        monkeypatch.setattr(metrics_lib, "_TbxSummaryWriter", None)
    else:
        pytest.importorskip("tensorboardX")
    return request.param


# -------------------------------------------------------------------------------------


def test_jsonl_lines_complete_after_each_write(tmp_path):
    workdir = str(tmp_path)
    w = MetricsWriter(workdir, total_steps=5, stream=io.StringIO())
    values = [0.5, np.float32(0.25), jnp.asarray(0.75, jnp.float32), np.int32(3), 7]
    for step, v in enumerate(values):
        w.write(step, {"reward": v, "accuracy": float(step) / 4})
        lines = _lines(workdir)  # read while the writer is still open
        assert len(lines) == step + 1
        for i, line in enumerate(lines):
            assert line.endswith("\n")
            rec = json.loads(line)
            assert set(rec) == {"step", "reward", "accuracy"}
            assert rec["step"] == i
        assert json.loads(lines[-1])["reward"] == pytest.approx(float(np.asarray(v)))
    w.close()
    assert isinstance(json.loads(_lines(workdir)[3])["reward"], int)


def test_resume_truncates_later_steps(tmp_path):
    workdir = str(tmp_path)
    with MetricsWriter(workdir, tensorboard=False, stream=io.StringIO()) as w:
        for s in range(10):
            w.write(s, {"loss": float(s)})
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 10, "lo')  # torn line from a killed process
    with MetricsWriter(workdir, resume_step=6, tensorboard=False, stream=io.StringIO()) as w:
        assert [json.loads(l)["step"] for l in _lines(workdir)] == list(range(6))
        for s in range(6, 8):
            w.write(s, {"loss": 100.0 + s})
    recs = [json.loads(l) for l in _lines(workdir)]
    assert [r["step"] for r in recs] == list(range(8))
    assert [r["loss"] for r in recs] == [0, 1, 2, 3, 4, 5, 106, 107]
    # Without resume_step existing lines are kept and new ones appended.
    with MetricsWriter(workdir, tensorboard=False, stream=io.StringIO()) as w:
        w.write(8, {"loss": 8.0})
    assert [json.loads(l)["step"] for l in _lines(workdir)] == list(range(9))


def test_tensorboard_reads_back(tmp_path, tb_backend):
    workdir = str(tmp_path)
    rng = np.random.default_rng(0)
    expected = {}
    with MetricsWriter(workdir, total_steps=6, stream=io.StringIO()) as w:
        for s in range(6):
            m = {"reward": float(rng.normal()), "eval/hard/accuracy": jnp.float32(s / 10),
                 "tool_call_rate": np.float64(rng.uniform())}
            w.write(s, m)
            for k, v in m.items():
                expected.setdefault(k, {})[s] = float(np.asarray(v))
    got = _read_scalars(os.path.join(workdir, "tensorboard"))
    assert set(got) == set(expected)
    for tag in expected:
        assert sorted(got[tag]) == sorted(expected[tag])
        for s, v in expected[tag].items():
            assert got[tag][s] == pytest.approx(v, rel=1e-6, abs=1e-7)  # float32 storage


def test_tensorboard_resume_purges_stale_steps(tmp_path, tb_backend):
    workdir = str(tmp_path)
    with MetricsWriter(workdir, stream=io.StringIO()) as w:
        for s in range(8):
            w.write(s, {"loss": float(s)})
    with MetricsWriter(workdir, resume_step=5, stream=io.StringIO()) as w:
        for s in range(5, 7):
            w.write(s, {"loss": 50.0 + s})
    got = _read_scalars(os.path.join(workdir, "tensorboard"))
    assert got["loss"] == {0: 0.0, 1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 55.0, 6: 56.0}


def test_non_finite_values(tmp_path, tb_backend, caplog):
    workdir = str(tmp_path)
    caplog.set_level(py_logging.WARNING)
    with MetricsWriter(workdir, stream=io.StringIO()) as w:
        w.write(0, {"loss": np.float32("nan"), "kl": 0.5, "grad_norm": jnp.inf, "r": -math.inf})
        w.write(1, {"loss": 1.0, "kl": 0.25, "grad_norm": 2.0, "r": 0.0})
    recs = [json.loads(l) for l in _lines(workdir)]  # strict JSON: no NaN/Infinity tokens
    assert "NaN" not in "".join(_lines(workdir)) and "Infinity" not in "".join(_lines(workdir))
    assert recs[0] == {"step": 0, "loss": None, "kl": 0.5, "grad_norm": None, "r": None}
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno >= py_logging.WARNING)
    for name in ("'loss'", "'grad_norm'", "'r'"):
        assert name in warned
    assert "'kl'" not in warned
    got = _read_scalars(os.path.join(workdir, "tensorboard"))
    assert got["loss"] == {1: 1.0} and got["grad_norm"] == {1: 2.0} and got["r"] == {1: 0.0}
    assert got["kl"] == {0: 0.5, 1: 0.25}


def test_console_progress_line(tmp_path):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    w = MetricsWriter(str(tmp_path), total_steps=10, tensorboard=False, stream=out)
    line = w.progress_line(0, {"reward": 0.5, "accuracy": 0.25, "other": 1.0}, now=100.0)
    assert line.startswith("step 1/10") and "reward=0.500" in line and "accuracy=0.250" in line
    assert "other" not in line
    line = w.progress_line(4, {"tool_call_rate": 0.75}, now=102.0)  # 4 steps in 2 s
    assert "step 5/10" in line and "2 step/s" in line and "ETA 2s" in line
    assert "tool_call_rate=0.750" in line
    w.write(5, {"reward": 1.0})
    w.close()
    text = out.getvalue()
    assert text.startswith("\r") and text.endswith("\n") and "step 6/10" in text


def _write_synthetic(workdir, n=120, with_eval=True, drop=()):
    rng = np.random.default_rng(1)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for s in range(n):
            r = {"step": s, "accuracy": 0.4 + 0.3 * s / n + 0.05 * rng.normal(),
                 "zooms_per_trajectory": 1.5 - math.exp(-s / 30), "grounding_iou": 0.2 + s / (3 * n),
                 "response_length": 300 - s + 5 * rng.normal(), "reward": 0.1}
            if with_eval and s % 20 == 0:
                r["eval/hard/accuracy"] = 0.5 + 0.2 * s / n
            if s == 7:
                r["accuracy"] = None  # a non-finite value written as null
            for k in drop:
                r.pop(k, None)
            f.write(json.dumps(r) + "\n")


def _run_plot(*args):
    return subprocess.run([sys.executable, "-m", "launch.plot_metrics", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_plot_command_writes_png(tmp_path):
    _write_synthetic(str(tmp_path))
    proc = _run_plot(f"--workdir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "dynamics.png"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (1600, 420)
        colors = img.convert("RGB").getcolors(1 << 16)
        assert colors is not None and len(colors) > 10  # something was drawn

    # Missing metrics -> empty panels with a note; custom size and output path.
    sub = tmp_path / "partial"
    sub.mkdir()
    _write_synthetic(str(sub), n=30, with_eval=False, drop=("grounding_iou", "response_length"))
    out2 = tmp_path / "plots" / "p.png"
    proc = _run_plot(f"--workdir={sub}", f"--out={out2}", "--width=800", "--height=300")
    assert proc.returncode == 0, proc.stderr
    with Image.open(out2) as img:
        assert img.size == (800, 300)


def test_plot_command_missing_or_empty_file(tmp_path):
    missing = tmp_path / "nope"
    proc = _run_plot(f"--workdir={missing}")
    assert proc.returncode != 0
    assert str(missing / "metrics.jsonl") in proc.stderr and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr

    (tmp_path / "metrics.jsonl").write_text("")
    proc = _run_plot(f"--workdir={tmp_path}")
    assert proc.returncode != 0
    assert str(tmp_path / "metrics.jsonl") in proc.stderr and "no records" in proc.stderr
    assert not (tmp_path / "dynamics.png").exists()
