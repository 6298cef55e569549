"""Run the launcher on a Cloud TPU slice (v5p, v6e, ...): every worker runs the same command.

  python -m launch.tpu.pod create  --name=deepeyes --project=P --zone=us-east5-a --accelerator=v5p-128
  python -m launch.tpu.pod setup   --name=deepeyes --project=P --zone=us-east5-a [--bucket=B]
  python -m launch.tpu.pod train   --name=deepeyes --project=P --zone=us-east5-a --workdir=/mnt/workdir/run1 -- \\
      --config=configs/deepeyes_7b.py --config.model.checkpoint=/mnt/workdir/Qwen2.5-VL-7B-Instruct \\
      --config.data.train_dir=/mnt/workdir/deepeyes47k
  python -m launch.tpu.pod logs    --name=deepeyes ...        # follow worker 0's log
  python -m launch.tpu.pod stop    --name=deepeyes ...        # SIGTERM on every worker: checkpoint and exit
  python -m launch.tpu.pod delete  --name=deepeyes ...
  python -m launch.tpu.pod up ...  -- TRAIN FLAGS              # create, wait until ACTIVE, setup, train
Add --dry_run to print the exact commands instead of running them.

create: a queued resource (`gcloud compute tpus queued-resources create`), optionally --spot.
setup: this checkout (`git archive HEAD`) is copied to every worker; Python 3.11 and the pinned stack plus
  jax[tpu] are installed in ~/venv with uv (TPU VM images ship Python 3.10); with --bucket the GCS bucket is
  mounted with gcsfuse at /mnt/workdir on every worker, so all hosts share checkpoints and data.
train: starts `python -m launch.train --distributed --workdir=...` on every worker (`--worker=all`), detached,
  logging to ~/deepeyes_train.log. `jax.distributed.initialize()` needs no address on Cloud TPU: it reads the
  slice's topology from the TPU metadata. The workdir must be visible to every host (the mounted bucket).
"""

from __future__ import annotations

import shlex
import subprocess
import sys

from absl import app, flags

flags.DEFINE_string("name", "deepeyes", "Queued resource / TPU VM name.")
flags.DEFINE_string("project", None, "GCP project.")
flags.DEFINE_string("zone", None, "Zone (e.g. us-east5-a for v5p, us-east5-b / europe-west4-a for v6e).")
flags.DEFINE_string("accelerator", "v5p-128", "Accelerator type; v5p counts TensorCores, 2 per chip: v5p-128 is "
                    "64 chips (topology 4x4x4). `gcloud compute tpus accelerator-types list` has the rest.")
flags.DEFINE_string("runtime", "v2-alpha-tpuv5", "TPU VM runtime version (v6e: v2-alpha-tpuv6e).")
flags.DEFINE_bool("spot", False, "Request spot capacity (preemptible: the run checkpoints on SIGTERM).")
flags.DEFINE_string("bucket", None, "GCS bucket mounted at /mnt/workdir on every worker (gcsfuse).")
flags.DEFINE_string("workdir", "/mnt/workdir/run", "Run directory, visible to every worker.")
flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")
FLAGS = flags.FLAGS

JAX_VERSION = "0.10.2"
ARCHIVE = "/tmp/deepeyes_jax.tgz"
LOG = "~/deepeyes_train.log"
MOUNT = "/mnt/workdir"


def _gcloud(*args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", *args, f"--project={FLAGS.project}", f"--zone={FLAGS.zone}"]


def _ssh(command: str, worker: str = "all") -> list[str]:
    return _gcloud("tpu-vm", "ssh", FLAGS.name, f"--worker={worker}", f"--command={command}")


def create() -> list[list[str]]:
    cmd = _gcloud("queued-resources", "create", FLAGS.name, f"--node-id={FLAGS.name}",
                  f"--accelerator-type={FLAGS.accelerator}", f"--runtime-version={FLAGS.runtime}")
    return [cmd + (["--spot"] if FLAGS.spot else [])]


def wait() -> list[list[str]]:
    describe = " ".join(map(shlex.quote, _gcloud("queued-resources", "describe", FLAGS.name,
                                                "--format=value(state.state)")))
    return [["bash", "-c", f"until [ \"$({describe})\" = ACTIVE ]; do sleep 30; done"]]


def setup() -> list[list[str]]:
    install = " && ".join([
        "rm -rf ~/deepeyes-jax && mkdir -p ~/deepeyes-jax && tar xzf ~/deepeyes_jax.tgz -C ~/deepeyes-jax",
        "(command -v uv || curl -LsSf https://astral.sh/uv/install.sh | sh)",
        "~/.local/bin/uv venv --python 3.11 ~/venv",
        f"~/.local/bin/uv pip install --python ~/venv/bin/python -r ~/deepeyes-jax/requirements.txt "
        f"'jax[tpu]=={JAX_VERSION}' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"])
    cmds = [["git", "archive", "--format=tar.gz", f"--output={ARCHIVE}", "HEAD"],
            _gcloud("tpu-vm", "scp", ARCHIVE, f"{FLAGS.name}:~/deepeyes_jax.tgz", "--worker=all"),
            _ssh(install)]
    if FLAGS.bucket:
        mount = " && ".join([
            "(command -v gcsfuse || (export GCSFUSE_REPO=gcsfuse-$(lsb_release -c -s) && "
            "echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt "
            "$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && "
            "curl https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc && "
            "sudo apt-get update && sudo apt-get install -y gcsfuse))",
            f"sudo mkdir -p {MOUNT} && sudo chown $USER {MOUNT}",
            f"(mountpoint -q {MOUNT} || gcsfuse --implicit-dirs {shlex.quote(FLAGS.bucket)} {MOUNT})"])
        cmds.append(_ssh(mount))
    return cmds


def train(args: list[str]) -> list[list[str]]:
    launcher = " ".join(["~/venv/bin/python", "-m", "launch.train", "--distributed",
                         f"--workdir={shlex.quote(FLAGS.workdir)}", *map(shlex.quote, args)])
    env = f"DEEPEYES_JAX_CACHE={MOUNT}/xla_cache" if FLAGS.bucket else "DEEPEYES_JAX_CACHE=~/.cache/deepeyes_jax/xla"
    return [_ssh(f"cd ~/deepeyes-jax && {env} nohup {launcher} > {LOG} 2>&1 &")]


def logs() -> list[list[str]]:
    return [_ssh(f"tail -n 200 -f {LOG}", worker="0")]


def stop() -> list[list[str]]:
    return [_ssh("pkill -TERM -f 'launch.train' || true")]


def delete() -> list[list[str]]:
    return [_gcloud("queued-resources", "delete", FLAGS.name, "--force", "--quiet")]


def plan(action: str, args: list[str]) -> list[list[str]]:
    steps = {"create": create, "wait": wait, "setup": setup, "logs": logs, "stop": stop, "delete": delete,
             "train": lambda: train(args), "up": lambda: create() + wait() + setup() + train(args)}
    if action not in steps:
        raise app.UsageError(f"unknown action {action!r}; choose one of {sorted(steps)}")
    if args and action not in ("train", "up"):
        raise app.UsageError(f"{action} takes no launcher flags, got {args}")
    return steps[action]()


def main(argv):
    if len(argv) < 2:
        raise app.UsageError("usage: python -m launch.tpu.pod ACTION [--flags] [-- launcher flags]")
    if not FLAGS.project or not FLAGS.zone:
        raise app.UsageError("--project and --zone are required")
    for cmd in plan(argv[1], argv[2:]):
        print(" ".join(map(shlex.quote, cmd)), flush=True)
        if not FLAGS.dry_run:
            code = subprocess.call(cmd)
            if code:
                sys.exit(code)


if __name__ == "__main__":
    app.run(main)
