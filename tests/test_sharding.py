"""The same model code under several meshes: same logits, parameters sharded by the rules,
activation constraints really present in the compiled program."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import hf_reference as H
from deepeyes_jax.models import qwen2_5_vl as q
from deepeyes_jax.models.qwen2_5_vl.model import _apply, jit_forward
from deepeyes_jax.sharding import DEFAULT_AXIS_RULES, Sharder, logical_to_spec, make_mesh, put_rows, take_rows

MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]
SEGMENTS = [[3, (1, 10, 14), 2], [1, (1, 4, 6), 6], [9], [2, (1, 6, 4), 1], [4], [6, (1, 4, 4)], [3], [8]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    H.hf_model(H.hf_config()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reference(checkpoint):
    inputs = H.make_inputs(np.random.default_rng(0), SEGMENTS)
    return inputs, np.asarray(jit_forward(q.from_pretrained(checkpoint))(*inputs))


@pytest.mark.parametrize("shape", MESHES)
def test_same_logits_on_every_mesh(checkpoint, reference, shape):
    assert jax.device_count() == 8
    inputs, want = reference
    model = q.from_pretrained(checkpoint, mesh=make_mesh(shape))
    got = jit_forward(model)(*inputs)
    valid = inputs[1].astype(bool)
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], atol=2e-5 * np.abs(want).max())
    assert len(got.sharding.device_set) == 8


def test_parameters_sharded_as_the_rules_say(checkpoint):
    mesh = make_mesh((1, 2, 4))
    model = q.from_pretrained(checkpoint, mesh=mesh)
    cases = {
        # kernel float[64, 64]: embed -> fsdp (2), heads -> tensor (4)
        "q": (model.model.layers[0].self_attn.q_proj.kernel, P("fsdp", "tensor"), (32, 16)),
        # embedding float[512, 64]: vocab -> tensor, embed -> fsdp
        "embed": (model.model.embed_tokens.weight, P("tensor", "fsdp"), (128, 32)),
        "lm_head": (model.lm_head.kernel, P("fsdp", "tensor"), (32, 128)),
        # fused vision qkv float[32, 3, 32]: the q/k/v axis is never split
        "qkv": (model.visual.blocks[0].attn.qkv.kernel, P("fsdp", None, "tensor"), (16, 3, 8)),
        "down": (model.model.layers[1].mlp.down_proj.kernel, P("tensor", "fsdp"), (32, 32)),
        "norm": (model.model.norm.weight, P(None), (64,)),
    }
    for name, (var, spec, shard_shape) in cases.items():
        arr = var[...]
        assert arr.sharding.spec == spec, name
        assert arr.addressable_shards[0].data.shape == shard_shape, name


def test_activation_constraints_are_in_the_program(checkpoint):
    inputs = H.make_inputs(np.random.default_rng(0), SEGMENTS)
    model = q.from_pretrained(checkpoint, mesh=make_mesh((2, 2, 2)))
    graphdef, state = nnx.split(model)
    hlo = _apply.lower(graphdef, state, *inputs).as_text()
    n = hlo.count("sharding_constraint")
    cfg = model.config
    # At least one per decoder layer and vision block (residual stream) plus the logits.
    assert n >= cfg.text.num_hidden_layers + cfg.vision.depth + 1, n
    unsharded = q.from_pretrained(checkpoint)
    graphdef, state = nnx.split(unsharded)
    assert _apply.lower(graphdef, state, *inputs).as_text().count("sharding_constraint") == 0


def test_forward_compiles_once_per_shape(checkpoint):
    model = q.from_pretrained(checkpoint, mesh=make_mesh((2, 2, 2)))
    forward = jit_forward(model)
    rng = np.random.default_rng(5)
    before = _apply._cache_size()
    for _ in range(3):  # new content and new image sizes, same static shapes
        inputs = H.make_inputs(rng, [[3, (1, 4, 8), 4], [1, (1, 8, 4), 6]], batch_pad=30)
        forward(*inputs).block_until_ready()
    assert _apply._cache_size() - before == 1


def test_logical_to_spec_rules():
    mesh = make_mesh((2, 2, 2))
    rules = DEFAULT_AXIS_RULES
    assert logical_to_spec(("activation_batch", None), rules, mesh, (8, 3)) == P(("data", "fsdp"), None)
    # 6 rows: data (2) divides, data*fsdp (4) does not -> keep data only.
    assert logical_to_spec(("activation_batch", None), rules, mesh, (6, 3)) == P("data", None)
    # A mesh axis is never used twice in one spec.
    assert logical_to_spec(("mlp", "heads"), rules, mesh, (8, 8)) == P("tensor", None)
    with pytest.raises(KeyError, match="'nonsense'"):
        logical_to_spec(("nonsense",), rules, mesh, (8,))


def test_sharder_rejects_wrong_rank():
    shard = Sharder(make_mesh((8, 1, 1)))
    with pytest.raises(ValueError, match=r"logical axes \('activation_batch',\) do not match"):
        shard(np.zeros((2, 3)), ("activation_batch",))


def test_make_mesh_checks_device_count():
    with pytest.raises(ValueError, match=r"mesh shape \(4, 4, 1\) needs 16 devices"):
        make_mesh((4, 4, 1))
    chex.assert_equal(make_mesh((1, 2, 4)).axis_names, ("data", "fsdp", "tensor"))
    assert dict(make_mesh((-1, 2, 1)).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match=r"mesh shape \(-1, 3, 1\) needs"):
        make_mesh((-1, 3, 1))


def test_take_rows_interleaves_and_loops_stay_local():
    x = np.arange(2 * 16 * 3).reshape(2, 16, 3)
    np.testing.assert_array_equal(np.asarray(take_rows(x, 1, 4, axis=1)), x[:, 1::4])  # rows c, c + n, ...
    y = np.asarray(put_rows(np.zeros_like(x), x[:, 1::4], 1, 4, axis=1))
    np.testing.assert_array_equal(y[:, 1::4], x[:, 1::4])
    assert not y[:, 0::4].any()
    with pytest.raises(ValueError, match="16 rows do not split into 3 parts"):
        take_rows(x, 0, 3, axis=1)
    # A loop over the parts of a row-sharded array moves no rows between devices (contiguous parts would
    # each live on two of the eight devices: every step would gather them) and copies one part at a time,
    # never a reordered whole.
    mesh = make_mesh((1, 8, 1))
    rows = jax.sharding.NamedSharding(mesh, P("fsdp"))
    loop = jax.jit(lambda a: jax.lax.scan(lambda c, i: (c + jnp.sin(take_rows(a, i, 4)).sum(), None), 0.0,
                                          jnp.arange(4))[0])
    compiled = loop.lower(jax.ShapeDtypeStruct((64, 1024), np.float32, sharding=rows)).compile()
    hlo = compiled.as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo and "collective-permute" not in hlo
    assert compiled.memory_analysis().temp_size_in_bytes < 64 * 1024 * 4 // 8  # less than a device's rows


def test_each_row_encodes_its_images_on_its_own_devices(checkpoint):
    """`encode_rows` (rollout prompts and crops, the update's packed images) keeps every row's patches on the
    devices that hold the row: the compiled program gathers weights (FSDP) and nothing else, and gives what a
    per-row encoding on one device gives. (A plain vmap let the tower's patch constraint move every row:
    all-to-all plus activation all-gathers.)"""
    mesh = make_mesh((2, 4, 1))
    model = q.from_pretrained(checkpoint, mesh=mesh)
    rows = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
    rng = np.random.default_rng(3)
    pixels = rng.normal(size=(8, 96, model.config.vision.patch_dim)).astype(np.float32)
    grids = np.array([[[1, 8, 12]], [[1, 4, 4]]] * 4, np.int32)
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda s, p, g: nnx.merge(graphdef, s).encode_rows(p, g))
    args = (jax.device_put(pixels, rows), jax.device_put(grids, rows))
    hlo = encode.lower(state, *args).compile().as_text()
    weights = {tuple(x.shape) for x in jax.tree.leaves(state)}
    gathered = [tuple(int(d) for d in m.group(1).split(",") if d)
                for m in re.finditer(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo)]
    assert "all-to-all" not in hlo and gathered and set(gathered) <= weights, gathered
    got = np.asarray(encode(state, *args))
    single = q.from_pretrained(checkpoint)
    for r in (0, 1):
        want = np.asarray(single.encode_images(pixels[r], grids[r]))
        np.testing.assert_allclose(got[r], want, atol=1e-5)
