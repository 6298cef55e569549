"""Train the V*-mini base model once, measure its skills and write it where runs start from.

  python -m launch.pretrain_base                        # configs/vstar_mini.py -> deepeyes_jax/vstar_mini/pretrained
  python -m launch.pretrain_base --config.vstar_mini.sft.steps=4000 --out=DIR --workdir=runs/base
  python -m launch.pretrain_base --first_cycle=DIR --out=DIR2   # only the refining cycle, on DIR's base model

1. The V*-mini tokenizer and an untrained tiny Qwen2.5-VL (the config's `vstar_mini.base_model`).
2. The vision stage (`vstar_mini.vision_stage`): the tower alone learns what lies under each image token from
   dense labels, as a real base model's pretrained tower would bring it.
3. The supervised stage (`vstar_mini.tasks`: the separate abilities, never a tool call followed by anything),
   checkpointed every `vstar_mini.sft.save_every` steps under --workdir: rerun the same command to resume.
   --first_cycle=DIR takes steps 1-3 from a finished base model trained for the same settings (without a
   refining cycle), e.g. the one shipped before `vstar_mini.refine` was set.
4. The refining cycle (`vstar_mini.refine`, if steps > 0): a warm restart on its own task mix, checkpointed under
   --workdir/checkpoints/refine.
5. The skill table on held-out scenes (`vstar_mini.skills`).
6. --out: config.json, model.safetensors, tokenizer files and manifest.json (command, steps, wall time, seeds,
   the settings' digest that `launch.train` checks, the skill table). The last line printed is the manifest's
   skill table as JSON.
"""

import json
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from deepeyes_jax.sharding import make_mesh
from deepeyes_jax.train import trainer
from deepeyes_jax.vstar_mini import base_model, skills
from deepeyes_jax.vstar_mini.experiment import SHIPPED_BASE_MODEL, VStarMini

config_flags.DEFINE_config_file("config", "configs/vstar_mini.py", "The V*-mini configuration.", lock_config=True)
flags.DEFINE_string("out", SHIPPED_BASE_MODEL, "Where the finished base model is written.")
flags.DEFINE_string("workdir", "runs/vstar_mini_base", "The supervised stage's checkpoints (resume from here).")
flags.DEFINE_string("first_cycle", "", "A finished base model (no refining cycle) to run only the refining cycle on.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    jax.config.update("jax_transfer_guard", "disallow")
    trainer.use_compilation_cache()
    mesh = make_mesh(FLAGS.config.mesh)
    exp = VStarMini(FLAGS.config, FLAGS.workdir, mesh)
    manifest = base_model.read_manifest(FLAGS.out)
    if manifest is not None:
        logging.info("%s already holds a finished base model; remove it to train again", FLAGS.out)
    else:
        try:
            manifest = exp.pretrain(FLAGS.out, os.path.join(FLAGS.workdir, "checkpoints"), FLAGS.first_cycle)
        except base_model.Interrupted as e:
            raise SystemExit(f"{e}; rerun the same command to resume") from e
    if jax.process_index() == 0:
        for name, label in skills.SKILLS:
            print(f"{label:80s} {manifest['skills'].get(name)}")
        print(json.dumps(manifest["skills"]))


if __name__ == "__main__":
    app.run(main)
