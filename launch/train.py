"""V*-mini: supervised base model, then GRPO with the zoom-in tool inside the compiled step.

  python -m launch.train [--config=configs/vstar_mini.py[:smoke]] [--workdir=runs/vstar_mini] [--config.x=...]

1. Build (first use) or open the V*-mini TFDS dataset.
2. Load the base model from WORKDIR/base_model, or train it with the supervised stage and save it there.
3. Evaluate on the held-out split (greedy, tool available); probe perception with/without the GT crop,
   grounding, and what the image tokens linearly encode (position, small objects).
4. GRPO: rollout + reward + advantages + update as one program per step; held-out eval every eval.every.
5. Print the before/after table; write dynamics.png, examples/*.png, eval_*.json, export/ (HF checkpoint).
Resumes from the latest good checkpoint in --workdir; SIGTERM saves and exits.
"""

import itertools
import json
import os
import time

import jax
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from deepeyes_jax.eval import vstar_mini as ev
from deepeyes_jax.eval.feature_probe import linear_readout
from deepeyes_jax.models.qwen2_5_vl import save_pretrained
from deepeyes_jax.rl.train_step import make_optimizer, make_train_step
from deepeyes_jax.rollout import tools
from deepeyes_jax.rollout.config import make_templates
from deepeyes_jax.sft import base_model
from deepeyes_jax.sft.step import make_scorer
from deepeyes_jax.sharding import make_mesh
from deepeyes_jax.train import checkpoints
from deepeyes_jax.train import vstar_mini_run as run
from deepeyes_jax.train.metrics import MetricsWriter
from deepeyes_jax.eval.dynamics import plot as plot_dynamics

config_flags.DEFINE_config_file("config", "configs/vstar_mini.py", "Training configuration.", lock_config=True)
flags.DEFINE_string("workdir", "runs/vstar_mini", "Checkpoints, metrics, the base model and the export go here.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cfg, workdir, t_start = FLAGS.config, FLAGS.workdir, time.perf_counter()
    if cfg.distributed:
        jax.distributed.initialize()
    jax.config.update("jax_transfer_guard", "disallow")
    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("DEEPEYES_JAX_CACHE", os.path.expanduser("~/.cache/deepeyes_jax/xla")))
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(cfg.mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    put = lambda tree: jax.device_put(tree, replicated)  # noqa: E731

    # ------------------------------------------------------------------ 1. Data
    splits = run.load_data(cfg)

    # ------------------------------------------------------------------ 2. Base model
    tokenizer, model, sft_report = base_model.load_or_train(
        cfg.base_model_dir or os.path.join(workdir, "base_model"), model_config=run.model_config(cfg),
        vocab_size=cfg.tokenizer_vocab, source=splits["train"], budgets=run.budgets(cfg),
        shapes=run.sft_shapes(cfg), sft=cfg.sft, mesh=mesh, put=put, seed=cfg.seed)
    graphdef = nnx.graphdef(model)
    templates = make_templates(tokenizer)
    with jax.transfer_guard("allow"):
        table = put(tools.token_bytes(tokenizer))
        eval_rng = put(jax.random.key(cfg.seed + 1))
    evaluate = run.make_evaluator(model, cfg, templates, table)
    final_held_out = run.eval_batches(cfg, tokenizer, splits["test"], cfg.eval.final_examples, put)
    held_out = run.eval_prefix(cfg, final_held_out)

    # ------------------------------------------------------------------ 3. Base model on the held-out split
    before_path = os.path.join(workdir, "eval_before.json")
    if not os.path.exists(before_path):
        with jax.transfer_guard("allow"):
            params0 = nnx.state(model)
        before, _, _ = ev.evaluate(evaluate, params0, final_held_out, eval_rng)
        test = splits["test"]
        hard = list(itertools.islice((ex for ex in (test[i] for i in range(len(test))) if ex["hard"]),
                                     cfg.eval.probe_examples))
        probe = ev.perception_probe(make_scorer(model), params0, hard, tokenizer,
                                    run.budgets(cfg), run.sft_shapes(cfg)._replace(seq_len=cfg.rollout.max_total_len),
                                    batch=cfg.eval.batch, put=put)
        probe.update(linear_readout(model, [test[i] for i in range(min(len(test), cfg.eval.probe_examples))],
                                    cfg.data.scene_max_pixels, put))
        before.update({f"probe/{k}": v for k, v in probe.items()})
        run.save_json(before_path, dict(before, sft=sft_report))
        logging.info("base model: %s", before)

    # ------------------------------------------------------------------ 4. GRPO
    o = cfg.optim
    tx = make_optimizer(optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1)),
                        weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm)
    with jax.transfer_guard("allow"):
        step_fn, params, opt_state = make_train_step(model, tx, run.train_config(cfg), templates, table)
    del model  # its arrays now belong to the (donated) train state
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=cfg.checkpoint.save_every,
                                    keep=cfg.checkpoint.keep)
    abstract = checkpoints.abstract_params(params, mesh, run.model_config(cfg).axis_rules)
    with jax.transfer_guard("allow"):
        restored = ckpt.restore(abstract_params=abstract,
                                abstract_opt_state=checkpoints.abstract_opt_state(tx, abstract))
        rng = put(jax.random.key(cfg.seed))
    start, data_state = 0, None
    if restored is not None:
        start, params, opt_state, rng, data_state = restored
        logging.info("resumed from step %d (data position %s)", start, data_state)
    else:  # lay the fresh state out exactly as a restored one, so the step compiles once either way
        shardings = lambda tree: jax.tree.map(lambda a: a.sharding, tree)  # noqa: E731
        params = jax.device_put(params, shardings(abstract))
        opt_state = jax.device_put(opt_state, shardings(checkpoints.abstract_opt_state(tx, abstract)))
    stream = run.prompt_stream(cfg, tokenizer, splits["train"], prompts=cfg.prompts, group_size=cfg.grpo.group_size,
                               state=data_state)
    writer = MetricsWriter(workdir, total_steps=cfg.steps, resume_step=start, active=jax.process_index() == 0)
    checkpoints.install_sigterm_handler()
    for step in range(start, cfg.steps):
        if step % cfg.eval.every == 0:
            summary, _, _ = ev.evaluate(evaluate, params, held_out, eval_rng)
        host_batch, rows = stream.next_batch()
        t0 = time.perf_counter()
        key = jax.random.fold_in(rng, put(np.uint32(step)))
        params, opt_state, metrics, traj, _ = step_fn(params, opt_state, put(host_batch), key)
        metrics, traj = jax.device_get((metrics, traj))
        seconds = time.perf_counter() - t0
        metrics = {k: float(v) for k, v in metrics.items()}
        iou = ev.box_iou(traj.turn_bbox, np.array([r["box"] for r in rows], np.float32)[:, None])
        zoomed = traj.turn_status == tools.STATUS_ZOOM
        metrics.update(step_time=seconds, rollout_tokens_per_s=metrics["sampled_tokens"] / seconds,
                       grounding_iou=float(iou[zoomed].mean()) if zoomed.any() else float("nan"),
                       skipped_records=float(stream.skipped))
        if step % cfg.eval.every == 0:
            metrics.update({f"eval/{k}": v for k, v in summary.items()})
        writer.write(step, metrics)
        last = step + 1 == cfg.steps or checkpoints.preemption_requested(step)
        ckpt.save(step + 1, params, opt_state, rng, stream.state(), force=last)
        if step + 1 < cfg.steps and checkpoints.preemption_requested(step):
            logging.warning("preemption requested: saved step %d, exiting", step + 1)
            break
    else:
        # -------------------------------------------------------------- 5. Final evaluation and report
        after, records, outputs = ev.evaluate(evaluate, params, final_held_out, eval_rng)
        run.save_json(os.path.join(workdir, "eval_after.json"), after)
        writer.write(cfg.steps, {f"eval/{k}": v for k, v in after.items()})
        run.render_examples(outputs, records, splits["test"], tokenizer, os.path.join(workdir, "examples"),
                            cfg.eval.render)
        plot_dynamics(workdir)
        with open(os.path.join(workdir, "eval_before.json")) as f:
            before = json.load(f)
        report = run.table(before, after)
        with open(os.path.join(workdir, "report.md"), "w") as f:
            f.write(report + f"\n\nwall time {time.perf_counter() - t_start:.0f} s\n")
        print(report, flush=True)
        if cfg.export_hf:
            with jax.transfer_guard("allow"):
                save_pretrained(nnx.merge(graphdef, params), os.path.join(workdir, "export"))
            tokenizer.save_pretrained(os.path.join(workdir, "export"))
    ckpt.wait()
    ckpt.close()
    writer.close()


if __name__ == "__main__":
    app.run(main)
