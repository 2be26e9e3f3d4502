"""python -m stage1_extract --teacher T [--teacher T2 ...] --dataset {gsm8k,synthetic,PATH} ..."""

from __future__ import annotations

import sys

from kava_common import KavaError
from kava_common.cli import parse_settings

from .config import ExtractConfig

DESCRIPTION = "Run each teacher once over a data set and write its per-layer K/V cache."


def cli(argv=None) -> int:
    given = parse_settings(ExtractConfig, argv, prog="python -m stage1_extract", description=DESCRIPTION)
    try:
        cfg = ExtractConfig(**given)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .extract import main
    try:
        dirs = main(cfg)
    except KeyboardInterrupt:
        print("\ninterrupted: finished shards are kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    except (KavaError, ValueError, OSError) as e:     # OSError: a read-only or missing path, ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    for d in dirs:
        done = (d / "manifest.json").is_file()
        print(f"cache: {d}" if done else f"cache (this part done, other processes pending): {d}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
