"""python -m stage1_extract --teacher T [--teacher T2 ...] --dataset {gsm8k,synthetic,PATH} ...

Under torchrun or a SLURM job array, --num-shards and --shard-index default to the launcher's
(WORLD_SIZE / RANK, SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_ID) and --out to $KAVA_CACHE_DIR
when set (kava_common.launch); flags win."""

from __future__ import annotations

import sys

from kava_common import KavaError
from kava_common.cli import parse_settings
from kava_common.launch import stage1_defaults

from .config import ExtractConfig

DESCRIPTION = "Run each teacher once over a data set and write its per-layer K/V cache."


def cli(argv=None) -> int:
    given = parse_settings(ExtractConfig, argv, prog="python -m stage1_extract", description=DESCRIPTION)
    try:
        defaults, said = stage1_defaults(given)
        cfg = ExtractConfig(**{**defaults, **given})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in said:
        print(line, file=sys.stderr)
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
