"""python -m stage1_extract --teacher T [--teacher T2 ...] --dataset {gsm8k,synthetic,PATH} ...

Under torchrun or a SLURM job array, --num-shards and --shard-index default to the launcher's
(WORLD_SIZE / RANK, SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_ID) and --out to $KAVA_CACHE_DIR
when set (kava_common.launch); flags win."""

from __future__ import annotations

import sys

from kava_common.cli import command
from kava_common.launch import stage1_defaults

from .config import ExtractConfig

DESCRIPTION = "Run each teacher once over a data set and write its per-layer K/V cache."


def settings(given: dict) -> ExtractConfig:
    defaults, said = stage1_defaults(given)
    cfg = ExtractConfig(**{**defaults, **given})
    for line in said:
        print(line, file=sys.stderr)
    return cfg


def extract(cfg: ExtractConfig) -> None:
    from .extract import main
    for d in main(cfg):
        done = (d / "manifest.json").is_file()
        print(f"cache: {d}" if done else f"cache (this part done, other processes pending): {d}")


main = command(ExtractConfig, extract, prog="python -m stage1_extract", description=DESCRIPTION, build=settings,
               interrupted="interrupted: finished shards are kept; run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
