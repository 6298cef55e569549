"""Test session setup: 8 fake CPU devices, persistent compilation cache, no network.

XLA_FLAGS must be set before jax is imported anywhere, which is why this lives in the
root conftest (pytest imports it before any test module). pytest.ini runs the suite on 2
xdist workers, a whole file per worker (module fixtures are built once); the longest files
are handed out first so that neither worker is left with them at the end.
"""

import os

os.environ["XLA_FLAGS"] = (  # 8 fake devices on 2 cores: collectives may wait past XLA's 40 s abort
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_cpu_collective_call_terminate_timeout_seconds=600"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("DEEPEYES_JAX_CACHE", os.path.expanduser("~/.cache/deepeyes_jax/xla")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


LONGEST_FIRST = ("test_train_launcher.py", "test_train_step.py", "test_rollout.py", "test_generic_launcher.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
