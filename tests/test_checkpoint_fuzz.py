"""Untrusted checkpoint files: every malformed safetensors header, index and config.json is a `CheckpointError`
naming the file and the offending tensor or field, never another exception, a silent wrong read or a read outside
the checkpoint directory."""

import json
import os
import shutil
import struct

import numpy as np
import pytest
import safetensors.numpy

import hf_reference as H
from deepeyes_jax.models import qwen2_5_vl as q
from deepeyes_jax.models.qwen2_5_vl import CheckpointError
from deepeyes_jax.models.safetensors_io import SafetensorsFile

TENSORS = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int64),
           "c": np.ones((1, 2), np.float16)}


def _valid(tmp_path):
    """A file written by the safetensors library -> (path, header dict, data bytes)."""
    path = tmp_path / "x.safetensors"
    safetensors.numpy.save_file(TENSORS, path, metadata={"format": "pt"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return path, json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path, header, data: bytes, length=None):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def _refused(path, *needles):
    with pytest.raises(CheckpointError) as info:
        SafetensorsFile(str(path))
    message = str(info.value)
    assert str(path) in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def test_the_valid_file_reads_exactly(tmp_path):
    path, _, _ = _valid(tmp_path)
    st = SafetensorsFile(str(path))
    for k, v in TENSORS.items():
        np.testing.assert_array_equal(st.get(k), v)


BAD_VALUES = {
    "dtype": [None, 5, "F33", ["F32"], "f32"],
    "shape": [None, "2,3", [2.0, 3], [-2, 3], [True, 3], {}, [2, None]],
    "data_offsets": [None, [0], [0, 24, 48], ["0", "24"], [-24, 0], [24, 0], [0.0, 24.0], [True, 24], {}],
}


@pytest.mark.parametrize("tensor", sorted(TENSORS))
@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_every_entry_field_missing_or_of_the_wrong_type_is_named(tmp_path, tensor, field):
    path, header, data = _valid(tmp_path)
    for value in [...] + BAD_VALUES[field]:  # ... = the field removed
        edited = json.loads(json.dumps(header))
        if value is ...:
            del edited[tensor][field]
        else:
            edited[tensor][field] = value
        _write(path, edited, data)
        _refused(path, repr(tensor))


@pytest.mark.parametrize("edit,needles", [
    (lambda h, d: ({**h, "a": "F32"}, d), ["'a'", "exactly dtype, shape and data_offsets"]),
    (lambda h, d: ({**h, "a": {**h["a"], "extra": 1}}, d), ["'a'", "exactly"]),
    (lambda h, d: ({**h, "a": {**h["a"], "shape": [2 ** 62, 2 ** 62]}}, d), ["'a'", "needs"]),  # no overflow
    (lambda h, d: ({**h, "a": {**h["a"], "shape": [3, 3]}}, d), ["'a'", "needs 36"]),
    (lambda h, d: (h, d[:-1]), ["truncated"]),
    (lambda h, d: (h, d + b"\0" * 8), ["trailing"]),
    (lambda h, d: (_shift(h, -8), d), ["overlap"]),  # the last tensor starts inside the one before
    (lambda h, d: (_shift(h, 8), d + b"\0" * 8), ["gap"]),
    (lambda h, d: ({**h, "__metadata__": ["x"]}, d), ["__metadata__"]),
    (lambda h, d: ({**h, "__metadata__": {"format": 1}}, d), ["__metadata__"]),
    (lambda h, d: ([1, 2], d), ["JSON list"]),
    (lambda h, d: (b'{"a": 1, "a": 2}', d), ["duplicate key 'a'"]),
    (lambda h, d: (json.dumps(h).replace("[", "[NaN, ", 1).encode(), d), ["non-finite"]),
    (lambda h, d: (b"\xff\xfe{", d), ["not valid JSON"]),
    (lambda h, d: (b"[" * 100_000, d), ["not valid JSON"]),  # deep nesting: RecursionError inside json
])
def test_malformed_headers_and_layouts_are_named(tmp_path, edit, needles):
    path, header, data = _valid(tmp_path)
    _write(path, *edit(header, data))
    _refused(path, *needles)


def _shift(header, by):
    """The header with its last tensor's data moved by `by` bytes."""
    h = json.loads(json.dumps(header))
    last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    h[last]["data_offsets"] = [o + by for o in h[last]["data_offsets"]]
    return h


@pytest.mark.parametrize("length", [2 ** 63, 2 ** 64 - 1, 10 ** 9, 0])
def test_absurd_header_lengths(tmp_path, length):
    path, header, data = _valid(tmp_path)
    _write(path, header, data, length=length)
    _refused(path)
    path.write_bytes(b"\1\2\3")
    _refused(path, "shorter than its 8-byte header length")


def test_random_header_corruption_never_escapes_as_another_error(tmp_path):
    """500 seeded mutations of the header bytes (flips, deletions, insertions): each file is refused with a
    CheckpointError or, if it still parses, every tensor reads back with its declared shape and dtype."""
    path, header, data = _valid(tmp_path)
    blob = json.dumps(header).encode()
    rng = np.random.default_rng(0)
    refused = 0
    for _ in range(500):
        b = bytearray(blob)
        for _ in range(rng.integers(1, 4)):
            i, kind = int(rng.integers(len(b))), rng.integers(3)
            if kind == 0:
                b[i] = int(rng.choice(list(b'{}[]",:0123456789-.e ')))
            elif kind == 1:
                del b[i]
            else:
                b.insert(i, int(rng.integers(256)))
        _write(path, bytes(b), data)
        try:
            st = SafetensorsFile(str(path))
        except CheckpointError:
            refused += 1
            continue
        for k in st.keys():
            assert st.get(k).shape == st.shape(k)
    assert refused > 400  # most mutations break the JSON or the layout


# ----------------------------------------------------------------------------- directories: index and config


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny checkpoint saved by transformers in 3 shards with an index."""
    path = tmp_path_factory.mktemp("sharded")
    H.hf_model(H.hf_config()).save_pretrained(path, max_shard_size="100KB")
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) >= 3
    return path


def _copy(sharded, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(sharded, dst)
    return dst


INDEX = "model.safetensors.index.json"


def _edit_json(path, name, edit):
    data = json.loads((path / name).read_text())
    edit(data)
    (path / name).write_text(json.dumps(data))


def _refused_naming(path, name, needle):
    """Loading the checkpoint at `path` is a CheckpointError naming file `name` and containing `needle`."""
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as info:
        q.from_pretrained(str(path))
    assert needle in str(info.value), str(info.value)


def test_the_sharded_checkpoint_loads(sharded):
    q.from_pretrained(str(sharded))


@pytest.mark.parametrize("target", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../outside.safetensors",
                                    "./../outside.safetensors", "..\\outside.safetensors", "C:outside.safetensors",
                                    "", "missing.safetensors", 7])
def test_index_paths_never_leave_the_directory(sharded, tmp_path, target):
    """An index entry naming a shard outside the checkpoint directory is refused before it is opened: the
    outside file here is a valid shard holding the tensor, so reading it would load silently."""
    path = _copy(sharded, tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    data = json.loads((path / INDEX).read_text())
    shutil.copy(path / data["weight_map"][name], tmp_path / "outside.safetensors")
    _edit_json(path, INDEX, lambda d: d["weight_map"].__setitem__(name, target))
    _refused_naming(path, INDEX, repr(target))


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d.pop("weight_map"), "no weight_map"),
    (lambda d: d.__setitem__("weight_map", ["x"]), "no weight_map"),
    (lambda d: d["weight_map"].__setitem__("model.norm.weight", None), "weight_map['model.norm.weight']"),
])
def test_malformed_index_is_named(sharded, tmp_path, edit, needle):
    path = _copy(sharded, tmp_path)
    _edit_json(path, INDEX, edit)
    _refused_naming(path, INDEX, needle)


def _text(key, value):
    return lambda c: c["text_config"].__setitem__(key, value)


@pytest.mark.parametrize("edit,needle", [
    (_text("hidden_size", "64"), "text_config.hidden_size"),
    (_text("num_hidden_layers", -1), "text_config.num_hidden_layers"),
    (_text("num_hidden_layers", True), "text_config.num_hidden_layers"),
    (_text("rms_norm_eps", "x"), "text_config.rms_norm_eps"),
    (lambda c: c["text_config"].pop("vocab_size") and c.pop("vocab_size", None), "missing field 'vocab_size'"),
    (lambda c: c["vision_config"].__setitem__("depth", 2.5), "vision_config.depth"),
    (lambda c: c["vision_config"].__setitem__("fullatt_block_indexes", [0.5]), "vision_config.fullatt_block_indexes"),
    (lambda c: c["text_config"]["rope_parameters"].__setitem__("mrope_section", [1.5, 3, 3]),
     "text_config.mrope_section"),
    (lambda c: c.__setitem__("model_type", "llama"), "not qwen2_5_vl"),
])
def test_malformed_config_is_named(sharded, tmp_path, edit, needle):
    path = _copy(sharded, tmp_path)
    _edit_json(path, "config.json", edit)
    _refused_naming(path, "config.json", needle)


@pytest.mark.parametrize("content", [b"[1, 2]", b"{not json", b'{"a": 1, "a": 2}'])
def test_config_that_is_not_a_json_object(sharded, tmp_path, content):
    path = _copy(sharded, tmp_path)
    (path / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="config.json"):
        q.from_pretrained(str(path))


def test_integer_tensor_where_a_float_weight_belongs(sharded, tmp_path):
    """An int tensor of the right shape would load silently cast; it is named instead."""
    path = _copy(sharded, tmp_path)
    data = json.loads((path / INDEX).read_text())
    name = "model.norm.weight"
    shard = path / data["weight_map"][name]
    tensors = safetensors.numpy.load_file(shard)
    tensors[name] = tensors[name].astype(np.int32)
    safetensors.numpy.save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"wrong dtype model\.norm\.weight: I32"):
        q.from_pretrained(str(path))
