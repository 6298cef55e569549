"""The generic launcher on DeepEyes' 7B recipe config (shapes overridden small): a tiny random checkpoint
written by transformers itself with Qwen2.5's vocabulary size and special ids and a 151,665-token tokenizer,
training prompts prepared by `launch.prepare_data` from a DeepEyes-47k parquet file (one record the run cannot
use), the LLM judge over HTTP on loopback, 2 steps, held-out evaluation by category and the Hugging Face export;
then `launch.eval --benchmark` on V* Bench / HR-Bench files in their published layouts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers

import hf_reference
from deepeyes_jax.data import chat, prepared
from deepeyes_jax.testing import benchmark_files, deepeyes_parquet
from test_judge import _Server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [  # the recipe's shapes cut down to this CPU; every other value is configs/deepeyes_7b.py's own
    "--config.steps=2", "--config.prompts=2", "--config.grpo.group_size=2", "--config.actor.micro_batches=2",
    "--config.rollout.row_chunks=2",
    "--config.actor.logprob_chunk=256", "--config.data.prompt_len=1024", "--config.data.num_patches=64",
    "--config.data.max_pixels=12544", "--config.rollout.max_total_len=1280", "--config.rollout.max_turns=2",
    "--config.rollout.max_turn_tokens=32", "--config.rollout.crop.image_height=112",
    "--config.rollout.crop.image_width=112", "--config.rollout.crop.max_pixels=12544", "--config.eval.batch=4"]


def _records(rng, n):
    out = []
    for i in range(n):
        image = rng.integers(0, 255, (56 + 28 * (i % 3), 84, 3), dtype=np.uint8)
        out.append(dict(prompt=chat.deepeyes_prompt(f"What colour is thing {i}?\nOptions: \nA. red\nB. blue\n"),
                        image=image, ground_truth="A",
                        question=f"What colour is thing {i}?", data_source=("vstar", "chart")[i % 2],
                        box=(0.0, 0.0, 40.0, 40.0) if i % 2 else None, category=f"c{i % 2}", index=i))
    return out


def _parquet(path):
    """DeepEyes-47k rows (the released parquet schema) for `launch.prepare_data`: 4 usable ones, of which row 1's
    image (140 px high) passes preparation but not this run's 112 px image buffer, and one without a ground truth."""
    rows = [deepeyes_parquet.make_row(
        question=f"What colour is thing {i}?\nOptions: \nA. red\nB. blue\n", answer="" if i == 4 else "A",
        data_source=("vstar", "chart")[i % 2], index=i,
        image=deepeyes_parquet.image_bytes(140 if i == 1 else 56 + 28 * (i % 3), 84, seed=i)) for i in range(5)]
    deepeyes_parquet.write(path, rows)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepeyes_7b")
    checkpoint = hf_reference.save_qwen_sized_checkpoint(root / "hf")
    rng = np.random.default_rng(0)
    _parquet(root / "deepeyes.parquet")
    prep = subprocess.run([sys.executable, "-m", "launch.prepare_data", f"--parquet={root / '*.parquet'}",
                           f"--out_dir={root / 'train'}", f"--tokenizer={checkpoint}", "--max_prompt_tokens=1024"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert json.loads(prep.stdout.splitlines()[-1])["skipped"] == {"no_ground_truth": 1}
    train = str(root / "train")
    test = prepared.write(str(root / "test"), {"test": _records(rng, 4)})
    server = _Server()
    try:
        cmd = [sys.executable, "-m", "launch.train", "--config=configs/deepeyes_7b.py", f"--workdir={root / 'run'}",
               f"--config.model.checkpoint={checkpoint}", f"--config.data.train_dir={train}",
               f"--config.eval.data_dir={test}", f"--config.judge.base_url={server.url('letter_a')}", *SMALL]
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, XLA_FLAGS=""), capture_output=True, text=True,
                              timeout=900)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr[-5000:]
    return dict(workdir=str(root / "run"), server=server, stderr=proc.stderr, checkpoint=checkpoint, train=train)


def test_two_judged_steps_on_prepared_data(run):
    rows = [json.loads(line) for line in open(os.path.join(run["workdir"], "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1, 2]  # two steps, then the final held-out evaluation
    for r in rows[:2]:
        assert r["judge_failed"] == 0 and np.isfinite(r["loss"]) and r["sampled_tokens"] > 0
    # every trajectory's answer went to the judge once (2 prompts x 2 samples x 2 steps), none else did
    assert sum(1 for mode, _ in run["server"].bodies if mode == "letter_a") == 8
    # the record this run cannot use was counted, logged (naming it) and replaced; the run went on
    assert rows[1]["skipped_records"] == 1
    assert "record 1" in run["stderr"] and "exceeds the image buffer" in run["stderr"]


def test_held_out_summary_by_category_and_export(run):
    after = json.load(open(os.path.join(run["workdir"], "eval_after.json")))
    assert after["all/examples"] == 4 and {"c0/accuracy", "c1/accuracy", "all/tool_call_rate"} <= set(after)
    export = os.path.join(run["workdir"], "export")
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(export)
    assert model.config.text_config.vocab_size == 152064
    assert len(transformers.AutoTokenizer.from_pretrained(export)) == 151665
    original = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(run["checkpoint"])
    # the export is the checkpoint after two steps at the recipe's lr 1e-6: at most a few 1e-6 away
    for name in ("lm_head.weight", "model.language_model.layers.0.self_attn.q_proj.weight"):
        a, b = (dict(m.named_parameters())[name].detach().numpy() for m in (model, original))
        assert np.abs(a - b).max() < 1e-4, name


def test_benchmark_eval_on_the_export_and_on_a_transformers_checkpoint(run, tmp_path):
    """`launch.eval --benchmark`: V* Bench (folder layout, avg@2) on the run's export (prepare -> train -> export ->
    eval) and HR-Bench (TSV, with the LLM judge over HTTP on loopback) on the checkpoint transformers wrote, through
    the config's compiled evaluation."""
    img = lambda h, w, s: deepeyes_parquet.image_bytes(h, w, seed=s, fmt="JPEG")  # noqa: E731
    vstar = benchmark_files.write_vstar(tmp_path / "vstar", [
        dict(category="direct_attributes", question="What colour is the cup?", options=["red", "blue"],
             image=img(84, 84, 0), bbox=[[10, 10, 20, 20]]),
        dict(category="direct_attributes", question="What colour is the bag?", options=["green", "red", "blue"],
             image=img(56, 84, 1)),
        dict(category="relative_position", question="Is the dog left of the car?", options=["yes", "no"],
             image=img(112, 84, 2))])
    hr = benchmark_files.write_hrbench_tsv(tmp_path / "hr_bench_4k.tsv", [
        dict(question=f"What is shown {i}?", answer="ABCD"[i], A="a", B="b", C="c", D="d",
             category=("single", "cross")[i % 2], image=img(56 + 28 * (i % 2), 84, 10 + i)) for i in range(4)])
    server = _Server()  # HR-Bench with the LLM judge: one that accepts every answer
    runs = ((os.path.join(run["workdir"], "export"), "vstar", vstar, 2, 3, ["direct_attributes", "relative_position"],
             []), (run["checkpoint"], "hrbench", hr, 1, 4, ["cross", "single"], [f"--judge_url={server.url('always')}"]))
    for checkpoint, name, data, k, n, cats, judge in runs:
        out = tmp_path / f"{name}.json"
        try:
            proc = subprocess.run([sys.executable, "-m", "launch.eval", "--config=configs/deepeyes_7b.py",
                                   f"--checkpoint={checkpoint}", f"--benchmark={name}", f"--data={data}", f"--k={k}",
                                   "--seed=3", f"--out={out}", *judge, *SMALL], cwd=ROOT,
                                  env=dict(os.environ, XLA_FLAGS=""), capture_output=True, text=True, timeout=900)
        finally:
            if judge:
                server.close()
        assert proc.returncode == 0, proc.stderr[-5000:]
        last = json.loads(proc.stdout.strip().splitlines()[-1])
        assert set(last) == {"benchmark", "n", "k", "overall", "per_category", "tool_call_rate", "zooms_per_question"}
        assert (last["benchmark"], last["n"], last["k"], sorted(last["per_category"])) == (name, n, k, cats)
        saved = json.load(open(out))
        assert saved["all/examples"] == n * k and saved["skipped"] == 0
        want = (np.mean(list(last["per_category"].values())) if name == "hrbench" else saved["all/accuracy"])
        assert last["overall"] == pytest.approx(want)
        assert 0 <= last["tool_call_rate"] <= 1 and last["zooms_per_question"] >= 0
        assert "| overall |" in open(tmp_path / f"{name}.md").read()
        if judge:  # every answer the rule marked wrong (and only those) went to the judge, which accepted it
            asked = sum(1 for mode, _ in server.bodies if mode == "always")
            assert 0 < asked == round((1 - saved["rule_accuracy"]) * n * k) == saved["judge"]["ok"]
            assert last["overall"] == 1.0 and all(v == 1.0 for v in last["per_category"].values())


def test_select_data_accounts_for_every_question(run, tmp_path):
    """`launch.select_data` on the prepared training set with the random checkpoint, 2 samples per question: the
    record whose image exceeds the run's buffer is `unusable`, and a random model answers none of the others right
    (`none_right`), so nothing is kept and the command fails with its report as the last line."""
    proc = subprocess.run([sys.executable, "-m", "launch.select_data", "--config=configs/deepeyes_7b.py",
                           f"--checkpoint={run['checkpoint']}", f"--data={run['train']}", f"--out_dir={tmp_path / 'sel'}",
                           "--k=2", *SMALL], cwd=ROOT, env=dict(os.environ, XLA_FLAGS=""), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode != 0 and "no question was kept" in proc.stderr, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (report["questions"], report["kept"], report["k"]) == (4, 0, 2)
    assert report["dropped"] == {"unusable": 1, "none_right": 3}
    assert report["by_source"] == {"chart": {"none_right": 1}, "unusable": {"unusable": 1}, "vstar": {"none_right": 2}}
