"""Benchmark-style evaluation throughput: our batched evaluation against a DeepEyes-style host loop, in one run.

  python -m benchmarks.eval [--questions=12]

Same model (the scripted zoom policy of deepeyes_jax/testing/scripted.py: a tiny Qwen2.5-VL fitted to zoom / zoom /
answer trajectories), same questions (its three scripted prompts and images, repeated), greedy, at most 4 turns of
64 tokens, crops under the same pixel budget.
  ours: `eval.evaluator.Evaluator` over `train.trainer.eval_batches` (host records -> static-shape batches -> the
        compiled rollout with the zoom tool, reward and per-row metrics in one program), all questions in one batch.
  DeepEyes-style: `eval_vstar.py`'s loop, one question at a time: per turn transformers `generate`, decode, parse
        the tool call, PIL crop of the original image, the HF image processor, re-prefill the whole context
        (`benchmarks/host_loop.py`).
Questions/s (compilation excluded: ours is run once before timing, as the host side is warmed up) and the ratio,
plus sampled tokens and zooms on each side (equal work: both run the same greedy policy). Each side runs in its own
process; memory is that process's peak RSS. Needs the test requirements.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.host_loop import hf_model, hf_zoom  # noqa: E402
from benchmarks.timing import median_seconds  # noqa: E402
from deepeyes_jax.testing import scripted  # noqa: E402

flags.DEFINE_integer("questions", 12, "Questions evaluated (the 3 scripted ones, repeated).")
flags.DEFINE_string("side", "", "Internal: run one side and print its measurement.")
flags.DEFINE_string("workdir", "", "Internal: the saved scripted model.")
FLAGS = flags.FLAGS


def _rows():
    return [q % len(scripted.SCRIPTS) for q in range(FLAGS.questions)]


def _ours(setup, path):
    from flax import nnx

    from deepeyes_jax.data import chat
    from deepeyes_jax.data.records import PromptRecord
    from deepeyes_jax.eval.evaluator import EvalConfig
    from deepeyes_jax.models.qwen2_5_vl import from_pretrained
    from deepeyes_jax.rl.grpo import GRPOConfig
    from deepeyes_jax.rl.train_step import TrainConfig
    from deepeyes_jax.sharding import DEFAULT_AXIS_RULES, make_mesh
    from deepeyes_jax.train import trainer
    from deepeyes_jax.train.input_pipeline import DataConfig

    records = [PromptRecord(prompt=chat.deepeyes_prompt(setup.scripts[r][0]), image=setup.images[r],
                            ground_truth="A", question=setup.scripts[r][0], data_source="vstar") for r in _rows()]
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    config = TrainConfig(rollout=setup.rollout_config(), grpo=GRPOConfig(group_size=1))
    model = from_pretrained(path)
    evaluate = trainer.make_evaluator(model, config, setup.templates, setup.table, mesh, DEFAULT_AXIS_RULES)
    data = DataConfig(prompt_len=448, num_patches=192, max_pixels=scripted.PROMPT_PIXELS)  # Setup.make_batch's
    params = nnx.state(model)

    def run(i):
        batches = trainer.eval_batches(records, EvalConfig(batch=len(records)), examples=0, tokenizer=setup.tokenizer,
                                       data=data, crop=setup.crop, reward=config.reward, mesh=mesh,
                                       rules=DEFAULT_AXIS_RULES)
        return evaluate(params, batches, jax.random.key(i)).rows

    run(0)  # compile
    seconds, rows = median_seconds(run, 3)
    return seconds, int(sum(r["response_length"] for r in rows)), int(sum(r["zooms"] for r in rows))


def _host(setup, path):
    model = hf_model(path)
    batches = [(setup.make_batch([r]), [setup.images[r]]) for r in _rows()]
    hf_zoom(setup, model, *batches[0])  # warm up
    seconds = tokens = zooms = 0
    for batch, originals in batches:  # one question at a time, as eval_vstar.py's workers do
        s, t, z = hf_zoom(setup, model, batch, originals)
        seconds, tokens, zooms = seconds + s, tokens + t, zooms + z
    return seconds, tokens, zooms


def main(argv):
    del argv
    if FLAGS.side:
        setup = scripted.Setup()
        path = os.path.join(FLAGS.workdir, "zoom")
        if FLAGS.side == "fit":
            from deepeyes_jax.models.qwen2_5_vl import save_pretrained
            save_pretrained(scripted.fitted()[1], path)
            return
        seconds, tokens, zooms = (_ours if FLAGS.side == "ours" else _host)(setup, path)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(dict(seconds=seconds, tokens=tokens, zooms=zooms, peak_mb=peak)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for side in ("fit", "ours", "host"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.eval", f"--side={side}", f"--workdir={workdir}",
                                  f"--questions={FLAGS.questions}"], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"side {side} failed:\n{out.stderr[-3000:]}")
            if side != "fit":
                results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    o, h = results["ours"], results["host"]
    qps = {k: FLAGS.questions / v["seconds"] for k, v in results.items()}
    print(f"jax {jax.__version__}, {os.cpu_count()} CPU cores, {FLAGS.questions} questions, fp32")
    print(f"{'side':>16} {'questions/s':>11} {'tokens':>7} {'zooms':>6} {'peak MB':>8}")
    print(f"{'ours (batched)':>16} {qps['ours']:11.2f} {o['tokens']:7d} {o['zooms']:6d} {o['peak_mb']:8.0f}")
    print(f"{'DeepEyes-style':>16} {qps['host']:11.2f} {h['tokens']:7d} {h['zooms']:6d} {h['peak_mb']:8.0f}")
    print(f"ours / DeepEyes-style questions/s: {qps['ours'] / qps['host']:.2f}")


if __name__ == "__main__":
    app.run(main)
