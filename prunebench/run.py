"""The `prunebench` command: Hydra composes conf/, then the pipeline runs."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

# importing the registries registers every schema in Hydra's ConfigStore before composition
from . import criteria, data, models  # noqa: F401
from .config import ConfigError, load_config


@hydra.main(version_base="1.3", config_path="pkg://prunebench.conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from .pipeline import run

    try:
        config = load_config(cfg)
        summary = run(config, HydraConfig.get().runtime.output_dir)
    except ConfigError as e:
        # a user error: one line, no traceback, nonzero exit, and no summary.json
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return summary["final"]["test_acc"]


if __name__ == "__main__":
    main()
