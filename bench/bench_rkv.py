"""What R-KV slots cost on disk: bytes per sample of the compressed chain-of-thought K/V (stage 1
--rkv-slots M) beside the full cache's K/V.

    python bench/bench_rkv.py                       # tiny teacher, measured; Qwen2.5-1.5B shape, laid out

Tiny teacher: stage 1 runs over `--samples` synthetic problems with and without --rkv-slots, and
the shards' tensors are summed by kind. Qwen2.5-1.5B shape (28 layers, 2 KV heads, head_dim 128,
float16): the shard layout stage 1 would write for samples of the token counts the tiny run's
problems have (the tiny tokenizer's counts; nothing is run), so that the ratio shows at the
real geometry. Metadata there counts only the offsets this script lays out.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from header import header

from kava_common import save_pretrained
from kava_common.cache import open_cache, shard_layout
from kava_common.geometry import KVGeometry
from kava_demo import tiny
from stage1_extract.config import ExtractConfig
from stage1_extract.extract import main as extract

KINDS = {"K/V": ("k.", "v."), "R-KV slots": ("rkv_k.", "rkv_v.", "rkv_index"), "R-KV importance": ("rkv_importance.",)}


def by_kind(path: Path) -> dict[str, int]:
    """Bytes of a cache's shard tensors, summed by kind (the rest: token metadata and texts)."""
    out = dict.fromkeys([*KINDS, "metadata"], 0)
    for sh, _ in open_cache(path).shards():
        for name in sh.names():
            t = sh.read(name)
            kind = next((k for k, prefixes in KINDS.items() if name.startswith(prefixes)), "metadata")
            out[kind] += t.numel() * t.element_size()
    return out


def line(what: str, sizes: dict[str, int], n: int) -> str:
    kv = sizes["K/V"]
    slots, imp = sizes["R-KV slots"], sizes["R-KV importance"]
    return (f"{what}: per sample K/V {kv / n / 1e3:.1f} kB, R-KV slots {slots / n / 1e3:.1f} kB "
            f"({slots / kv:.3f}x the K/V), importance {imp / n / 1e3:.1f} kB ({imp / kv:.3f}x), "
            f"metadata {sizes['metadata'] / n / 1e3:.1f} kB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--slots", type=int, nargs="+", default=[8, 24])
    a = ap.parse_args(argv)
    print(header())
    root = Path(tempfile.mkdtemp(dir=Path("data_cache").resolve() if Path("data_cache").is_dir() else None))
    tok = tiny.train_tokenizer(tiny.corpus(2000), vocab_size=384)
    teacher = save_pretrained(tiny.build_model(tiny.demo_pair(tok)[0], seed=1), tok, root / "teacher")
    base = dict(teachers=[str(teacher)], dataset="synthetic", max_samples=a.samples, batch_size=16, quantize=False,
                device="cpu", progress=False)
    counts = None
    for m in a.slots:
        (path,) = extract(ExtractConfig(**base, out=str(root / f"m{m}"), rkv_slots=m))
        c = open_cache(path)
        print(line(f"tiny teacher (4 layers, 2 KV heads x 64, float16), M {m}, {len(c)} samples", by_kind(path), len(c)))
        counts = [c.text(i)["token_segments"] for i in range(len(c))], [len(c.kv(i)["input_ids"]) for i in range(len(c))]
    # the Qwen2.5-1.5B shape, laid out for the same token counts
    geo = KVGeometry(28, 12, 2, 128, {"rope_theta": 1000000.0})
    lens = counts[1]
    meta = {"sample_offsets": torch.zeros(len(lens) + 1, dtype=torch.int64), "rows": torch.zeros(len(lens), dtype=torch.int64)}
    meta["sample_offsets"][1:] = torch.tensor(lens).cumsum(0)
    for m in a.slots:
        layout = shard_layout(meta, list(range(28)), geo, torch.float16, rkv_slots=m)
        sizes = dict.fromkeys([*KINDS, "metadata"], 0)
        for name, (_, nbytes, _, _) in layout.places.items():
            kind = next((k for k, prefixes in KINDS.items() if name.startswith(prefixes)), "metadata")
            sizes[kind] += nbytes
        print(line(f"Qwen2.5-1.5B shape (28 layers, 2 KV heads x 128, float16), M {m}, the same token counts",
                   sizes, len(lens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
