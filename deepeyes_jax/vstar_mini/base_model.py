"""The V*-mini base model: a tiny Qwen2.5-VL taught the separate abilities by a supervised stage.

    tokenizer, model = fresh(model_config, vocab_size=, world=, seed=, mesh=)      # untrained, fan-in init
    params, report = train(model, tokenizer, source, ..., ckpt=Checkpointer)      # resumable
    save(directory, model, tokenizer, manifest) / load(directory, model_config, mesh) -> (tokenizer, model, manifest)

The result is a Hugging Face directory (safetensors + config.json + tokenizer files) plus `manifest.json`:
how it was made (command, steps, wall time, seed, the digest of the settings it was trained for) and its
skill table (`vstar_mini.skills`). `launch.pretrain_base` makes the one that ships in the repository.
"""

from __future__ import annotations

import hashlib
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

from deepeyes_jax.data.tokenizer import build_tokenizer, default_corpus
from deepeyes_jax.models.qwen2_5_vl import Qwen2_5_VL, from_pretrained, save_pretrained
from deepeyes_jax.models.qwen2_5_vl.presets import for_tokenizer
from deepeyes_jax.sft.conversation import concat, pack
from deepeyes_jax.sft.step import make_sft_step
from deepeyes_jax.train import checkpoints, trainer
from deepeyes_jax.vstar_mini import tasks

MANIFEST = "manifest.json"  # written last: its presence marks a complete base model


class Interrupted(Exception):
    """The supervised stage stopped on SIGTERM after saving its checkpoint; rerun the command to resume."""


def settings_digest(settings: dict) -> str:
    """A short digest of what a base model was trained for (world, budgets, architecture, supervised stage)."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _batches(source, tokenizer, budgets, shapes, *, batch, weights, seed, start, steps, max_failures=200):
    """Packed SFT batches start..steps-1, produced by a background thread one step ahead of the device. Batch i
    depends only on (seed, i), so a resumed run sees the batches an uninterrupted one would.

    An example that cannot be made (no target of the asked kinds) or does not fit `shapes` is logged,
    counted and replaced; `max_failures` failures in a row mean the settings (not a record) are at fault,
    and raise a ValueError naming the last one.
    """
    names = list(weights)
    p = np.array([weights[n] for n in names], np.float64)
    p /= p.sum()
    skipped = [0]

    def make(i):
        rng = np.random.default_rng([seed, i])
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
        return concat(rows)

    for item in prefetch(make, range(start, steps)):
        yield item, skipped[0]


def prefetch(make, indices, depth: int = 2):
    """Yields make(i) for i in `indices`, made ahead on a background thread (host batching overlaps the device
    step); an exception raised there is re-raised here."""
    out: queue.Queue = queue.Queue(maxsize=depth)

    def produce():
        try:
            for i in indices:
                out.put(make(i))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            out.put(e)

    threading.Thread(target=produce, daemon=True).start()
    for _ in indices:
        item = out.get()
        if isinstance(item, Exception):
            raise item
        yield item


def optimizer(sft) -> optax.GradientTransformation:
    """AdamW on a warmup-cosine schedule, clipped; with `sft.train_tower` False the vision tower is left as the
    vision stage made it (its updates are zero, so XLA drops its backward pass)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, sft.learning_rate, max(sft.warmup, 1),
                                                  max(sft.steps, sft.warmup + 1), sft.learning_rate * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    if sft.train_tower:
        return tx

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "tower" if getattr(path[0], "key", None) == "visual" else "rest", params)
    return optax.multi_transform({"rest": tx, "tower": optax.set_to_zero()}, labels)


def train(model, tokenizer, source, budgets: tasks.Budgets, shapes, sft, *, seed: int, put, fetch, mesh,
          ckpt: checkpoints.Checkpointer | None = None, log_every: int = 25):
    """Run the supervised stage (`sft`: SFTConfig) on `model`'s parameters -> (params, report dict).

    With `ckpt` the stage saves every `ckpt`'s save_every steps and resumes from its latest good step (params,
    optimizer state, step, seconds and history so far); a SIGTERM saves and raises `Interrupted`."""
    tx = optimizer(sft)
    with jax.transfer_guard("allow"):
        step, params, opt_state = make_sft_step(model, tx)
    start, history, seconds0 = 0, [], 0.0
    if ckpt is not None:
        abstract = checkpoints.abstract_params(params, mesh, model.config.axis_rules)
        abstract_opt = checkpoints.abstract_opt_state(tx, abstract)
        with jax.transfer_guard("allow"):
            restored = ckpt.restore(abstract_params=abstract, abstract_opt_state=abstract_opt)
            if restored is not None:
                start, params, opt_state = restored.step, restored.params, restored.opt_state
                history, seconds0 = restored.data_state["history"], restored.data_state["seconds"]
                logging.info("SFT: resumed at step %d (%.0f s so far)", start, seconds0)
            else:  # laid out as a restored state would be, so the step compiles once either way
                shardings = lambda tree: jax.tree.map(lambda a: a.sharding, tree)  # noqa: E731
                params = jax.device_put(params, shardings(abstract))
                opt_state = jax.device_put(opt_state, shardings(abstract_opt))
        checkpoints.install_sigterm_handler()
    t0, skipped = time.perf_counter(), 0
    rng = trainer.key(seed, mesh)  # the checkpoint format's rng item (the stage itself draws none on device)
    for i, (traj, skipped) in enumerate(_batches(source, tokenizer, budgets, shapes, batch=sft.batch,
                                                 weights=dict(sft.task_weights), seed=seed, start=start,
                                                 steps=sft.steps), start=start):
        params, opt_state, metrics = step(params, opt_state, put(traj))
        if (i + 1) % log_every == 0 or i + 1 == sft.steps:
            m = {k: float(v) for k, v in fetch(metrics).items()}  # waits for the step: the time below is real
            seconds = seconds0 + time.perf_counter() - t0
            history.append(dict(step=i + 1, seconds=seconds, **m))
            logging.info("sft step %d/%d: loss %.4f token accuracy %.3f (%.0f s)", i + 1, sft.steps, m["loss"],
                         m["token_accuracy"], seconds)
        if ckpt is not None:
            stop = checkpoints.preemption_requested(i)
            so_far = dict(history=history, seconds=seconds0 + time.perf_counter() - t0)
            ckpt.save(i + 1, params, opt_state, rng, so_far, force=stop or i + 1 == sft.steps)
            if stop and i + 1 < sft.steps:
                ckpt.wait()
                raise Interrupted(f"SFT preempted: saved step {i + 1}")
    if ckpt is not None:
        ckpt.wait()
    return params, dict(steps=sft.steps, batch=sft.batch, seconds=seconds0 + time.perf_counter() - t0,
                        skipped=skipped, history=history)


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


def fresh(model_config, *, vocab_size: int, world, seed: int, mesh):
    """-> (tokenizer, model): the V*-mini tokenizer (trained on its text) and an untrained model, fan-in init."""
    tokenizer = build_tokenizer(vocab_size=vocab_size, corpus=default_corpus() + tasks.corpus(seed, world))
    config = for_tokenizer(model_config, tokenizer)
    with jax.transfer_guard("allow"):
        model = Qwen2_5_VL(config, rngs=nnx.Rngs(seed), mesh=mesh)
        graphdef, params = nnx.split(model)
        return tokenizer, nnx.merge(graphdef, jax.jit(fan_in_init, static_argnums=1)(params, seed))


def save(directory: str, model, tokenizer, manifest: dict) -> None:
    """The Hugging Face files, then `manifest.json` last (process 0 writes; every process takes part)."""
    with jax.transfer_guard("allow"):
        save_pretrained(model, directory)
    if jax.process_index() == 0:
        tokenizer.save_pretrained(directory)
        path = os.path.join(directory, MANIFEST)
        with open(path + ".tmp", "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(path + ".tmp", path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("vstar_mini_base_model_written")


def read_manifest(directory: str) -> dict | None:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load(directory: str, model_config, mesh):
    """-> (tokenizer, model, manifest) of a finished base model directory."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    runtime = model_config.runtime()
    with jax.transfer_guard("allow"):
        model = from_pretrained(directory, mesh=mesh, dtype=runtime.pop("param_dtype"),
                                compute_dtype=runtime.pop("dtype"), **runtime)
    logging.info("base model loaded from %s", directory)
    return tokenizer, model, read_manifest(directory)
