"""The generic launcher on DeepEyes' 7B recipe config (shapes overridden small): a tiny random checkpoint
written by transformers itself with Qwen2.5's vocabulary size and special ids and a 151,665-token tokenizer,
prompts from a prepared dataset with a corrupt record, the LLM judge over HTTP on loopback, 2 steps,
held-out evaluation by category and the Hugging Face export."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers

import hf_reference
from deepeyes_jax.data import chat, prepared
from deepeyes_jax.data.records import PromptRecord
from test_judge import _Server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [  # the recipe's shapes cut down to this CPU; every other value is configs/deepeyes_7b.py's own
    "--config.steps=2", "--config.prompts=2", "--config.grpo.group_size=2", "--config.actor.micro_batches=2",
    "--config.rollout.row_chunks=2",
    "--config.actor.logprob_chunk=256", "--config.data.prompt_len=1024", "--config.data.num_patches=64",
    "--config.data.max_pixels=12544", "--config.rollout.max_total_len=1280", "--config.rollout.max_turns=2",
    "--config.rollout.max_turn_tokens=32", "--config.rollout.crop.image_height=112",
    "--config.rollout.crop.image_width=112", "--config.rollout.crop.max_pixels=12544", "--config.eval.batch=4"]


def _records(rng, n, corrupt=()):
    out = []
    for i in range(n):
        image = rng.integers(0, 255, (56 + 28 * (i % 3), 84, 3), dtype=np.uint8)
        out.append(dict(prompt=chat.deepeyes_prompt(f"What colour is thing {i}?\nOptions: \nA. red\nB. blue\n"),
                        image=b"not an image" if i in corrupt else image, ground_truth="A",
                        question=f"What colour is thing {i}?", data_source=("vstar", "chart")[i % 2],
                        box=(0.0, 0.0, 40.0, 40.0) if i % 2 else None, category=f"c{i % 2}", index=i))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepeyes_7b")
    checkpoint = hf_reference.save_qwen_sized_checkpoint(root / "hf")
    rng = np.random.default_rng(0)
    data = prepared.write(str(root / "data"), {"train": _records(rng, 4, corrupt=(1,)), "test": _records(rng, 4)})
    server = _Server()
    try:
        cmd = [sys.executable, "-m", "launch.train", "--config=configs/deepeyes_7b.py", f"--workdir={root / 'run'}",
               f"--config.model.checkpoint={checkpoint}", f"--config.data.train_dir={data}",
               f"--config.eval.data_dir={data}", f"--config.judge.base_url={server.url('letter_a')}", *SMALL]
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, XLA_FLAGS=""), capture_output=True, text=True,
                              timeout=900)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr[-5000:]
    return dict(workdir=str(root / "run"), server=server, stderr=proc.stderr, checkpoint=checkpoint)


def test_two_judged_steps_on_prepared_data(run):
    rows = [json.loads(line) for line in open(os.path.join(run["workdir"], "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1, 2]  # two steps, then the final held-out evaluation
    for r in rows[:2]:
        assert r["judge_failed"] == 0 and np.isfinite(r["loss"]) and r["sampled_tokens"] > 0
    # every trajectory's answer went to the judge once (2 prompts x 2 samples x 2 steps), none else did
    assert sum(1 for mode, _ in run["server"].bodies if mode == "letter_a") == 8
    # the corrupt record was counted, logged (naming it) and replaced; the run went on
    assert rows[1]["skipped_records"] == 1
    assert "record 1" in run["stderr"] and "not a readable image" in run["stderr"]


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
