"""The experiments `launch.train` and `launch.eval` run, by the config's `experiment` name."""

from deepeyes_jax.train.experiment import Experiment
from deepeyes_jax.vstar_mini.experiment import VStarMini

EXPERIMENTS = {"deepeyes": Experiment, "vstar_mini": VStarMini}


def get(cfg, workdir: str, mesh) -> Experiment:
    if cfg.experiment not in EXPERIMENTS:
        raise ValueError(f"--config.experiment={cfg.experiment!r}; choose one of {sorted(EXPERIMENTS)}")
    return EXPERIMENTS[cfg.experiment](cfg, workdir, mesh)
