"""`launch.aot`: the training programs compiled for a TPU topology on this CPU (libtpu), reported as JSON."""

import glob
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

# libtpu allows one process per machine unless told otherwise (this worker and the launcher both load it).
os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"

from deepeyes_jax.train import aot  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.preset=tiny", "--config.prompts=2", "--config.grpo.group_size=2",
        "--config.actor.micro_batches=2", "--config.rollout.row_chunks=1", "--config.actor.logprob_chunk=128",
        "--config.data.prompt_len=256", "--config.data.num_patches=64", "--config.data.max_pixels=12544",
        "--config.rollout.max_total_len=384", "--config.rollout.max_turns=2", "--config.rollout.max_turn_tokens=32",
        "--config.rollout.crop.image_height=112", "--config.rollout.crop.image_width=112",
        "--config.rollout.crop.max_pixels=12544"]
FIELDS = ("program", "topology", "devices", "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
          "peak_bytes", "hbm_bytes", "fits", "flops", "compile_s", "prompts_per_step", "group_size",
          "max_prompt_tokens", "max_total_len", "max_turns", "max_turn_tokens", "crop_max_pixels")


@pytest.fixture(scope="module")
def tiny_v5p(tmp_path_factory):
    """launch.aot on a tiny config for v5p:2x2x1 (4 chips, all fsdp): the rollout and the update, the rollout's
    optimised HLO dumped by XLA -> (JSON lines, that HLO text)."""
    dump = tmp_path_factory.mktemp("xla_dump")
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*rollout.*")
    out = subprocess.run([sys.executable, "-m", "launch.aot", "--config=configs/deepeyes_7b.py",
                          "--topology=v5p:2x2x1", "--programs=rollout_and_score,update", *TINY], cwd=ROOT,
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    (hlo,) = glob.glob(str(dump / "*rollout*after_optimizations.txt"))
    return lines, open(hlo).read()


def test_launch_aot_reports_every_program_and_a_summary(tiny_v5p):
    """Every field, memory that adds up, loop-aware FLOPs above XLA's once-per-loop count, the summary last."""
    lines, _ = tiny_v5p
    assert [line.get("program") for line in lines] == ["rollout_and_score", "update", None] and lines[-1]["summary"]
    for report in lines[:2]:
        assert set(FIELDS) <= set(report)
        assert (report["topology"], report["devices"], report["max_total_len"], report["group_size"]) == (
            "v5p:2x2x1", 4, 384, 2)
        assert report["peak_bytes"] == (report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
                                        + report["temp_bytes"])
        assert report["fits"] and report["peak_bytes"] < report["hbm_bytes"] == int(95.73 * 2**30)
        assert report["flops"] > 2 * report["xla_flops"] > 0  # decode, micro-batch and attention loops counted
    assert lines[1]["alias_bytes"] > 0  # the update donates parameters and optimizer state
    summary = lines[-1]
    assert summary["programs"] == ["rollout_and_score", "update"] and summary["fits"] and 0 < summary["mfu"] < 1
    assert summary["step_flops"] == lines[0]["flops"] + lines[1]["flops"]


def test_decode_loops_never_all_gather_a_weight(tiny_v5p):
    """Under FSDP the rollout gathers each weight once (`Qwen2_5_VL.for_decoding`), not once per decoded token:
    the program gathers weights, but no all-gather inside the compiled turn / decode loops produces a weight's
    shape, per layer or stacked (the config scans its layers). (Measured: without it, 47 of the loops' 58
    all-gathers were weights; the other 11 were activations, gone since rows are encoded on their own devices.)"""
    from deepeyes_jax.testing import qwen_tokenizer
    from deepeyes_jax.train.model_spec import ModelSpec

    _, hlo = tiny_v5p
    mesh = aot.topology_mesh("v5p:2x2x1", (1, -1, 1))
    _, _, params = aot.abstract_model(ModelSpec(preset="tiny"), qwen_tokenizer.build(), mesh)
    weights = {tuple(x.shape) for x in jax.tree.leaves(params) if len(x.shape) >= 2}
    weights |= {(n, *w) for w in weights for n in range(2, 65)}  # stacked for a scan over layers (`scan_layers`)

    def gathered(text):
        return [tuple(int(d) for d in m.group(1).split(",") if d)
                for m in re.finditer(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", text)]

    assert [g for g in gathered(hlo) if g in weights], "expected the once-per-rollout weight gathers"
    assert not [g for body in _while_bodies(hlo) for g in gathered(body) if g in weights]


def _while_bodies(hlo: str) -> list[str]:
    """The text of every computation a while loop runs (bodies, conditions and what they call, transitively)."""
    computations, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name = head.group(1)
            computations[name] = []
        elif name is not None:
            computations[name].append(line)
    text = {k: "\n".join(v) for k, v in computations.items()}
    todo = [n for t in text.values() for n in re.findall(r"body=%?([\w.\-]+)", t)]
    seen = set()
    while todo:
        n = todo.pop()
        if n not in seen and n in text:
            seen.add(n)
            todo.extend(c for c in re.findall(r"%([\w.\-]+)", text[n]) if c in text)  # names are unique
    assert seen, "no while loop in the program"
    return [text[n] for n in seen]


def test_splash_attention_compiles_to_the_mosaic_kernel_for_tpu():
    """`attention_impl="splash"` compiled for v5p: the decoder attention's gradient (bf16, 4,096 tokens, GQA) is the
    Pallas kernel's three Mosaic custom calls (forward, dq, dkv), in shard_map without any collective, and its
    temporaries stay under a tenth of one dense [heads, T, T] fp32 score matrix per row."""
    from deepeyes_jax.models import splash_attention
    from deepeyes_jax.sharding import Sharder

    mesh = aot.topology_mesh("v5p:2x2x1", (1, -1, 1))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    q = jax.ShapeDtypeStruct((4, 4096, 8, 128), jnp.bfloat16, sharding=rows)
    kv = jax.ShapeDtypeStruct((4, 4096, 2, 128), jnp.bfloat16, sharding=rows)
    valid = jax.ShapeDtypeStruct((4, 4096), jnp.bool_, sharding=rows)

    def loss(q, k, v, valid):
        out = splash_attention.causal_attention(q, k, v, valid, block=512, shard=Sharder(mesh))
        return jnp.sum(out.astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, valid).compile()
    hlo = compiled.as_text()
    assert hlo.count("custom_call_target=\"tpu_custom_call\"") == 3
    assert not re.search(r"all-gather|all-reduce|all-to-all|collective-permute", hlo)
    assert compiled.memory_analysis().temp_size_in_bytes < 8 * 4096 * 4096 * 4 / 10  # measured 34 MB vs 537 MB


def test_a_program_that_does_not_fit_is_reported_not_raised():
    """XLA's CompileTimeHbmOom becomes fits=false with the figure from its message (v5e: 15.75 GiB)."""
    mesh = aot.topology_mesh("v5e:2x2", (1, -1, 1))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    x = jax.ShapeDtypeStruct((40000, 160000), jnp.float32, sharding=sharding)
    report = aot.compile_report("big", jax.jit(lambda a: (a @ a.T).sum()), (x,), topology="v5e:2x2", mesh=mesh,
                                shapes={})
    assert report["fits"] is False and report["error"] == "CompileTimeHbmOom"
    assert report["temp_bytes"] > report["hbm_bytes"] == int(15.75 * 2**30)
    assert report["flops"] == 2 * 40000 * 40000 * 160000


def test_unknown_topology_is_a_clear_error():
    with pytest.raises(ValueError, match="chip 'h100' unknown"):
        aot.topology_mesh("h100:8", (1, -1, 1))
