#!/usr/bin/env python
"""kvbench entry point: `python run.py method=dynamickv budget=128` (see README)."""
import hydra
from omegaconf import DictConfig

import kvbench.config  # noqa: F401  (registers the config resolvers)
from kvbench.multirun import job_error
from kvbench.pipeline import evaluate
from kvbench.summary import print_summary


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        scores = evaluate(cfg)
    except Exception as err:  # noqa: BLE001 - one line + exit 2; a multirun job returns it (kvbench.multirun)
        return job_error(err)
    return print_summary(cfg, scores)


if __name__ == "__main__":
    main()
