"""python -m stage2_train --student S --cache DIR [--cache DIR2 ...] --out RUN [--config YAML] ...

Every setting of stage2_train.config.TrainConfig is a flag (`max_steps` -> `--max-steps`);
precedence: defaults < --config YAML < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from kava_common import KavaError

from .config import FIELDS, TrainConfig, load_config


def _comment(name: str) -> str:
    """The trailing comment of a field in config.py, used as its help text."""
    import inspect
    for line in inspect.getsource(TrainConfig).splitlines():
        if line.strip().startswith(f"{name}:") and "#" in line:
            return line.split("#", 1)[1].strip()
    return ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stage2_train", description=__doc__.split("\n\n")[0],
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help="YAML file of settings")
    p.add_argument("--cache", dest="caches", action="append", help="stage-1 cache folder; repeat per teacher")
    for name, f in FIELDS.items():
        if name == "caches":
            continue
        flag = "--" + name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, bool):
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=_comment(name))
        elif name in ("layer_map", "layer_weights", "teacher_weights"):
            p.add_argument(flag, dest=name, type=json.loads, help=_comment(name) + " (JSON)")
        else:
            typ = {int: int, float: float}.get(type(default), str)
            p.add_argument(flag, dest=name, type=typ, help=f"{_comment(name)} (default {default})")
    return p


def cli(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config", None)
    try:
        cfg = load_config(path, args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .train import main
    try:
        main(cfg)
    except (KavaError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
