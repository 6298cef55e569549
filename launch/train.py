"""DeepEyes GRPO with the zoom-in tool inside the compiled step, on one CPU or a multi-host TPU pod.

  python -m launch.train                                                    # V*-mini (configs/vstar_mini.py)
  python -m launch.train --config=configs/deepeyes_7b.py --workdir=DIR \\
      --config.model.checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.train_dir=/data/deepeyes47k
  python -m launch.train ... --distributed          # every host of a pod runs the same command

1. Mesh, model and tokenizer (a Hugging Face directory or a preset; V*-mini trains its base model first).
2. Held-out evaluation of the starting model (greedy, tool available), plus the experiment's probes.
3. GRPO: each step one program (rollout + reward + advantages + update; with a judge URL, rollout ->
   host judge -> update); every host feeds only its rows; metrics are reduced on device; held-out
   evaluation every eval.every steps; orbax checkpoints; SIGTERM (preemption) saves and exits.
4. Final evaluation, the before/after report, the dynamics plot and the Hugging Face export.
Resumes from the latest good checkpoint in --workdir.
"""

import os
import time

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from deepeyes_jax.models.qwen2_5_vl import save_pretrained
from deepeyes_jax.rl.judge import JudgeConfig
from deepeyes_jax.rl.train_step import OptimConfig
from deepeyes_jax.rollout import tools
from deepeyes_jax.rollout.config import make_templates
from deepeyes_jax.sharding import make_mesh
from deepeyes_jax.train import checkpoints, trainer
from deepeyes_jax.train.checkpoints import CheckpointConfig
from deepeyes_jax.train.config_lib import build
from deepeyes_jax.train.dynamics import plot as plot_dynamics
from deepeyes_jax.train.input_pipeline import PromptBatches
from deepeyes_jax.train.metrics import MetricsWriter
from launch import experiments

config_flags.DEFINE_config_file("config", "configs/vstar_mini.py", "Training configuration.", lock_config=True)
flags.DEFINE_string("workdir", "runs/vstar_mini", "Checkpoints, metrics, evaluations and the export go here "
                    "(on a pod: a directory every host sees).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host: every host runs this).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (default: detected on TPU / SLURM).")
flags.DEFINE_integer("num_processes", None, "Number of processes (default: detected).")
flags.DEFINE_integer("process_id", None, "This process's index (default: detected).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cfg, workdir, t_start = FLAGS.config, FLAGS.workdir, time.perf_counter()
    # ------------------------------------------------------------------ 1. Processes, mesh, model
    if FLAGS.distributed:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    jax.config.update("jax_transfer_guard", "disallow")
    trainer.use_compilation_cache()
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(cfg.mesh)
    exp = experiments.get(cfg, workdir, mesh)
    tokenizer, model = exp.model()
    rules = model.config.axis_rules
    config = trainer.train_config(cfg)
    templates, table = make_templates(tokenizer), trainer.replicated(tools.token_bytes(tokenizer), mesh)
    evaluate = trainer.make_evaluator(model, config, templates, table, mesh, rules)
    eval_source = exp.eval_source()
    eval_rng = trainer.key(cfg.seed + 1, mesh)

    def held_out(params, examples):
        batches = trainer.eval_batches(eval_source, exp.eval, examples=examples, tokenizer=tokenizer, data=exp.data,
                                       crop=config.rollout.crop, reward=config.reward, mesh=mesh, rules=rules)
        return evaluate(params, batches, eval_rng)

    # ------------------------------------------------------------------ 2. The starting model, held out
    before_path = os.path.join(workdir, "eval_before.json")
    if eval_source is not None and not os.path.exists(before_path):
        with jax.transfer_guard("allow"):
            params0 = nnx.state(model)
        before = dict(held_out(params0, exp.eval.final_examples).summary)
        before.update(exp.before_training(model=model, params=params0, tokenizer=tokenizer))
        trainer.save_json(before_path, before)
        logging.info("starting model: %s", before)

    # ------------------------------------------------------------------ 3. GRPO
    step = trainer.Step(model, config, templates, table, tokenizer=tokenizer, optim=build(OptimConfig, cfg.optim),
                        judge=build(JudgeConfig, cfg.judge, where="judge"), mesh=mesh, rules=rules)
    graphdef = nnx.graphdef(model)
    del model  # its arrays now belong to the (donated) train state
    ckpt = checkpoints.Checkpointer.from_config(os.path.join(workdir, "checkpoints"),
                                                build(CheckpointConfig, cfg.checkpoint))
    start, params, opt_state, rng, data_state = trainer.restore_or_init(
        ckpt, step, mesh, rules, trainer.key(cfg.seed, mesh))
    batches = PromptBatches(exp.train_source(), tokenizer=tokenizer, data=exp.data, crop=config.rollout.crop,
                            prompts=cfg.prompts, group_size=config.grpo.group_size, mesh=mesh, rules=rules,
                            reward=config.reward, position=data_state.get("position", 0))
    writer = MetricsWriter(workdir, total_steps=cfg.steps, resume_step=start, active=jax.process_index() == 0)
    checkpoints.install_sigterm_handler()
    for i in range(start, cfg.steps):
        held = None
        if eval_source is not None and exp.eval.every and i % exp.eval.every == 0:
            held = held_out(params, exp.eval.examples).summary
        t0 = time.perf_counter()
        batch, rows = batches.next()
        key = jax.random.fold_in(rng, trainer.replicated(np.uint32(i), mesh))
        params, opt_state, metrics = step(params, opt_state, batch, rows, key)
        metrics = trainer.fetch(metrics)
        seconds = time.perf_counter() - t0
        metrics.update(step_time=seconds, rollout_tokens_per_s=metrics["sampled_tokens"] / seconds,
                       skipped_records=float(batches.skipped))
        metrics.update({f"eval/{k}": v for k, v in (held or {}).items()})
        writer.write(i, metrics)
        stop = checkpoints.preemption_requested(i)
        ckpt.save(i + 1, params, opt_state, rng, batches.state(), force=stop or i + 1 == cfg.steps)
        if stop and i + 1 < cfg.steps:
            logging.warning("preemption requested: saved step %d, exiting", i + 1)
            break
    else:
        # -------------------------------------------------------------- 4. Final evaluation, report, export
        if eval_source is not None:
            result = held_out(params, exp.eval.final_examples)
            trainer.save_json(os.path.join(workdir, "eval_after.json"), result.summary)
            writer.write(cfg.steps, {f"eval/{k}": v for k, v in result.summary.items()})
            report = exp.report(before=trainer.load_json(before_path), after=result.summary, result=result,
                                tokenizer=tokenizer)
            if jax.process_index() == 0:
                with open(os.path.join(workdir, "report.md"), "w") as f:
                    f.write(report + f"\n\nwall time {time.perf_counter() - t_start:.0f} s\n")
                print(report, flush=True)
        if jax.process_index() == 0:
            plot_dynamics(workdir, eval_group=exp.eval_group)
        if cfg.export_hf:
            with jax.transfer_guard("allow"):
                save_pretrained(nnx.merge(graphdef, params), os.path.join(workdir, "export"))
            if jax.process_index() == 0:
                tokenizer.save_pretrained(os.path.join(workdir, "export"))
    ckpt.wait()
    ckpt.close()
    writer.close()


if __name__ == "__main__":
    app.run(main)
