"""`python -m launch.train` end to end on the V*-mini smoke config (every stage: dataset build, supervised
base model, held-out evaluation and probes, fused GRPO steps, report, plot, renderings, HF export,
`launch.eval`), on the 8 fake CPU devices of this process's environment; interrupted runs (SIGTERM, SIGKILL
plus a corrupt latest checkpoint) resume to the uninterrupted run's metrics; and the same run as 2 processes
(jax.distributed on localhost, 4 CPU devices each) gives the 1-process metrics, its checkpoint resumes in 1
process to the same metrics."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
TIMING = ("step_time", "rollout_tokens_per_s")
# Same 8-device mesh, same HLO; the 2-process run reduces across processes (gloo), so sums may be ordered
# differently: float32 agreement, far tighter than any change a sampled token would make.
RTOL, ATOL = 1e-5, 1e-6


def _env(devices: int = 8):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # 8 fake devices share 2 cores: a device thread can reach a collective over 40 s (XLA's default) after the
    # others, and XLA then aborts the run (seen as SIGABRT under load).
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                        "--xla_cpu_collective_call_terminate_timeout_seconds=600")
    return env


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Dataset and base model directories shared by every run of this module (built by the first)."""
    root = tmp_path_factory.mktemp("shared")
    return dict(data=str(root / "tfds"), base=str(root / "base_model"))


def _cmd(workdir, shared, steps=STEPS):
    return [sys.executable, "-m", "launch.train", "--config=configs/vstar_mini.py:smoke", f"--workdir={workdir}",
            f"--config.steps={steps}", f"--config.vstar_mini.data_dir={shared['data']}",
            f"--config.vstar_mini.base_model_dir={shared['base']}"]


def _run(workdir, shared, steps=STEPS):
    return subprocess.run(_cmd(workdir, shared, steps), cwd=ROOT, env=_env(), check=True, capture_output=True,
                          text=True, timeout=900)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _same(got: dict, want: dict, where):
    assert set(got) == set(want), where
    for k, v in want.items():
        if isinstance(v, float) and got[k] is not None:
            assert math.isclose(got[k], v, rel_tol=RTOL, abs_tol=ATOL), (where, k, got[k], v)
        else:
            assert got[k] == v, (where, k, got[k], v)


def _assert_close(got, want):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        _same(g, w, g["step"])


def _interrupt(workdir, shared, sig, lines: int):
    """Start the run and send `sig` once metrics.jsonl holds `lines` lines -> its exit code."""
    log = open(os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}_{sig.name}.log"), "w+")
    proc = subprocess.Popen(_cmd(workdir, shared), cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= lines:
            break
        time.sleep(0.1)
    if proc.poll() is not None:
        log.seek(0)
        raise AssertionError(f"the run ended ({proc.returncode}) before it could be interrupted:\n{log.read()[-5000:]}")
    os.kill(proc.pid, sig)
    return proc.wait(timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    out = _run(workdir, shared).stdout
    metrics = _metrics(workdir)
    # STEPS training steps, then the final held-out evaluation at step STEPS
    assert [m["step"] for m in metrics] == list(range(STEPS + 1))
    assert all("eval/hard/accuracy" in m for m in metrics)  # smoke: eval.every = 1
    assert "| accuracy, hard questions |" in out and "| tool-call rate, easy |" in out
    return dict(workdir=workdir, metrics=metrics,
                base_stamp=os.path.getmtime(os.path.join(shared["base"], "model.safetensors")))


def test_every_stage_leaves_its_output(reference, shared):
    workdir = reference["workdir"]
    before = json.load(open(os.path.join(workdir, "eval_before.json")))
    # The base model's skill table, measured once when it was trained and read back from its manifest.
    manifest = json.load(open(os.path.join(shared["base"], "manifest.json")))
    assert manifest["steps"] == 4 and manifest["history"][-1]["loss"] > 0 and manifest["wall_seconds"] > 0
    assert "launch.train" in manifest["command"] and len(manifest["settings_digest"]) == 12
    for key in ("hard_accuracy_gt_crop", "hard_accuracy_no_crop", "chance", "grounding_choice", "grounding_iou50",
                "grounding_mean_iou", "tool_call_when_asked", "tool_call_aim_iou50", "tool_call_rate_hard",
                "tool_call_rate_easy", "small_object_accuracy"):
        assert 0 <= manifest["skills"][key] <= 1, key
        assert before[f"probe/{key}"] == manifest["skills"][key], key
    assert math.isfinite(before["probe/position_r2"])  # the read-out's R^2 (NaN if a grid axis were constant)
    assert before["all/examples"] == 8
    after = json.load(open(os.path.join(workdir, "eval_after.json")))
    assert set(after) == {k for k in before if "/" in k and not k.startswith("probe/")}
    assert Image.open(os.path.join(workdir, "dynamics.png")).size == (1600, 420)
    examples = sorted(os.listdir(os.path.join(workdir, "examples")))
    assert len(examples) == 2 and all(Image.open(os.path.join(workdir, "examples", e)).width == 900 for e in examples)
    assert "| held-out V*-mini | before RL | after RL |" in open(os.path.join(workdir, "report.md")).read()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.exists(os.path.join(workdir, "export", name)), name
        assert os.path.exists(os.path.join(shared["base"], name)), name


def test_the_refining_cycle_on_a_first_cycle_base_model_gives_the_base_model_trained_whole(reference, shared,
                                                                                             tmp_path):
    """`launch.pretrain_base` without a refining cycle, then `--first_cycle=` that model (only the refining cycle):
    the same weights as the reference run's base model, trained whole in one go (same seeds, same batches)."""
    def pretrain(*flags):
        subprocess.run([sys.executable, "-m", "launch.pretrain_base", "--config=configs/vstar_mini.py:smoke",
                        f"--config.vstar_mini.data_dir={shared['data']}", *flags], cwd=ROOT, env=_env(), check=True,
                       capture_output=True, timeout=900)

    first, refined = str(tmp_path / "first"), str(tmp_path / "refined")
    pretrain("--config.vstar_mini.refine.steps=0", f"--out={first}", f"--workdir={tmp_path / 'w1'}")
    pretrain(f"--first_cycle={first}", f"--out={refined}", f"--workdir={tmp_path / 'w2'}")
    whole = json.load(open(os.path.join(shared["base"], "manifest.json")))
    got = json.load(open(os.path.join(refined, "manifest.json")))
    assert got["settings_digest"] == whole["settings_digest"] and whole["refine"]["steps"] == 2
    assert got["first_cycle"]["directory"] == first and "--config.vstar_mini.refine.steps=0" in got["first_cycle"]["command"]
    assert got["history"] == json.load(open(os.path.join(first, "manifest.json")))["history"]
    assert got["refine"]["history"][-1]["loss"] == pytest.approx(whole["refine"]["history"][-1]["loss"], rel=1e-5)
    want = safetensors.numpy.load_file(os.path.join(shared["base"], "model.safetensors"))
    have = safetensors.numpy.load_file(os.path.join(refined, "model.safetensors"))
    assert set(have) == set(want)
    for name, value in want.items():  # same program, same devices: float32 agreement
        np.testing.assert_allclose(have[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_eval_command_on_a_fresh_split(reference, shared, tmp_path):
    out = tmp_path / "eval.json"
    subprocess.run([sys.executable, "-m", "launch.eval", "--config=configs/vstar_mini.py:smoke",
                    f"--checkpoint={os.path.join(reference['workdir'], 'export')}", "--config.vstar_mini.test_seed=5",
                    f"--config.vstar_mini.data_dir={shared['data']}", f"--out={out}"],
                   cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=900)
    summary = json.load(open(out))
    assert summary["test_seed"] == 5 and 0 <= summary["hard/accuracy"] <= 1 and summary["all/examples"] == 8
    assert len([d for d in os.listdir(os.path.join(shared["data"], "vstar_mini")) if d.startswith("s5_")]) == 1


def test_sigterm_then_sigkill_and_a_corrupt_latest_checkpoint_resume_to_the_same_metrics(tmp_path, reference,
                                                                                           shared):
    """SIGTERM: the run saves and exits 0. Resumed, it is SIGKILLed a step later and its latest checkpoint is
    damaged: the next run sets it aside, falls back to the one before and ends with the uninterrupted metrics."""
    workdir = str(tmp_path)
    assert _interrupt(workdir, shared, signal.SIGTERM, lines=2) == 0
    stopped = len(_metrics(workdir))
    assert 2 <= stopped < STEPS
    assert _interrupt(workdir, shared, signal.SIGKILL, lines=stopped + 1) == -signal.SIGKILL
    ckpt = os.path.join(workdir, "checkpoints")
    latest = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
    damaged = 0
    for root, _, files in os.walk(os.path.join(ckpt, str(latest), "params")):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 64 and "manifest" not in name and not name.endswith(".json"):
                with open(path, "r+b") as f:
                    f.truncate(16)
                damaged += 1
    assert damaged
    _run(workdir, shared)
    _assert_close(_metrics(workdir), reference["metrics"])
    assert os.path.exists(os.path.join(ckpt, f"{latest}.corrupt"))
    # every run of this module reused the one base model
    assert os.path.getmtime(os.path.join(shared["base"], "model.safetensors")) == reference["base_stamp"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(tmp_path, reference, shared):
    workdir, port = str(tmp_path), _free_port()
    # The starting model's evaluation is the reference's (the launcher skips a present eval_before.json): multi-
    # process evaluation is still exercised by every step's and the final held-out evaluation.
    shutil.copy(os.path.join(reference["workdir"], "eval_before.json"), workdir)
    procs = [subprocess.Popen(_cmd(workdir, shared, steps=2) + [
        "--distributed", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={p}"],
        cwd=ROOT, env=_env(devices=4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in (0, 1)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    two = _metrics(workdir)
    want = reference["metrics"]
    # 2 training steps, then the final evaluation (at step 2: the reference's evaluation of the same parameters)
    _assert_close(two[:2], want[:2])
    _assert_close([two[2]], [{k: v for k, v in want[2].items() if k == "step" or k.startswith("eval/")}])
    # one process resumes the 2-process checkpoint (step 2, written by both hosts' shards) to the end
    _run(workdir, shared)
    _assert_close(_metrics(workdir), want)
