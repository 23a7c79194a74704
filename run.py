#!/usr/bin/env python
"""kvbench entry point: `python run.py method=dynamickv budget=128` (see README)."""
import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from kvbench.config import sweepable_method_settings  # (importing kvbench.config registers its resolvers)
from kvbench.multirun import job_error
from kvbench.pipeline import Interrupted, evaluate
from kvbench.summary import print_summary

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        scores = evaluate(cfg)
    except Interrupted as err:
        logging.getLogger("kvbench").error("%s", err)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        logging.getLogger("kvbench").error("interrupted before the first sample; rerun the same command to start")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:  # noqa: BLE001 - one line + exit 2; a multirun job returns it (kvbench.multirun)
        return job_error(err)
    return print_summary(cfg, scores)


if __name__ == "__main__":
    sys.argv[1:] = sweepable_method_settings(sys.argv[1:], multirun=bool({"-m", "--multirun"} & set(sys.argv)))
    try:
        main()
    except BrokenPipeError:  # `python run.py --help | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
