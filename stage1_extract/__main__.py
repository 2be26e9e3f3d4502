"""python -m stage1_extract --teacher T [--teacher T2 ...] --dataset {gsm8k,synthetic,PATH} ..."""

from __future__ import annotations

import argparse
import sys

from kava_common import KavaError

from .config import ExtractConfig


def parse_layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers wants comma-separated integers, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    d = ExtractConfig(teachers=["_"])
    p = argparse.ArgumentParser(
        prog="python -m stage1_extract",
        description="Run each teacher once over a data set and write its per-layer K/V cache.")
    p.add_argument("--teacher", dest="teachers", action="append", required=True,
                   help="hub id or local path; repeat for several teachers (one cache each)")
    p.add_argument("--dataset", default=d.dataset, help="gsm8k | synthetic | PATH to .jsonl/.json/"
                   ".parquet or a saved datasets folder with `question` and `answer`")
    p.add_argument("--split", default=d.split)
    p.add_argument("--out", default=d.out, help="root folder; each cache goes in a subfolder")
    p.add_argument("--max-samples", type=int, default=None, help="first N rows only")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help="tokens per sample; longer samples are cut and flagged")
    p.add_argument("--layers", type=parse_layers, default=None, help="e.g. 0,2,5 (default: all)")
    p.add_argument("--kv-dtype", default=d.kv_dtype, help="float16 | bfloat16 | float32")
    p.add_argument("--format", default=d.format, help="safetensors | hdf5")
    p.add_argument("--no-quantize", dest="quantize", action="store_false",
                   help="run the teacher unquantized (default: 4-bit bitsandbytes)")
    p.add_argument("--quant-type", default=d.quant_type, help="nf4 | fp4")
    p.add_argument("--double-quant", action="store_true", help="4-bit double quantization")
    p.add_argument("--cpu-4bit-kernel", default=d.cpu_4bit_kernel,
                   help="bitsandbytes CPU path: auto | packed (needs AVX512-BF16) | plain")
    p.add_argument("--dtype", default=d.dtype, help="unquantized teacher dtype (auto: fp32 on "
                   "CPU, bf16 on GPU)")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--revision", default=None, help="hub revision for the teachers")
    p.add_argument("--shard-mb", type=float, default=d.shard_mb, help="target shard size, MB")
    p.add_argument("--no-disk-check", dest="disk_check", action="store_false",
                   help="start even when the size estimate exceeds the free space")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of --dataset synthetic")
    p.add_argument("--num-shards", type=int, default=d.num_shards,
                   help="split the work over N processes writing one cache (default 1)")
    p.add_argument("--shard-index", type=int, default=d.shard_index,
                   help="this process's part, 0..N-1; the last to finish writes the manifest")
    p.add_argument("--no-direct-io", dest="direct_io", action="store_false",
                   help="write shards through the page cache instead of with O_DIRECT (same files)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = ExtractConfig(**vars(args))
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
    except (KavaError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for d in dirs:
        done = (d / "manifest.json").is_file()
        print(f"cache: {d}" if done else f"cache (this part done, other processes pending): {d}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
