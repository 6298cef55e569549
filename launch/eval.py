"""Held-out evaluation of a saved model with the run's configuration (greedy, with the zoom tool).

  python -m launch.eval --config=configs/vstar_mini.py --checkpoint=runs/vstar_mini/export
  python -m launch.eval --config=configs/vstar_mini.py --checkpoint=DIR --config.vstar_mini.test_seed=7  # fresh scenes
  python -m launch.eval --config=configs/deepeyes_7b.py --checkpoint=HF_DIR --config.eval.data_dir=DIR

--checkpoint is a Hugging Face directory with its tokenizer (a run's `export/`, V*-mini's `base_model/`, or a
released Qwen2.5-VL). The held-out set is the experiment's (`eval.data_dir` for prepared data). Prints the
summary and writes --out (JSON).
"""

import os

import jax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from deepeyes_jax.rollout import tools
from deepeyes_jax.rollout.config import make_templates
from deepeyes_jax.sharding import make_mesh
from deepeyes_jax.train import model_spec, trainer
from deepeyes_jax.train.config_lib import build
from launch import experiments

config_flags.DEFINE_config_file("config", "configs/vstar_mini.py", "The run's configuration.", lock_config=True)
flags.DEFINE_string("checkpoint", None, "Hugging Face model directory (with tokenizer files).", required=True)
flags.DEFINE_string("out", None, "Where to write the summary JSON (default: CHECKPOINT/eval.json).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cfg, directory = FLAGS.config, FLAGS.checkpoint
    if not os.path.exists(os.path.join(directory, "config.json")):
        raise app.UsageError(f"--checkpoint={directory} has no config.json (expected a Hugging Face directory)")
    jax.config.update("jax_transfer_guard", "disallow")
    trainer.use_compilation_cache()
    mesh = make_mesh(cfg.mesh)
    exp = experiments.get(cfg, directory, mesh)
    source = exp.eval_source()
    if source is None:
        raise app.UsageError("the config has no held-out set: set --config.eval.data_dir")
    spec = build(model_spec.ModelSpec, cfg.model, where="model", checkpoint=directory)
    tokenizer, model = model_spec.load(spec, mesh)
    rules = model.config.axis_rules
    config = trainer.train_config(cfg)
    evaluate = trainer.make_evaluator(model, config, make_templates(tokenizer),
                                      trainer.replicated(tools.token_bytes(tokenizer), mesh), mesh, rules)
    batches = trainer.eval_batches(source, exp.eval, examples=exp.eval.final_examples, tokenizer=tokenizer,
                                   data=exp.data, crop=config.rollout.crop, reward=config.reward, mesh=mesh, rules=rules)
    with jax.transfer_guard("allow"):
        params = nnx.state(model)
    summary = dict(evaluate(params, batches, trainer.key(cfg.seed + 1, mesh)).summary)
    summary.update(exp.describe_eval())
    out = FLAGS.out or os.path.join(directory, "eval.json")
    trainer.save_json(out, summary)
    if jax.process_index() == 0:
        for k, v in summary.items():
            print(f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}")
        print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
