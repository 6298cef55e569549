"""The compiled rollout against transformers, in one run, with printed ratios.

  python -m benchmarks.rollout [--batch=8] [--new_tokens=128]

(a) decode: our single-turn rollout vs transformers `generate` on the same tiny Qwen2.5-VL
    (4.9M parameters: text 256 wide, 4 layers; vision depth 2), batch, 101-token prompt with a
    64-token image, and number of new tokens (no early stop on either side), greedy and sampled.
(b) zoom: a multi-turn zoom rollout (the scripted policy of deepeyes_jax/testing/scripted.py, a tiny model fitted to
    zoom/zoom/answer trajectories) vs a host loop doing what DeepEyes does each turn: generate a turn
    with transformers, decode the text, parse it with json (DeepEyes' rules), crop with PIL,
    preprocess with the Hugging Face image processor, and re-prefill the whole context.
Each side runs in its own process; memory is that process's peak RSS. Needs the test requirements.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.host_loop import hf_generate, hf_model, hf_zoom  # noqa: E402
from benchmarks.timing import median_seconds  # noqa: E402
from deepeyes_jax.testing import scripted  # noqa: E402

flags.DEFINE_integer("batch", 8, "Rows per batch.")
flags.DEFINE_integer("new_tokens", 128, "Tokens generated per row in the decode benchmark.")
flags.DEFINE_string("child", "", "Internal: run one side and print its measurement.")
flags.DEFINE_string("workdir", "", "Internal: shared checkpoint directory.")
FLAGS = flags.FLAGS

SIDES = ("ours_greedy", "hf_greedy", "ours_sampled", "hf_sampled", "ours_zoom", "hf_zoom")


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _decode_setup(workdir):
    """A 4.9M-parameter model saved in the HF layout, plus the 101-token prompt batch."""
    from deepeyes_jax.data import image_processing
    from deepeyes_jax.data.tokenizer import build_tokenizer
    from deepeyes_jax.models.qwen2_5_vl import save_pretrained
    from deepeyes_jax.rollout.inputs import RolloutBatch
    from deepeyes_jax.testing.factory import tiny_model

    tok = build_tokenizer(vocab_size=2048 - 16)
    model = tiny_model(tok, width=256, layers=4, vision_width=128)  # 4.9M parameters
    cfg = model.config
    path = os.path.join(workdir, "decode")
    if not os.path.exists(os.path.join(path, "config.json")):
        save_pretrained(model, path)
    rng = np.random.default_rng(0)
    b = FLAGS.batch
    pv, grid = image_processing.preprocess_image(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
    row = [cfg.vision_start_token_id] + [cfg.image_token_id] * 64 + [cfg.vision_end_token_id]
    prompt = np.array([row + rng.integers(0, 1000, 101 - len(row)).tolist() for _ in range(b)], np.int32)
    image = np.zeros((b, 224, 224, 3), np.uint8)
    batch = RolloutBatch(prompt, np.ones_like(prompt), np.repeat(pv[None], b, 0), np.repeat(grid[None], b, 0)
                         .astype(np.int32), image, np.full((b, 2), 224, np.int32), np.zeros((b, 0), np.int32),
                         np.ones(b, bool))
    return tok, path, batch


def _ours(model_path, tok, batch, rollout_config, templates, repeats=3):
    from deepeyes_jax.models.qwen2_5_vl import from_pretrained
    from deepeyes_jax.rollout import tools
    from deepeyes_jax.rollout.sampler import make_rollout

    rollout, params = make_rollout(from_pretrained(model_path), rollout_config, templates, tools.token_bytes(tok))
    batch = jax.device_put(batch)
    rollout(params, batch, jax.random.key(0)).tokens.block_until_ready()  # compile
    seconds, traj = median_seconds(lambda i: rollout(params, batch, jax.random.key(i)), repeats)
    return seconds, int(traj.response_length.sum()), int(traj.num_zooms.sum())


def _hf_decode(path, batch, image_token_id, sample, repeats=3):
    import torch
    model = hf_model(path)
    ids = batch.prompt_ids.astype(np.int64)
    pixels = np.concatenate([pv[:int(np.prod(g))] for pv, g in zip(batch.pixel_values, batch.image_grid_thw)])
    grids = batch.image_grid_thw.astype(np.int64)
    kw = dict(max_new_tokens=FLAGS.new_tokens, min_new_tokens=FLAGS.new_tokens, do_sample=sample,
              temperature=1.0 if sample else None, top_p=None, top_k=None)
    hf_generate(model, ids, np.ones_like(ids), pixels, grids, image_token_id, **kw)  # warm up

    def generate(i):
        torch.manual_seed(i)
        return hf_generate(model, ids, np.ones_like(ids), pixels, grids, image_token_id, **kw)

    seconds, out = median_seconds(generate, repeats)
    return seconds, int(out.size), 0


def _zoom_setup(workdir):
    from deepeyes_jax.models.qwen2_5_vl import save_pretrained
    path = os.path.join(workdir, "zoom")
    if not os.path.exists(os.path.join(path, "config.json")):
        setup, model = scripted.fitted()
        save_pretrained(model, path)
    else:
        setup = scripted.Setup()
    return setup, path, setup.make_batch([r % len(scripted.SCRIPTS) for r in range(FLAGS.batch)])


def child(side, workdir):
    from deepeyes_jax.rollout.config import RolloutConfig, make_templates
    from deepeyes_jax.rollout.zoom import CropSpec
    if side.endswith("zoom"):
        setup, path, batch = _zoom_setup(workdir)
        if side == "ours_zoom":
            return _ours(path, setup.tokenizer, batch, setup.rollout_config(), setup.templates)
        hf_zoom(setup, path, batch)  # warm up
        return hf_zoom(setup, path, batch)
    tok, path, batch = _decode_setup(workdir)
    sample = side.endswith("sampled")
    if side.startswith("hf"):
        return _hf_decode(path, batch, tok.convert_tokens_to_ids("<|image_pad|>"), sample)
    # No stop token: exactly new_tokens per row, like min_new_tokens on the other side.
    templates = dataclasses.replace(make_templates(tok), im_end=-1)
    config = RolloutConfig(max_total_len=101 + FLAGS.new_tokens, max_turns=1, max_turn_tokens=FLAGS.new_tokens,
                           temperature=1.0 if sample else 0.0,
                           crop=CropSpec(image_height=224, image_width=224, min_pixels=3136, max_pixels=3136))
    return _ours(path, tok, batch, config, templates)


def main(argv):
    del argv
    if FLAGS.child == "fit":
        _zoom_setup(FLAGS.workdir)
        return
    if FLAGS.child:
        seconds, tokens, zooms = child(FLAGS.child, FLAGS.workdir)
        print(json.dumps(dict(seconds=seconds, tokens=tokens, zooms=zooms, peak_mb=_peak_mb())))
        return
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        # Fit and save the scripted policy here, so neither side's process pays for (or holds) it.
        subprocess.run([sys.executable, "-m", "benchmarks.rollout", "--child=fit", f"--workdir={workdir}"],
                       capture_output=True, check=True)
        for side in SIDES:
            out = subprocess.run([sys.executable, "-m", "benchmarks.rollout", f"--child={side}",
                                  f"--workdir={workdir}", f"--batch={FLAGS.batch}",
                                  f"--new_tokens={FLAGS.new_tokens}"],
                                 capture_output=True, text=True, check=True)
            results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"jax {jax.__version__}, {os.cpu_count()} CPU cores, batch {FLAGS.batch}, fp32; "
          f"memory = peak RSS of the process")
    print(f"{'benchmark':>16} {'ours tok/s':>10} {'hf tok/s':>9} {'speedup':>8} {'ours MB':>8} {'hf MB':>7} "
          f"{'tokens':>7} {'zooms':>6}")
    for name in ("greedy", "sampled", "zoom"):
        o, h = results[f"ours_{name}"], results[f"hf_{name}"]
        ours_tps, hf_tps = o["tokens"] / o["seconds"], h["tokens"] / h["seconds"]
        label = f"decode {name}" if name != "zoom" else "multi-turn zoom"
        print(f"{label:>16} {ours_tps:10.0f} {hf_tps:9.0f} {ours_tps / hf_tps:8.2f} {o['peak_mb']:8.0f} "
              f"{h['peak_mb']:7.0f} {o['tokens']:>3}/{h['tokens']:<3} {o['zooms']:>2}/{h['zooms']:<2}")


if __name__ == "__main__":
    app.run(main)
