"""Held-out V*-mini evaluation of a saved model (greedy, with the zoom tool).

  python -m launch.eval --config=configs/vstar_mini.py --checkpoint=runs/vstar_mini/export
  python -m launch.eval --config=configs/vstar_mini.py --checkpoint=DIR --config.eval.seed=7   # fresh scenes

--checkpoint is a Hugging Face directory written by this project (config.json, safetensors, tokenizer):
a run's `export/` or `base_model/`. With eval.seed >= 0 the test split is generated anew from that seed,
so a result can be checked on scenes nobody tuned on. Prints the summary and writes --out (JSON).
"""

import os

import jax
import transformers
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from deepeyes_jax.eval import vstar_mini as ev
from deepeyes_jax.models.qwen2_5_vl import from_pretrained
from deepeyes_jax.rollout import tools
from deepeyes_jax.rollout.config import make_templates
from deepeyes_jax.sharding import make_mesh
from deepeyes_jax.train import vstar_mini_run as run

config_flags.DEFINE_config_file("config", "configs/vstar_mini.py", "The run's configuration.", lock_config=True)
flags.DEFINE_string("checkpoint", None, "Hugging Face model directory (with tokenizer files).", required=True)
flags.DEFINE_string("out", None, "Where to write the summary JSON (default: CHECKPOINT/eval_seed<seed>.json).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cfg, directory = FLAGS.config, FLAGS.checkpoint
    if not os.path.exists(os.path.join(directory, "config.json")):
        raise app.UsageError(f"--checkpoint={directory} has no config.json (expected a run's export/ or base_model/)")
    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("DEEPEYES_JAX_CACHE", os.path.expanduser("~/.cache/deepeyes_jax/xla")))
    mesh = make_mesh(cfg.mesh)
    put = lambda tree: jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))  # noqa: E731

    test = run.load_data(cfg, test_seed=cfg.eval.seed)["test"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = from_pretrained(directory, mesh=mesh, dtype=run.model_config(cfg).dtype)
    evaluate = run.make_evaluator(model, cfg, make_templates(tokenizer), put(tools.token_bytes(tokenizer)))
    batches = run.eval_batches(cfg, tokenizer, test, min(cfg.eval.final_examples, len(test)), put)
    summary, _, _ = ev.evaluate(evaluate, nnx.state(model), batches, put(jax.random.key(cfg.seed + 1)))
    summary["test_seed"] = cfg.eval.seed if cfg.eval.seed >= 0 else cfg.data.seed
    out = FLAGS.out or os.path.join(directory, f"eval_seed{summary['test_seed']}.json")
    run.save_json(out, summary)
    for k, v in summary.items():
        print(f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}")
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
