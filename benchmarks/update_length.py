"""The GRPO step's time split at a run's real shapes, with the update at rollout.max_total_len vs trimmed to
the shortest length bucket that holds the batch (`ActorConfig.length_buckets`).

  python -m benchmarks.update_length [--config=configs/vstar_mini.py] [--buckets=256,320,384,448,512] [--repeats=3]

One training batch of a V*-mini config (`prompts` x `grpo.group_size` rows, its starting model: the shipped
base model) is sampled once by the rollout + reward program (timed); the update
program then runs on those same trajectories at full length and with the buckets (timed, median of
--repeats, each on fresh copies of the parameters), and so does the fused one-program step (rollout + update)
both ways. Prints the split, the used slots and the ratios; the bucketed and full updates give the same
parameters (max difference printed).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks.timing import median_seconds  # noqa: E402
from deepeyes_jax.rl.train_step import OptimConfig, optimizer, programs  # noqa: E402
from deepeyes_jax.rollout import tools  # noqa: E402
from deepeyes_jax.rollout.config import make_templates  # noqa: E402
from deepeyes_jax.sharding import make_mesh  # noqa: E402
from deepeyes_jax.train import trainer  # noqa: E402
from deepeyes_jax.train.config_lib import build  # noqa: E402
from deepeyes_jax.train.input_pipeline import PromptBatches  # noqa: E402
from deepeyes_jax.vstar_mini.experiment import VStarMini  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/vstar_mini.py", "The run's configuration.", lock_config=True)
flags.DEFINE_list("buckets", ["256", "320", "384", "448", "512"], "Update lengths to compare with the full one.")
flags.DEFINE_integer("repeats", 3, "Timed runs (median).")
flags.DEFINE_string("workdir", "/tmp/benchmark_update_length", "Scratch directory of the experiment.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cfg = FLAGS.config
    trainer.use_compilation_cache()
    mesh = make_mesh(cfg.mesh)
    exp = VStarMini(cfg, FLAGS.workdir, mesh)
    tokenizer, model = exp.model()
    rules = model.config.axis_rules
    full = trainer.train_config(cfg)
    config = {"full": dataclasses.replace(full, actor=dataclasses.replace(full.actor, length_buckets=())),
              "buckets": dataclasses.replace(full, actor=dataclasses.replace(
                  full.actor, length_buckets=tuple(sorted(int(b) for b in FLAGS.buckets))))}
    templates, table = make_templates(tokenizer), trainer.replicated(tools.token_bytes(tokenizer), mesh)
    tx = optimizer(build(OptimConfig, cfg.optim))
    graphdef, params = nnx.split(model)
    with jax.transfer_guard("allow"):
        opt_state = tx.init(params)
    progs = {k: programs(graphdef, c, templates, tx) for k, c in config.items()}
    batches = PromptBatches(exp.train_source(), tokenizer=tokenizer, data=exp.data, crop=full.rollout.crop,
                            prompts=cfg.prompts, group_size=full.grpo.group_size, mesh=mesh, rules=rules,
                            reward=full.reward)
    batch, _ = batches.next()
    key = trainer.key(cfg.seed, mesh)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (the programs donate params / opt_state)

    score = progs["full"]["rollout_and_score"]
    score(params, batch, key, table)  # compile
    rollout_s, (traj, sc) = median_seconds(lambda i: score(params, batch, key, table), FLAGS.repeats)
    used = int(np.max(np.asarray(traj.length)))
    results = {}
    for name, prog in progs.items():
        update = lambda i, prog=prog: prog["update"](copy(params), copy(opt_state), traj, sc, batch.box,  # noqa: E731
                                                     batch.has_box, None)
        update(0)  # compile
        update_s, out = median_seconds(update, FLAGS.repeats)
        step = lambda i, prog=prog: prog["train_step"](copy(params), copy(opt_state), batch, key, table,  # noqa: E731
                                                       None)[2]["loss"]
        step(0)  # compile
        step_s, _ = median_seconds(step, FLAGS.repeats)
        results[name] = (update_s, step_s, out[0], int(out[2]["update_length"]))
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(results["full"][2]), jax.tree.leaves(results["buckets"][2])))
    rows, s = batch.answer.shape[0], traj.tokens.shape[1]
    print(f"jax {jax.__version__}, {os.cpu_count()} CPU cores; {rows} trajectories ({cfg.prompts} prompts x "
          f"{full.grpo.group_size}), {int(np.sum(np.asarray(traj.response_length)))} sampled tokens, longest "
          f"trajectory {used} of {s} slots; buckets {config['buckets'].actor.length_buckets}")
    print(f"rollout + reward program: {rollout_s:7.2f} s")
    for name, (update_s, step_s, _, length) in results.items():
        print(f"update at {length:4d} slots ({name:7s}): {update_s:7.2f} s; fused step {step_s:7.2f} s "
              f"(rollout share {100 * min(rollout_s / step_s, 1):4.1f}%)")
    (u_full, s_full, _, _), (u_b, s_b, _, _) = results["full"], results["buckets"]
    print(f"update speed-up {u_full / u_b:.2f}x, fused step speed-up {s_full / s_b:.2f}x; "
          f"max |param difference| {diff:.2e}")


if __name__ == "__main__":
    app.run(main)
