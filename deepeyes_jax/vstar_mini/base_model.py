"""The V*-mini base model: a tiny Qwen2.5-VL taught the separate abilities by a short supervised stage.

    tokenizer, model, report = load_or_train(directory, ...)

The result is saved to `directory` as a Hugging Face checkpoint (safetensors + config.json +
tokenizer files) and reused by later runs; `report` holds the supervised stage's numbers.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from deepeyes_jax.vstar_mini import tasks
from deepeyes_jax.data.tokenizer import build_tokenizer, default_corpus
from deepeyes_jax.models.qwen2_5_vl import Qwen2_5_VL, from_pretrained, save_pretrained
from deepeyes_jax.models.qwen2_5_vl.presets import for_tokenizer
from deepeyes_jax.sft.conversation import Shapes, concat, pack
from deepeyes_jax.sft.step import make_sft_step

REPORT = "sft_report.json"


def _batches(source, tokenizer, budgets, shapes, *, batch, weights, seed, steps, max_failures=200):
    """Packed SFT batches, produced by a background thread one step ahead of the device.

    An example that cannot be made (no target of the asked kinds) or does not fit `shapes` is logged,
    counted and replaced; `max_failures` failures in a row mean the settings (not a record) are at fault,
    and raise a ValueError naming the last one.
    """
    names = list(weights)
    p = np.array([weights[n] for n in names], np.float64)
    p /= p.sum()
    out: queue.Queue = queue.Queue(maxsize=2)
    skipped = [0]

    def produce():
        rng = np.random.default_rng(seed)
        try:
            for _ in range(steps):
                rows, failures = [], 0
                while len(rows) < batch:
                    index, task = int(rng.integers(len(source))), names[int(rng.choice(len(names), p=p))]
                    try:
                        rows.append(pack(tokenizer, [tasks.example(source[index], task, rng, budgets)], shapes))
                        failures = 0
                    except ValueError as e:
                        skipped[0] += 1
                        failures += 1
                        logging.warning("SFT: skipping %s example of train record %d: %s", task, index, e)
                        if failures >= max_failures:
                            raise ValueError(f"SFT: {failures} examples in a row could not be made (check sft.seq_len "
                                             f"and data.kinds); the last, {task} of train record {index}: {e}") from e
                out.put(concat(rows))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            out.put(e)

    threading.Thread(target=produce, daemon=True).start()
    for _ in range(steps):
        item = out.get()
        if isinstance(item, Exception):
            raise item
        yield item, skipped[0]


def train(model, tokenizer, source, budgets: tasks.Budgets, shapes: Shapes, *, steps: int, batch: int,
          learning_rate: float, warmup: int, weights: dict, seed: int, put, fetch, log_every: int = 25):
    """Run the supervised stage on `model` in place of its parameters; -> (params, report dict)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup, 1), max(steps, warmup + 1),
                                                  learning_rate * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    with jax.transfer_guard("allow"):
        step, params, opt_state = make_sft_step(model, tx)
    t0, history = time.perf_counter(), []
    skipped = 0
    for i, (traj, skipped) in enumerate(_batches(source, tokenizer, budgets, shapes, batch=batch, weights=weights, seed=seed,
                                      steps=steps)):
        params, opt_state, metrics = step(params, opt_state, put(traj))
        if (i + 1) % log_every == 0 or i + 1 == steps:
            m = {k: float(v) for k, v in fetch(metrics).items()}
            history.append(dict(step=i + 1, seconds=time.perf_counter() - t0, **m))
            logging.info("sft step %d/%d: loss %.4f token accuracy %.3f (%.0f s)", i + 1, steps, m["loss"],
                         m["token_accuracy"], time.perf_counter() - t0)
    return params, dict(steps=steps, batch=batch, seconds=time.perf_counter() - t0, skipped=skipped,
                        history=history)


def fan_in_init(params, seed: int):
    """Every Dense kernel float[in, ...] redrawn as N(0, 1 / in).

    Qwen's initializer_range (0.02) is a fine-tuning-scale default: in a model this small, trained from
    scratch, it starts the vision path so weak that the supervised stage learns a constant image vector
    first (measured: held-out easy-question accuracy 0.35 vs 0.62 after 50 steps with this init).
    """
    def draw(path, x):
        if x.ndim >= 2 and any(getattr(k, "key", None) == "kernel" for k in path):
            key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(jax.tree_util.keystr(path).encode()))
            return (jax.random.normal(key, x.shape, jnp.float32) / np.sqrt(x.shape[0])).astype(x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(draw, params)


def load_or_train(directory: str, *, model_config, vocab_size: int, source, budgets, shapes, sft, mesh, put, fetch,
                  seed: int):
    """-> (tokenizer, model, report). Loads `directory` if it holds a finished base model, else trains one.

    With several processes every one trains (the same batches, sharded), process 0 writes the files."""
    done = os.path.join(directory, REPORT)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("vstar_mini_base_model_check")
    if os.path.exists(done):
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        runtime = model_config.runtime()
        with jax.transfer_guard("allow"):
            model = from_pretrained(directory, mesh=mesh, dtype=runtime.pop("param_dtype"),
                                    compute_dtype=runtime.pop("dtype"), **runtime)
        with open(done) as f:
            report = json.load(f)
        logging.info("base model loaded from %s", directory)
        return tokenizer, model, report
    tokenizer = build_tokenizer(vocab_size=vocab_size, corpus=default_corpus() + tasks.corpus(seed))
    config = for_tokenizer(model_config, tokenizer)
    with jax.transfer_guard("allow"):
        model = Qwen2_5_VL(config, rngs=nnx.Rngs(seed), mesh=mesh)
        graphdef, params = nnx.split(model)
        model = nnx.merge(graphdef, jax.jit(fan_in_init, static_argnums=1)(params, seed))
    params, report = train(model, tokenizer, source, budgets, shapes, steps=sft.steps, batch=sft.batch,
                           learning_rate=sft.learning_rate, warmup=sft.warmup, weights=dict(sft.task_weights),
                           seed=seed, put=put, fetch=fetch)
    model = nnx.merge(graphdef, params)
    with jax.transfer_guard("allow"):
        save_pretrained(model, directory)
    if jax.process_index() == 0:
        tokenizer.save_pretrained(directory)
        with open(done + ".tmp", "w") as f:  # written last: its presence marks a complete base model
            json.dump(report, f, indent=1)
        os.replace(done + ".tmp", done)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("vstar_mini_base_model_written")
    return tokenizer, model, report
