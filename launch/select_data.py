"""DeepEyes' tool-use-oriented data selection (spec 5.3) with the current model: a prepared dataset in, the
selected one out (`deepeyes_jax/train/selection.py`).

  python -m launch.select_data --config=configs/deepeyes_7b.py --checkpoint=HF_DIR --data=PREPARED_DIR \\
      --out_dir=DIR [--k=8]

k sampled rollouts per question (the config's temperature, zoom tool on, batches of `eval.batch` rollouts through
the compiled program): questions answered right in all or none are dropped; a question with a ground-truth box is
then kept only if the model answers it right once its first turn is a zoom on that box. Writes the selected
records as a prepared dataset and `select_report.json`; the last line printed is the report: {"questions", "kept",
"k", "dropped": {reason: n}, "by_source": {...}}.
"""

import json
import os
import sys

import jax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from deepeyes_jax.data import prepared
from deepeyes_jax.rollout import tools
from deepeyes_jax.rollout.config import make_templates
from deepeyes_jax.sharding import make_mesh
from deepeyes_jax.train import model_spec, selection, trainer
from deepeyes_jax.train.config_lib import build
from launch import experiments

config_flags.DEFINE_config_file("config", "configs/deepeyes_7b.py", "The run's configuration.", lock_config=True)
flags.DEFINE_string("checkpoint", None, "Hugging Face model directory (with tokenizer files).", required=True)
flags.DEFINE_string("data", None, "A prepared dataset (launch.prepare_data).", required=True)
flags.DEFINE_string("split", "train", "Its split.")
flags.DEFINE_string("out_dir", None, "Where the selected dataset is written.", required=True)
flags.DEFINE_integer("k", 8, "Sampled rollouts per question.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cfg = FLAGS.config
    if os.path.exists(os.path.join(FLAGS.out_dir, prepared.NAME)):
        raise app.UsageError(f"--out_dir={FLAGS.out_dir} already holds a prepared dataset; choose a new directory")
    if FLAGS.k < 2:
        raise app.UsageError("--k must be at least 2 (all-right / none-right needs several samples)")
    jax.config.update("jax_transfer_guard", "disallow")
    trainer.use_compilation_cache()
    mesh = make_mesh(cfg.mesh)
    exp = experiments.get(cfg, FLAGS.checkpoint, mesh)
    source = prepared.open_split(FLAGS.data, FLAGS.split, max_image_pixels=exp.data.max_image_pixels)
    spec = build(model_spec.ModelSpec, cfg.model, where="model", checkpoint=FLAGS.checkpoint)
    tokenizer, model = model_spec.load(spec, mesh)
    config = trainer.train_config(cfg)
    with jax.transfer_guard("allow"):
        params = nnx.state(model)
    report, kept = selection.select(
        source, tokenizer=tokenizer, model=model, params=params, config=config, templates=make_templates(tokenizer),
        table=trainer.replicated(tools.token_bytes(tokenizer), mesh), data=exp.data, crop=config.rollout.crop,
        reward=config.reward, k=FLAGS.k, batch=exp.eval.batch, mesh=mesh, rules=model.config.axis_rules,
        rng=trainer.key(cfg.seed + 2, mesh))
    report = dict(report, data=FLAGS.data, checkpoint=FLAGS.checkpoint, seed=cfg.seed)
    if jax.process_index() != 0:
        return
    if kept:
        directory = prepared.write(FLAGS.out_dir, {"train": (source.encoded(i) for i in kept)})
        with open(os.path.join(directory, "select_report.json"), "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report))
    if not kept:
        sys.exit("no question was kept: nothing written")


if __name__ == "__main__":
    app.run(main)
