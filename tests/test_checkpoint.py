"""Hugging Face checkpoint round trips through transformers' own save/load, and bad checkpoints."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from flax import nnx

import hf_reference as H
from deepeyes_jax.models import qwen2_5_vl as q
from deepeyes_jax.models.qwen2_5_vl import CheckpointError
from deepeyes_jax.models.safetensors_io import SafetensorsFile


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_transformers_ours_transformers(tmp_path, tie):
    hf = H.hf_model(H.hf_config(tie=tie))
    hf.save_pretrained(tmp_path / "hf")
    ours = q.from_pretrained(str(tmp_path / "hf"))
    q.save_pretrained(ours, str(tmp_path / "ours"))
    back = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "ours")
    assert back.config.tie_word_embeddings == tie
    _assert_same_tensors(_state(hf), _state(back))
    # And our files use the Hub names real checkpoints use.
    names = set(SafetensorsFile(str(tmp_path / "ours" / "model.safetensors")).keys())
    assert "model.embed_tokens.weight" in names and "visual.patch_embed.proj.weight" in names
    assert "model.layers.0.self_attn.q_proj.bias" in names and "visual.merger.mlp.2.weight" in names
    assert ("lm_head.weight" in names) == (not tie)


def test_sharded_checkpoints_both_ways(tmp_path):
    hf = H.hf_model(H.hf_config())
    hf.save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    ours = q.from_pretrained(str(tmp_path / "hf"))
    q.save_pretrained(ours, str(tmp_path / "ours"), max_shard_bytes=150_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all(os.path.exists(tmp_path / "ours" / f) for f in files)
    back = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "ours")
    _assert_same_tensors(_state(hf), _state(back))


def test_bf16_checkpoint_stays_bf16(tmp_path):
    hf = H.hf_model(H.hf_config()).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    ours = q.from_pretrained(str(tmp_path / "hf"), dtype=jnp.bfloat16)
    assert ours.model.embed_tokens.weight[...].dtype == jnp.bfloat16
    q.save_pretrained(ours, str(tmp_path / "ours"))
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == "bfloat16"
    back = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "ours", dtype=torch.bfloat16)
    _assert_same_tensors(_state(hf), _state(back))


def test_bf16_checkpoint_into_fp32_master_weights(tmp_path):
    hf = H.hf_model(H.hf_config()).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    ours = q.from_pretrained(str(tmp_path / "hf"), dtype=jnp.float32)
    got = np.asarray(ours.model.layers[0].self_attn.q_proj.kernel[...])
    ref = hf.model.language_model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)


@pytest.fixture
def saved(tmp_path):
    H.hf_model(H.hf_config()).save_pretrained(tmp_path)
    return tmp_path


def _rewrite(path, edit):
    f = path / "model.safetensors"
    tensors = safetensors.numpy.load_file(f)
    edit(tensors)
    safetensors.numpy.save_file(tensors, f, metadata={"format": "pt"})


def _drop(name):
    return lambda t: t.pop(name)


def _put(name, shape):
    return lambda t: t.__setitem__(name, np.zeros(shape, np.float32))


@pytest.mark.parametrize("edit,message", [
    (_drop("model.layers.1.mlp.up_proj.weight"), r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"),
    (_put("visual.blocks.0.attn.qkv.weight", (96, 16)),
     r"wrong shape visual\.blocks\.0\.attn\.qkv\.weight: expected \[96, 32\], found \[96, 16\]"),
    (_put("model.layers.9.self_attn.q_proj.weight", (4, 4)),
     r"unexpected tensor model\.layers\.9\.self_attn\.q_proj\.weight"),
])
def test_bad_tensors_are_named(saved, edit, message):
    _rewrite(saved, edit)
    with pytest.raises(CheckpointError, match=message):
        q.from_pretrained(str(saved))


def test_truncated_file_is_reported(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        q.from_pretrained(str(saved))


def test_missing_directory_contents(tmp_path):
    H.hf_config().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        q.from_pretrained(str(tmp_path))


def test_reader_agrees_with_safetensors_library(tmp_path):
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(5, dtype=np.int64),
               "c": np.linspace(0, 1, 6, dtype=np.float16).reshape(2, 3)}
    safetensors.numpy.save_file(tensors, tmp_path / "x.safetensors")
    st = SafetensorsFile(str(tmp_path / "x.safetensors"))
    for k, v in tensors.items():
        np.testing.assert_array_equal(st.get(k), v)
        assert st.get(k).dtype == v.dtype
    torch_bf16 = {"w": torch.randn(3, 5).to(torch.bfloat16)}
    safetensors.torch.save_file(torch_bf16, tmp_path / "y.safetensors")
    got = SafetensorsFile(str(tmp_path / "y.safetensors")).get("w")
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), torch_bf16["w"].float().numpy())


_LOAD_RSS = """
import os, resource, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax
from flax import nnx
from deepeyes_jax.models import qwen2_5_vl as q
from deepeyes_jax.sharding import make_mesh
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = q.from_pretrained(sys.argv[1], mesh=make_mesh((1, 8, 1)))
jax.block_until_ready(nnx.state(model))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def test_loading_never_holds_a_second_host_copy(tmp_path):
    """FSDP-sharded load of a ~100 MB checkpoint: the peak RSS growth is the memory-mapped file
    (page cache) plus one sharded copy on the CPU devices, nothing more."""
    cfg = q.get_preset("100m").replace(text=q.TextConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=2, mrope_section=(8, 12, 12)))
    cfg = cfg.replace(image_token_id=8000, video_token_id=8001, vision_start_token_id=8002, vision_end_token_id=8003)
    q.save_pretrained(q.Qwen2_5_VL(cfg, rngs=nnx.Rngs(0)), str(tmp_path))
    size = os.path.getsize(tmp_path / "model.safetensors")
    assert size > 80e6
    out = subprocess.run([sys.executable, "-c", _LOAD_RSS, str(tmp_path)], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < 2.4 * size, (growth, size)
