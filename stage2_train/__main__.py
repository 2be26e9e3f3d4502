"""python -m stage2_train --student S --cache DIR [--cache DIR2 ...] --out RUN [--config YAML] ...

Every setting of stage2_train.config.TrainConfig is a flag (`max_steps` -> `--max-steps`);
precedence: defaults < environment ($KAVA_RUNS_DIR/run for --out) < --config YAML < flags.
"""

from __future__ import annotations

import sys

from kava_common import KavaError
from kava_common.cli import parse_settings
from kava_common.launch import stage2_out_default

from .config import TrainConfig, load_config


def cli(argv=None) -> int:
    given = parse_settings(
        TrainConfig, argv, prog="python -m stage2_train", description=__doc__.split("\n\n")[0],
        extend=lambda p: p.add_argument("--config", default=None, metavar="YAML",
                                        help="YAML file of settings, between the defaults and the flags"))
    path = given.pop("config", None)
    try:
        env_out = stage2_out_default()      # $KAVA_RUNS_DIR: below the YAML and the flags
        cfg = load_config(path, given, defaults={"out": env_out} if env_out else None)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .train import Stopped, main
    try:
        main(cfg)
    except Stopped as e:                              # saved and said so: resumable, not finished
        return e.exit_code
    except (KavaError, ValueError, OSError) as e:     # OSError: a read-only or missing path, ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
