"""Which model a run starts from, and its runtime settings: a Hugging Face directory or a preset.

    tokenizer, model = load(ModelSpec(checkpoint="/ckpt/Qwen2.5-VL-7B-Instruct", compute_dtype="bfloat16"), mesh)

The tokenizer comes from the checkpoint (or `tokenizer`), so the observation templates and the tool
recogniser's byte table are built from the model's own vocabulary. A preset without a tokenizer
directory gets the project's offline Qwen-style tokenizer, with the vocabulary resized to it.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import transformers
from flax import nnx

from deepeyes_jax.data.tokenizer import build_tokenizer
from deepeyes_jax.models.qwen2_5_vl import Qwen2_5_VL, from_pretrained, get_preset
from deepeyes_jax.models.qwen2_5_vl.presets import for_tokenizer
from deepeyes_jax.sharding import DEFAULT_AXIS_RULES, AxisRules

SPECIAL = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """checkpoint: a Hugging Face Qwen2.5-VL directory (config.json, safetensors, tokenizer files).
    preset: with no checkpoint, random weights of this `models.qwen2_5_vl.PRESETS` size.
    tokenizer: a tokenizer directory (default: the checkpoint's).
    param_dtype: master weights (fp32 for training); compute_dtype: matmul dtype (bf16 on TPU).
    remat: recompute decoder layers and vision blocks in the backward pass. attention_chunk: block of text attention.
    attention_impl: the decoder's training attention, "flash" (JAX) or "splash" (Pallas TPU kernel).
    scan_layers: the layers run as one scan, in training and in the rollout (compile time independent of depth).
    kv_cache_dtype: the rollout's KV cache ("": the compute dtype).
    axis_rules: logical axis -> mesh axes (`sharding.DEFAULT_AXIS_RULES`)."""

    checkpoint: str = ""
    preset: str = ""
    tokenizer: str = ""
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False
    attention_chunk: int = 512
    attention_impl: str = "flash"
    scan_layers: bool = False
    kv_cache_dtype: str = ""
    axis_rules: AxisRules = DEFAULT_AXIS_RULES

    def runtime(self) -> dict:
        return dict(param_dtype=jnp.dtype(self.param_dtype), dtype=jnp.dtype(self.compute_dtype), remat=self.remat,
                    attention_chunk=self.attention_chunk, attention_impl=self.attention_impl,
                    scan_layers=self.scan_layers,
                    kv_cache_dtype=jnp.dtype(self.kv_cache_dtype) if self.kv_cache_dtype else None, axis_rules=tuple(map(tuple, self.axis_rules)))


def load_tokenizer(spec: ModelSpec):
    path = spec.tokenizer or spec.checkpoint
    if not path:
        return build_tokenizer()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model.tokenizer / model.checkpoint {path!r} is not a directory")
    return transformers.AutoTokenizer.from_pretrained(path)


def check_tokenizer(config, tokenizer, where: str) -> None:
    """The model's special ids must be the tokenizer's (else image tokens or EOS go unrecognised)."""
    ids = tokenizer.convert_tokens_to_ids
    want = dict(zip(SPECIAL, (config.image_token_id, config.vision_start_token_id, config.vision_end_token_id,
                              config.eos_token_id)))
    bad = [f"{t}: model {i}, tokenizer {ids(t)}" for t, i in want.items() if ids(t) != i]
    if len(tokenizer) > config.text.vocab_size:
        bad.append(f"tokenizer has {len(tokenizer)} tokens, the model's vocabulary {config.text.vocab_size}")
    if bad:
        raise ValueError(f"{where}: the tokenizer does not match the model: " + "; ".join(bad))


def load(spec: ModelSpec, mesh, *, seed: int = 0):
    """-> (tokenizer, model on `mesh`)."""
    tokenizer = load_tokenizer(spec)
    runtime = spec.runtime()
    if spec.checkpoint:
        if not os.path.isfile(os.path.join(spec.checkpoint, "config.json")):
            raise FileNotFoundError(f"model.checkpoint={spec.checkpoint!r} has no config.json")
        with jax.transfer_guard("allow"):
            model = from_pretrained(spec.checkpoint, mesh=mesh, dtype=runtime.pop("param_dtype"),
                                    compute_dtype=runtime.pop("dtype"), **runtime)
    elif spec.preset:
        config = get_preset(spec.preset, **runtime)
        if not spec.tokenizer:
            config = for_tokenizer(config, tokenizer)
        with jax.transfer_guard("allow"):
            model = Qwen2_5_VL(config, rngs=nnx.Rngs(seed), mesh=mesh)
    else:
        raise ValueError("set model.checkpoint (a Hugging Face directory) or model.preset (random weights)")
    check_tokenizer(model.config, tokenizer, spec.checkpoint or f"preset {spec.preset}")
    return tokenizer, model
