"""Qwen2.5-VL configuration: a frozen dataclass built from a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax.numpy as jnp

from deepeyes_jax.models.safetensors_io import CheckpointError, strict_json
from deepeyes_jax.sharding import DEFAULT_AXIS_RULES, AxisRules


ATTENTION_IMPLS = ("flash", "splash")
RUNTIME_FIELDS = ("param_dtype", "dtype", "axis_rules", "remat", "attention_chunk", "attention_impl", "scan_layers",
                  "kv_cache_dtype")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    tokens_per_second: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: C * T * P * P (1176 for Qwen2.5-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_units(self) -> int:
        """Side of an attention window, counted in merged (2x2) units."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: int = 151645  # <|im_end|>: where generation (ours, transformers', vLLM's) stops
    # Runtime choices, not part of the checkpoint.
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32  # compute dtype
    axis_rules: AxisRules = DEFAULT_AXIS_RULES
    remat: bool = False  # recompute decoder layers and vision blocks in the backward pass, not store activations
    attention_chunk: int = 512  # text attention runs in query / key blocks of this many rows (memory ~ chunk * T)
    # The decoder's training attention: "flash" (blocked JAX, any backend) or "splash" (the Pallas TPU kernel;
    # interpret mode elsewhere). The rollout's KV-cache attention is the JAX path either way.
    attention_impl: str = "flash"
    # The decoder layers (teacher-forced passes and the rollout's cached decoding, its KV cache stacked [L, ...])
    # and each run of same-attention vision blocks run as one lax.scan over stacked weights: compile time
    # independent of depth.
    scan_layers: bool = False
    kv_cache_dtype: Any = None  # the rollout's KV cache (None: the compute dtype); bf16 halves it under fp32

    def __post_init__(self):
        t, v = self.text, self.vision
        if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
            raise ValueError(
                f"text hidden_size {t.hidden_size} / heads {t.num_attention_heads} / "
                f"kv heads {t.num_key_value_heads} do not divide"
            )
        if sum(t.mrope_section) * 2 != t.head_dim:
            raise ValueError(f"mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}")
        if v.hidden_size % v.num_heads or v.head_dim % 4:
            raise ValueError(f"vision head_dim {v.hidden_size}/{v.num_heads} must be a multiple of 4")
        if v.out_hidden_size != t.hidden_size:
            raise ValueError(f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
        if v.window_size % (v.spatial_merge_size * v.patch_size):
            raise ValueError(f"window_size {v.window_size} must be a multiple of merge*patch")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} outside the {v.depth} vision blocks")

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def runtime(self) -> dict[str, Any]:
        """The runtime fields (not part of the checkpoint), e.g. to load a checkpoint with the same ones."""
        return {f: getattr(self, f) for f in RUNTIME_FIELDS}

    # ------------------------------------------------------------------ HF I/O

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **runtime) -> ModelConfig:
        """Accept both the nested (`text_config`) and the older flat layout of config.json."""
        if d.get("model_type") not in (None, "qwen2_5_vl"):
            raise ValueError(f"config.json model_type {d.get('model_type')!r} is not qwen2_5_vl")
        text_d = dict(d)
        text_d.update(d.get("text_config") or {})
        rope = text_d.get("rope_parameters") or text_d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"rope type {rope_type!r} is not supported (only default M-RoPE)")
        if text_d.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True is not supported by Qwen2.5-VL in deepeyes-jax")
        if "video_config" in d or d.get("pixel_values_videos") is not None:
            raise ValueError("video inputs are not supported")
        heads = text_d["num_attention_heads"]
        text = TextConfig(
            vocab_size=text_d["vocab_size"],
            hidden_size=text_d["hidden_size"],
            intermediate_size=text_d["intermediate_size"],
            num_hidden_layers=text_d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=text_d.get("num_key_value_heads") or heads,
            rms_norm_eps=text_d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", text_d.get("rope_theta", 1000000.0))),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            max_position_embeddings=text_d.get("max_position_embeddings", 128000),
            hidden_act=text_d.get("hidden_act", "silu"),
        )
        vd = d.get("vision_config") or {}
        vrope = vd.get("rope_parameters") or {}
        vision = VisionConfig(
            depth=vd.get("depth", 32),
            hidden_size=vd.get("hidden_size", 1280),
            intermediate_size=vd.get("intermediate_size", 3420),
            num_heads=vd.get("num_heads", 16),
            out_hidden_size=vd.get("out_hidden_size", text.hidden_size),
            in_channels=vd.get("in_channels", vd.get("in_chans", 3)),
            patch_size=vd.get("patch_size", 14),
            temporal_patch_size=vd.get("temporal_patch_size", 2),
            spatial_merge_size=vd.get("spatial_merge_size", 2),
            window_size=vd.get("window_size", 112),
            fullatt_block_indexes=tuple(vd.get("fullatt_block_indexes", (7, 15, 23, 31))),
            hidden_act=vd.get("hidden_act", "silu"),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
            tokens_per_second=vd.get("tokens_per_second", 2),
        )
        _check_types(text, "text_config")
        _check_types(vision, "vision_config")
        tie = bool(d.get("tie_word_embeddings", False) or (d.get("text_config") or {}).get("tie_word_embeddings", False))
        return cls(
            text=text,
            vision=vision,
            tie_word_embeddings=tie,
            image_token_id=d.get("image_token_id", 151655),
            video_token_id=d.get("video_token_id", 151656),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            vision_end_token_id=d.get("vision_end_token_id", 151653),
            eos_token_id=_single_id(text_d.get("eos_token_id"), 151645),
            **runtime,
        )

    @classmethod
    def from_json_file(cls, path: str, **runtime) -> ModelConfig:
        """config.json -> ModelConfig; a file that is not a valid Qwen2.5-VL config (bad JSON, a missing field, a
        field of the wrong type or out of range) is a `CheckpointError` naming the file and the field."""
        with open(path, "rb") as f:
            d = strict_json(f.read(), path)
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: a JSON {type(d).__name__}, not an object")
        try:
            config = cls.from_hf_dict(d)
        except KeyError as e:
            raise CheckpointError(f"{path}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{path}: {e}") from None
        return config.replace(**runtime)  # the runtime fields are the caller's, not the file's

    def to_hf_dict(self) -> dict[str, Any]:
        """The nested layout transformers 5 writes (and reads back)."""
        t, v = self.text, self.vision
        text = dict(
            model_type="qwen2_5_vl_text",
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            rms_norm_eps=t.rms_norm_eps,
            hidden_act=t.hidden_act,
            max_position_embeddings=t.max_position_embeddings,
            use_sliding_window=False,
            rope_parameters=dict(rope_type="default", rope_theta=t.rope_theta, mrope_section=list(t.mrope_section)),
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=None,
            eos_token_id=self.eos_token_id,
        )
        vision = dict(
            model_type="qwen2_5_vl_vision",
            depth=v.depth,
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_heads=v.num_heads,
            out_hidden_size=v.out_hidden_size,
            in_channels=v.in_channels,
            patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size,
            window_size=v.window_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes),
            hidden_act=v.hidden_act,
            tokens_per_second=v.tokens_per_second,
            rope_parameters=dict(rope_type="axial", rope_theta=v.rope_theta),
        )
        return dict(
            architectures=["Qwen2_5_VLForConditionalGeneration"],
            model_type="qwen2_5_vl",
            text_config=text,
            vision_config=vision,
            tie_word_embeddings=self.tie_word_embeddings,
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id,
            eos_token_id=self.eos_token_id,
            dtype=jnp.dtype(self.param_dtype).name,
        )

    def save_json(self, directory: str) -> None:
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2)


def _check_types(cfg, section: str) -> None:
    """Every field of a Text/VisionConfig read from JSON has its annotated type (ints positive, floats finite and
    positive, tuples of non-negative ints), so a malformed config.json fails here, naming the field."""
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), str(f.type)
        if kind == "int":
            ok = type(value) is int and value > 0
        elif kind == "float":
            ok = type(value) in (int, float) and math.isfinite(value) and value > 0
        elif kind.startswith("tuple"):
            ok = all(type(x) is int and x >= 0 for x in value)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ValueError(f"{section}.{f.name} = {value!r} is not a valid {kind}")


def _single_id(value, default: int) -> int:
    """config.json's eos_token_id may be absent, null, an int or a list of ints (the first one stops)."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return default if value is None else int(value)
