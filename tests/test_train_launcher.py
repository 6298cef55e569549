"""`python -m launch.train` end to end: killed (SIGTERM, SIGKILL) and resumed runs reproduce an
uninterrupted run's metrics; a corrupt latest checkpoint falls back to the previous one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
TIMING = ("step_time", "rollout_tokens_per_s")


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""  # one CPU device: the run itself is what is under test here
    return env


def _cmd(workdir, steps=STEPS):
    return [sys.executable, "-m", "launch.train", f"--workdir={workdir}", f"--config.steps={steps}"]


def _run(workdir, steps=STEPS):
    subprocess.run(_cmd(workdir, steps), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=900)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _interrupt(workdir, sig):
    proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
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
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    _run(workdir)
    metrics = _metrics(workdir)
    assert [m["step"] for m in metrics] == list(range(STEPS))
    assert os.path.exists(os.path.join(workdir, "export", "config.json"))
    return metrics


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 0), (signal.SIGKILL, -signal.SIGKILL)])
def test_interrupted_run_resumes_to_the_same_metrics(tmp_path, reference, sig, code):
    workdir = str(tmp_path)
    assert _interrupt(workdir, sig) == code
    done = _metrics(workdir)
    assert 2 <= len(done) < STEPS
    _run(workdir)
    assert _metrics(workdir) == reference


def test_corrupt_latest_checkpoint_falls_back(tmp_path, reference):
    workdir = str(tmp_path)
    _run(workdir)
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
    _run(workdir, steps=STEPS + 1)
    metrics = _metrics(workdir)
    assert [m["step"] for m in metrics] == list(range(STEPS + 1))
    assert metrics[:STEPS] == reference
    assert os.path.exists(os.path.join(ckpt, f"{latest}.corrupt"))
