"""Dependencies point down the layers: data, sharding, flops <- models <- rollout <- rl <- sft, eval <- train <- experiment
packages (vstar_mini) and test helpers <- launch and configs. No generic package imports an experiment, the
library never imports torch, benchmarks never import the tests."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK = {"sharding": 0, "flops": 0, "data": 0, "models": 1, "rollout": 2, "rl": 3, "sft": 4, "eval": 4, "train": 5,
        "vstar_mini": 6, "testing": 6, "launch": 7, "configs": 7, "benchmarks": 7}
GENERIC = ("sharding", "flops", "data", "models", "rollout", "rl", "sft", "eval", "train")


def _imports(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def _files(top):
    for root, _, names in os.walk(os.path.join(ROOT, top)):
        yield from (os.path.join(root, n) for n in names if n.endswith(".py"))


def _layer(path):
    rel = os.path.relpath(path, ROOT).split(os.sep)
    if rel[0] != "deepeyes_jax":
        return rel[0]
    return rel[1].removesuffix(".py") if len(rel) > 1 else "sharding"


def _target(module):
    parts = module.split(".")
    if parts[0] == "deepeyes_jax" and len(parts) > 1:
        return parts[1]
    return parts[0] if parts[0] in ("launch", "configs", "benchmarks", "tests") else None


def test_every_import_points_down_the_layers():
    bad = []
    for top in ("deepeyes_jax", "launch", "configs", "benchmarks"):
        for path in _files(top):
            layer = _layer(path)
            for module in _imports(path):
                target = _target(module)
                if target is None or target == layer:
                    continue
                if target == "tests" or RANK.get(target, 99) >= RANK[layer]:
                    bad.append(f"{os.path.relpath(path, ROOT)} ({layer}) imports {module}")
    assert not bad, "\n".join(bad)


def test_generic_packages_know_no_experiment_and_no_torch():
    bad = []
    for path in _files("deepeyes_jax"):
        for module in _imports(path):
            if module.split(".")[0] == "torch" or (_layer(path) in GENERIC and _target(module) in ("vstar_mini",
                                                                                                    "testing")):
                bad.append(f"{os.path.relpath(path, ROOT)} imports {module}")
    assert not bad, "\n".join(bad)


def test_benchmarks_do_not_reach_into_the_tests():
    test_modules = {n.removesuffix(".py") for n in os.listdir(os.path.join(ROOT, "tests")) if n.endswith(".py")}
    for path in _files("benchmarks"):
        assert "sys.path" not in open(path).read(), path
        assert not {m.split(".")[0] for m in _imports(path)} & (test_modules | {"tests"}), path
