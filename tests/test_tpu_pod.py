"""`launch.tpu.pod --dry_run` prints the exact gcloud commands of each action, in order."""

import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--dry_run", "--name=de", "--project=proj", "--zone=us-east5-a"]


def _remote(cmd):
    """The shell command an ssh line runs on the workers."""
    (arg,) = [a for a in cmd if a.startswith("--command=")]
    return arg.removeprefix("--command=")


def _plan(*args):
    out = subprocess.run([sys.executable, "-m", "launch.tpu.pod", *args], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return [shlex.split(line) for line in out.splitlines()]


def test_up_creates_waits_installs_mounts_and_trains_on_every_worker():
    cmds = _plan("up", *BASE, "--accelerator=v5p-128", "--spot", "--bucket=my-bucket", "--workdir=/mnt/workdir/r1",
                 "--", "--config=configs/deepeyes_7b.py", "--config.model.checkpoint=/mnt/workdir/qwen 7b")
    create, wait, archive, scp, install, mount, train = cmds
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"] and create[5] == "de"
    assert {"--accelerator-type=v5p-128", "--node-id=de", "--spot", "--project=proj", "--zone=us-east5-a"} <= set(create)
    assert "ACTIVE" in wait[-1] and "queued-resources describe de" in wait[-1]
    assert archive[:2] == ["git", "archive"] and "--worker=all" in scp
    for cmd in (install, mount, train):
        assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "de"] and "--worker=all" in cmd
    assert "uv venv --python 3.11" in _remote(install) and "jax[tpu]==0.10.2" in _remote(install)
    assert "gcsfuse --implicit-dirs my-bucket /mnt/workdir" in _remote(mount)
    remote = shlex.split(_remote(train).split("&&", 1)[1])
    assert remote[remote.index("-m") + 1] == "launch.train" and "--distributed" in remote
    assert "--workdir=/mnt/workdir/r1" in remote and "--config.model.checkpoint=/mnt/workdir/qwen 7b" in remote


@pytest.mark.parametrize("action,expect", [("logs", "tail -n 200 -f"), ("stop", "pkill -TERM"),
                                           ("delete", "queued-resources")])
def test_single_actions(action, expect):
    (cmd,) = _plan(action, *BASE)
    assert expect in " ".join(cmd) and "--project=proj" in cmd
    if action == "logs":
        assert "--worker=0" in cmd


def test_unknown_action_and_missing_project_are_refused():
    for args in (["explode", *BASE], ["create", "--dry_run", "--zone=z"]):
        proc = subprocess.run([sys.executable, "-m", "launch.tpu.pod", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode != 0 and ("unknown action" in proc.stderr or "--project" in proc.stderr)
