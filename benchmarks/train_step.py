"""Time split of the fused GRPO step, and the update's achieved FLOP/s against this machine's matmul peak.

  python -m benchmarks.train_step [--group=4] [--repeats=3]

The step is one program; the rollout part is timed as the same rollout compiled alone, the update is
the rest. FLOPs come from XLA's cost analysis of the two compiled programs; the peak is the best of a
few fp32 2048^3 matmuls measured in the same run. Uses the scripted multi-turn zoom policy of
deepeyes_jax/testing/scripted.py (a tiny model, so the fraction of peak is low: the point is the split and the trend).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.timing import median_seconds  # noqa: E402
from deepeyes_jax.rl.grpo import GRPOConfig  # noqa: E402
from deepeyes_jax.rl.rewards import SOURCE_TOOL  # noqa: E402
from deepeyes_jax.rl.train_step import (ActorConfig, TrainBatch, TrainConfig, make_optimizer,  # noqa: E402
                                        make_train_step)
from deepeyes_jax.rollout.sampler import make_rollout  # noqa: E402
from deepeyes_jax.testing import scripted  # noqa: E402

flags.DEFINE_integer("group", 4, "Samples per prompt (3 prompts).")
flags.DEFINE_integer("repeats", 3, "Timed runs (median).")
FLAGS = flags.FLAGS


def _flops(compiled):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def _matmul_peak():
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(median_seconds(lambda _: f(a), 1)[0] for _ in range(5))
    return 2 * 2048**3 / best


def main(argv):
    del argv
    setup, model = scripted.fitted()
    rows = [r for r in range(len(scripted.SCRIPTS)) for _ in range(FLAGS.group)]
    rollout_batch = setup.make_batch(rows)
    answers = [b"A", b"B", b"C"]
    gt = np.zeros((len(rows), 8), np.uint8)
    for i, r in enumerate(rows):
        gt[i, :1] = np.frombuffer(answers[r], np.uint8)
    batch = jax.device_put(TrainBatch(rollout_batch, gt, np.ones(len(rows), np.int32),
                                      np.full(len(rows), SOURCE_TOOL, np.int32), np.zeros((len(rows), 4), np.float32),
                                      np.zeros(len(rows), bool)))
    rollout_cfg = setup.rollout_config(temperature=1.0)
    config = TrainConfig(rollout=rollout_cfg, grpo=GRPOConfig(group_size=FLAGS.group),
                         actor=ActorConfig(logprob_chunk=128))

    rollout, params = make_rollout(model, rollout_cfg, setup.templates, setup.table)
    key = jax.random.key(0)
    rollout_compiled = rollout.jitted.lower(params, batch.rollout, key, setup.table).compile()
    rollout_s = median_seconds(lambda i: rollout(params, batch.rollout, jax.random.key(i)).tokens, FLAGS.repeats)[0]

    step, params, opt_state = make_train_step(model, make_optimizer(1e-6), config, setup.templates, setup.table)
    step_compiled = step.jitted.lower(params, opt_state, batch, key, setup.table, None).compile()
    state = {"params": params, "opt": opt_state}

    def run(i):
        state["params"], state["opt"], metrics, traj, _ = step(state["params"], state["opt"], batch,
                                                              jax.random.key(i))
        state["tokens"] = int(traj.response_length.sum())
        return metrics["loss"]

    run(0)
    step_s = median_seconds(run, FLAGS.repeats)[0]
    update_s = max(step_s - rollout_s, 1e-9)
    update_flops = _flops(step_compiled) - _flops(rollout_compiled)
    peak = _matmul_peak()
    mem = step_compiled.memory_analysis()
    print(f"jax {jax.__version__}, {os.cpu_count()} CPU cores, fp32; batch {len(rows)} "
          f"({len(scripted.SCRIPTS)} prompts x {FLAGS.group}), up to {rollout_cfg.max_turns} turns")
    print(f"fused step {1e3 * step_s:8.1f} ms = rollout {1e3 * rollout_s:8.1f} ms ({100 * rollout_s / step_s:4.1f}%)"
          f" + update {1e3 * update_s:8.1f} ms ({100 * update_s / step_s:4.1f}%); {state['tokens']} sampled tokens")
    print(f"update: {update_flops / 1e9:.2f} GFLOP (XLA cost analysis), {update_flops / update_s / 1e9:.2f} GFLOP/s "
          f"= {100 * update_flops / update_s / peak:.1f}% of the measured matmul peak {peak / 1e9:.1f} GFLOP/s")
    if mem is not None:
        print(f"step program memory: temp {mem.temp_size_in_bytes / 2**20:.1f} MiB, arguments "
              f"{mem.argument_size_in_bytes / 2**20:.1f} MiB, outputs {mem.output_size_in_bytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    app.run(main)
