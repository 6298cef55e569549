"""Held-out evaluation of a saved model with the run's configuration (greedy, with the zoom tool).

  python -m launch.eval --config=configs/vstar_mini.py --checkpoint=runs/vstar_mini/export
  python -m launch.eval --config=configs/vstar_mini.py --checkpoint=DIR --config.vstar_mini.test_seed=7  # fresh scenes
  python -m launch.eval --config=configs/deepeyes_7b.py --checkpoint=HF_DIR --config.eval.data_dir=DIR

--checkpoint is a Hugging Face directory with its tokenizer (a run's `export/`, V*-mini's `base_model/`, or a
released Qwen2.5-VL). The held-out set is the experiment's (`eval.data_dir` for prepared data). Prints the
summary and writes --out (JSON).

Published benchmarks (`data/benchmarks.py`: their own layouts, DeepEyes' prompts, options shuffled by --seed):

  python -m launch.eval --config=configs/deepeyes_7b.py --checkpoint=HF_DIR --benchmark=vstar --data=vstar_bench
  python -m launch.eval --config=configs/deepeyes_7b.py --checkpoint=HF_DIR --benchmark=hrbench \
      --data=hr_bench_4k.tsv --k=4 --seed=0

greedy through the same compiled rollout as training (batches of `eval.batch` questions, the config's turn and
length limits), avg@k over k option shuffles, accuracy per category and overall (V*: over every question; HR-Bench:
the mean of single and cross, as DeepEyes), tool-call rate and zooms per question. Writes --out (JSON) and a
markdown table beside it; the last line printed is {"benchmark", "n", "k", "overall", "per_category",
"tool_call_rate", "zooms_per_question"}. With --judge_url every rule-marked-wrong answer goes to the LLM judge
(the JSON keeps `rule_accuracy` and the judge's counts).
"""

import dataclasses
import json
import os

import jax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from deepeyes_jax.data import benchmarks
from deepeyes_jax.eval import evaluator
from deepeyes_jax.rl.judge import JudgeClient, JudgeConfig
from deepeyes_jax.rollout import tools
from deepeyes_jax.rollout.config import make_templates
from deepeyes_jax.sharding import make_mesh
from deepeyes_jax.train import model_spec, trainer
from deepeyes_jax.train.config_lib import build
from launch import experiments

config_flags.DEFINE_config_file("config", "configs/vstar_mini.py", "The run's configuration.", lock_config=True)
flags.DEFINE_string("checkpoint", None, "Hugging Face model directory (with tokenizer files).", required=True)
flags.DEFINE_string("out", None, "Where to write the summary JSON (default: CHECKPOINT/eval.json, or "
                    "CHECKPOINT/eval_<benchmark>.json).")
flags.DEFINE_enum("benchmark", None, list(benchmarks.BENCHMARKS), "A published benchmark instead of the "
                  "experiment's held-out set.")
flags.DEFINE_string("data", None, "The benchmark's files: the V* Bench folder, or the HR-Bench TSV / parquet.")
flags.DEFINE_integer("k", 1, "avg@k: the benchmark is run under k seeded option shuffles.")
flags.DEFINE_integer("seed", 0, "Seed of the option shuffles.")
flags.DEFINE_string("judge_url", None, "With --benchmark: an OpenAI-compatible LLM judge (e.g. "
                    "http://127.0.0.1:18901/v1) asked about every answer the rule-based matcher marks wrong, as "
                    "DeepEyes' judge scripts do; the config's judge section sets the rest.")
FLAGS = flags.FLAGS


def benchmark_summary(name: str, summary: dict, k: int, skipped: int) -> dict:
    """The evaluator's summary -> the benchmark's report (HR-Bench overall: mean of its categories, as DeepEyes)."""
    cats = sorted(key[:-len("/accuracy")] for key in summary if key.endswith("/accuracy") and not key.startswith("all/"))
    per_category = {c: summary[f"{c}/accuracy"] for c in cats}
    overall = (sum(per_category.values()) / len(per_category) if name == "hrbench" and per_category
               else summary.get("all/accuracy", float("nan")))
    return {"benchmark": name, "n": int(summary.get("all/examples", 0)) // k, "k": k, "overall": overall,
            "per_category": per_category, "tool_call_rate": summary.get("all/tool_call_rate", float("nan")),
            "zooms_per_question": summary.get("all/zooms_per_trajectory", float("nan")), "skipped": skipped}


def markdown(report: dict) -> str:
    lines = [f"| {report['benchmark']} (avg@{report['k']}, n={report['n']}) | accuracy |", "|---|---|"]
    lines += [f"| {c} | {v:.4f} |" for c, v in report["per_category"].items()]
    lines += [f"| overall | {report['overall']:.4f} |", f"| tool-call rate | {report['tool_call_rate']:.4f} |",
              f"| zooms per question | {report['zooms_per_question']:.4f} |"]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    cfg, directory = FLAGS.config, FLAGS.checkpoint
    if not os.path.exists(os.path.join(directory, "config.json")):
        raise app.UsageError(f"--checkpoint={directory} has no config.json (expected a Hugging Face directory)")
    jax.config.update("jax_transfer_guard", "disallow")
    trainer.use_compilation_cache()
    mesh = make_mesh(cfg.mesh)
    exp = experiments.get(cfg, directory, mesh)
    if FLAGS.benchmark:
        if not FLAGS.data:
            raise app.UsageError("--benchmark needs --data (the benchmark's folder or file)")
        source = benchmarks.ShuffledSource(benchmarks.load(FLAGS.benchmark, FLAGS.data), k=FLAGS.k, seed=FLAGS.seed,
                                           max_image_pixels=exp.data.max_image_pixels)
    else:
        source = exp.eval_source()
    if source is None:
        raise app.UsageError("the config has no held-out set: set --config.eval.data_dir (or --benchmark)")
    spec = build(model_spec.ModelSpec, cfg.model, where="model", checkpoint=directory)
    tokenizer, model = model_spec.load(spec, mesh)
    rules = model.config.axis_rules
    config = trainer.train_config(cfg)
    evaluate = trainer.make_evaluator(model, config, make_templates(tokenizer),
                                      trainer.replicated(tools.token_bytes(tokenizer), mesh), mesh, rules)
    batches = trainer.eval_batches(source, exp.eval, examples=0 if FLAGS.benchmark else exp.eval.final_examples,
                                   tokenizer=tokenizer, data=exp.data, crop=config.rollout.crop, reward=config.reward,
                                   mesh=mesh, rules=rules)
    with jax.transfer_guard("allow"):
        params = nnx.state(model)
    result = evaluate(params, batches, trainer.key(cfg.seed + 1, mesh))
    summary, judged = dict(result.summary), {}
    if FLAGS.benchmark and FLAGS.judge_url:
        judge = JudgeClient(dataclasses.replace(build(JudgeConfig, cfg.judge, where="judge"), base_url=FLAGS.judge_url))
        rows, stats = evaluator.judge_rows(result, source.truth, tokenizer, judge)
        judged = {"rule_accuracy": summary.get("all/accuracy"), "judge": stats}
        summary = evaluator.summarize(rows)
    if FLAGS.benchmark:
        report = benchmark_summary(FLAGS.benchmark, summary, FLAGS.k, batches.skipped)
        summary = dict(report, **summary, **judged, data=FLAGS.data, seed=FLAGS.seed, checkpoint=directory)
    else:
        summary.update(exp.describe_eval())
    out = FLAGS.out or os.path.join(directory, f"eval_{FLAGS.benchmark}.json" if FLAGS.benchmark else "eval.json")
    trainer.save_json(out, summary)
    if jax.process_index() != 0:
        return
    if FLAGS.benchmark:
        with open(os.path.splitext(out)[0] + ".md", "w") as f:
            f.write(markdown(report))
        print(markdown(report))
        print(json.dumps({k: v for k, v in report.items() if k != "skipped"}))
        return
    for k, v in summary.items():
        print(f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}")
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
