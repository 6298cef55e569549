"""`python -m launch.train` end to end on the V*-mini smoke config (every stage: dataset build, supervised
base model, held-out evaluation and perception probe, fused GRPO steps, report, plot, renderings, HF
export, `launch.eval`); killed (SIGTERM, SIGKILL) and resumed runs reproduce an uninterrupted run's
metrics; a corrupt latest checkpoint falls back to the previous one."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
TIMING = ("step_time", "rollout_tokens_per_s")


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""  # one CPU device: the run itself is what is under test here
    return env


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Dataset and base model directories shared by every run of this module (built by the first)."""
    root = tmp_path_factory.mktemp("shared")
    return dict(data=str(root / "tfds"), base=str(root / "base_model"))


def _cmd(workdir, shared, steps=STEPS):
    return [sys.executable, "-m", "launch.train", "--config=configs/vstar_mini.py:smoke", f"--workdir={workdir}",
            f"--config.steps={steps}", f"--config.data.data_dir={shared['data']}",
            f"--config.base_model_dir={shared['base']}"]


def _run(workdir, shared, steps=STEPS):
    return subprocess.run(_cmd(workdir, shared, steps), cwd=ROOT, env=_env(), check=True, capture_output=True,
                          text=True, timeout=900)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _interrupt(workdir, shared, sig):
    proc = subprocess.Popen(_cmd(workdir, shared), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be interrupted"
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
    return dict(workdir=workdir, metrics=metrics)


def test_every_stage_leaves_its_output(reference, shared):
    workdir = reference["workdir"]
    before = json.load(open(os.path.join(workdir, "eval_before.json")))
    for key in ("hard/accuracy", "easy/tool_call_rate", "probe/no_crop", "probe/gt_crop", "probe/chance",
                "probe/grounding", "probe/grounding_chance", "probe/small_object_accuracy"):
        assert 0 <= before[key] <= 1, key
    assert math.isfinite(before["probe/position_r2"])  # the read-out's R^2 (NaN if a grid axis were constant)
    assert before["sft"]["steps"] == 4 and before["sft"]["history"][-1]["loss"] > 0
    after = json.load(open(os.path.join(workdir, "eval_after.json")))
    assert set(after) == {k for k in before if "/" in k and not k.startswith("probe/")}
    assert Image.open(os.path.join(workdir, "dynamics.png")).size == (1600, 420)
    examples = sorted(os.listdir(os.path.join(workdir, "examples")))
    assert len(examples) == 2 and all(Image.open(os.path.join(workdir, "examples", e)).width == 900 for e in examples)
    assert "| held-out V*-mini | before RL | after RL |" in open(os.path.join(workdir, "report.md")).read()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.exists(os.path.join(workdir, "export", name)), name
        assert os.path.exists(os.path.join(shared["base"], name)), name


def test_eval_command_on_a_fresh_split(reference, shared, tmp_path):
    out = tmp_path / "eval.json"
    subprocess.run([sys.executable, "-m", "launch.eval", "--config=configs/vstar_mini.py:smoke",
                    f"--checkpoint={os.path.join(reference['workdir'], 'export')}", "--config.eval.seed=5",
                    f"--config.data.data_dir={shared['data']}", f"--out={out}"],
                   cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=900)
    summary = json.load(open(out))
    assert summary["test_seed"] == 5 and 0 <= summary["hard/accuracy"] <= 1
    assert len([d for d in os.listdir(os.path.join(shared["data"], "vstar_mini")) if d.startswith("s5_")]) == 1


def test_base_model_is_reused(reference, shared, tmp_path):
    stamp = os.path.getmtime(os.path.join(shared["base"], "model.safetensors"))
    _run(str(tmp_path), shared, steps=1)
    assert os.path.getmtime(os.path.join(shared["base"], "model.safetensors")) == stamp


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 0), (signal.SIGKILL, -signal.SIGKILL)])
def test_interrupted_run_resumes_to_the_same_metrics(tmp_path, reference, shared, sig, code):
    workdir = str(tmp_path)
    assert _interrupt(workdir, shared, sig) == code
    done = _metrics(workdir)
    assert 2 <= len(done) < STEPS
    _run(workdir, shared)
    assert _metrics(workdir) == reference["metrics"]


def test_corrupt_latest_checkpoint_falls_back(tmp_path, reference, shared):
    workdir = str(tmp_path)
    _run(workdir, shared)
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
    _run(workdir, shared, steps=STEPS + 1)
    metrics = _metrics(workdir)
    assert [m["step"] for m in metrics] == list(range(STEPS + 2))
    assert metrics[:STEPS] == reference["metrics"][:STEPS]
    assert os.path.exists(os.path.join(ckpt, f"{latest}.corrupt"))
