"""python -m stage2_train --student S --cache DIR [--cache DIR2 ...] --out RUN [--config YAML] ...

Every setting of stage2_train.config.TrainConfig is a flag (`max_steps` -> `--max-steps`);
precedence: defaults < environment ($KAVA_RUNS_DIR/run for --out) < --config YAML < flags.
"""

from __future__ import annotations

import sys

from kava_common.cli import command
from kava_common.launch import stage2_out_default

from .config import TrainConfig, load_config


def settings(given: dict) -> TrainConfig:
    path = given.pop("config", None)
    env_out = stage2_out_default()      # $KAVA_RUNS_DIR: below the YAML and the flags
    return load_config(path, given, defaults={"out": env_out} if env_out else None)


def train(cfg: TrainConfig) -> None:
    from .train import main
    main(cfg)                           # a stop by signal raises train.Stopped: exit 130 / 143


main = command(TrainConfig, train, prog="python -m stage2_train", description=__doc__.split("\n\n")[0],
               build=settings, extend=lambda p: p.add_argument(
                   "--config", default=None, metavar="YAML",
                   help="YAML file of settings, between the defaults and the flags"))


if __name__ == "__main__":
    sys.exit(main())
