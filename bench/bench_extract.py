"""Stage-1 overhead: wall time of extraction divided by the teacher's forward-only time.

Both loops run the same length-sorted, padded batches through the same loaded model. The
forward-only side is the stock forward with the cache on (transformers' DynamicCache, which
concatenates each layer's K/V into a fresh tensor); the extraction side tokenizes, passes
stage 1's capturing cache (each layer's real-token K/V copied straight into the shard
buffer, no concatenation) and writes, in the background, the shards, sidecars and manifest.
Model loading is outside both timings and printed apart. Runs alternate (forward, extract,
forward, extract, ...) and the ratio uses each side's best time, so a noisy machine affects
both alike; the median of each extraction run over the forward-only run just before it is
printed beside it. Goal: ratio <= 1.10.

Stage 1 (without --logits-topk) ends each forward once the last stored layer's K/V are taken:
that layer's attention and MLP, any later layer and the head compute nothing it stores. The
ratio counts that saving, which is 1/L of a forward or more (a quarter for the tiny 4-layer
teachers, 1/28 for Qwen2.5-1.5B). A third side, the forward ending at the same point with
nothing copied, separates it out: stage 1 over that side is what stage 1's own work (tokenizing,
capture copies, screening, writing) costs.

    python bench/bench_extract.py                       # tiny fp32 + tiny nf4 + Qwen2.5-1.5B-shaped fp32
    python bench/bench_extract.py --cases tiny-fp32 --device cuda
    python bench/bench_extract.py --cases tiny-fp32 --repeats 5 --write-load
    python bench/bench_extract.py --cases tiny-nf4-plain --repeats 2   # bitsandbytes' plain CPU path
    python bench/bench_extract.py --cases qwen2.5-1.5b-nf4,qwen2.5-1.5b-nf4-plain   # real shape in 4-bit

`--write-load` adds a third side: forward-only while a thread writes the cache's bytes through
stage 1's own write path at the pace of a run. What it adds to forward-only is what writing
the cache costs the teacher on this machine (on a virtual disk the host's I/O work competes
with the guest's cores): a part of the ratio that only writing fewer bytes (fewer --layers, a
smaller --kv-dtype) reduces.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import kava_common
kava_common.set_process_defaults()  # before torch is imported
import torch

from kava_common import cache as kcache
from kava_common import save_pretrained
from kava_demo import tiny
from kava_common.data import load_rows, pad_id
from kava_common.geometry import KVGeometry
from kava_demo.tiny import QWEN25_15B   # real shape, random weights
from stage1_extract.config import ExtractConfig
from stage1_extract.capture import KVCapture, teacher_forward
from stage1_extract.extract import extract_teacher
from stage1_extract.samples import collate, length_sorted_batches, plan_shards, prepare_samples
from stage1_extract.teacher import load_teacher, quantization_settings

from header import header


def forward_only(cfg, model, tok, samples, partial: bool = False) -> float:
    """Time the teacher's forward passes alone over the batches stage 1 would run for
    `samples` (from prepare_samples). `partial`: each forward ends where stage 1's does,
    after the last stored layer's K/V (nothing copied): the same computation as stage 1's,
    so stage 1 over it is stage 1's own cost."""
    geometry = KVGeometry.from_config(model.config)
    bpt = geometry.bytes_per_token(cfg.kv_dtype, cfg.layers)
    pad = pad_id(tok)
    last = max(cfg.layers) if cfg.layers else geometry.num_layers - 1
    grab = KVCapture("bench-teacher", geometry, stop_after=last) if partial else None
    t0 = time.perf_counter()
    with torch.inference_mode():
        for members in plan_shards(samples, bpt, cfg.shard_mb * 1e6):
            for batch in length_sorted_batches(samples, members, cfg.batch_size):
                ids, mask, pos = collate([samples[members[p]].ids for p in batch], pad)
                out = teacher_forward(model, ids, mask, pos, grab.cache({}, [], *ids.shape) if grab else None)
                del out
    _sync(model)
    return time.perf_counter() - t0


def extract_once(cfg, model, tok, rows, root: Path) -> tuple[float, float, list[int]]:
    """Stage 1's wall time, its writer thread's CPU seconds, and the byte size of each shard."""
    out = Path(tempfile.mkdtemp(dir=root))
    c = ExtractConfig(**{**cfg.__dict__, "out": str(out)})
    lines = []
    t0 = time.perf_counter()
    cache_dir = extract_teacher(c, "bench-teacher", rows, model=model, tok=tok, log=lines.append)
    _sync(model)
    dt = time.perf_counter() - t0
    sizes = [e["bytes"] for e in json.loads((cache_dir / kcache.MANIFEST).read_text())["shards"]]
    shutil.rmtree(out)
    os.sync()   # the deletion's journal commit (and, on a disk mounted with `discard`, the trims
                # of the freed blocks) must not land in the next timed run
    cpu = [float(m.group(1)) for l in lines if (m := re.search(r"writer thread used ([0-9.]+) s", l))]
    return dt, (cpu[0] if cpu else float("nan")), sizes


def forward_under_write_load(cfg, model, tok, samples, root: Path, sizes: list[int], pace: float) -> float:
    """forward_only while a thread writes shards of `sizes` bytes through stage 1's own write
    path (checksum, O_DIRECT write, fsync, rename, sidecar), one every `pace` seconds, as a
    run does: what writing the cache costs the teacher's forward on this machine."""
    out = Path(tempfile.mkdtemp(dir=root))
    layouts = [kcache.ShardLayout([("x", torch.uint8, (n,))], {}) for n in sizes]
    flat = kcache.aligned_bytes(kcache.round_up(max(l.nbytes for l in layouts)))
    flat.fill_(1)
    stop = threading.Event()

    def load():
        for i, layout in enumerate(layouts):
            if stop.wait(pace):
                return
            kcache.write_laid_out_shard(out, layout, flat, kcache.ShardEntry(index=i))

    th = threading.Thread(target=load)
    th.start()
    try:
        dt = forward_only(cfg, model, tok, samples)
    finally:
        stop.set()
        th.join()
        shutil.rmtree(out)
        os.sync()
    return dt


def _sync(model):
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def build_case(name: str, tok, device: str, root: Path, tiny_samples: int = 2048):
    """Returns (model, samples, batch size, load seconds). A case ending in -nf4 is saved and
    loaded in 4-bit as stage 1 loads a teacher; -nf4-plain forces bitsandbytes' plain CPU path."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    t0 = time.perf_counter()
    nf4 = "-nf4" in name
    if name.startswith("tiny"):
        cfg = tiny.demo_pair(tok)[0]
        model = tiny.build_model(cfg, seed=1)
        n, bs = tiny_samples, 16
    else:
        cfg = Qwen2Config(**QWEN25_15B)
        dtype = torch.float32 if device == "cpu" and not nf4 else torch.bfloat16
        with torch.device(device if not nf4 else "cpu"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        n, bs = (8, 4) if device == "cpu" else (256, 16)
    if nf4:
        path = save_pretrained(model, tok, root / f"{name.split('-nf4')[0]}-teacher")
        dev = torch.device(device)
        model = load_teacher(str(path), quantization_settings(True, "nf4", False, dev, "auto"), dev,
                             cpu_4bit_kernel="plain" if name.endswith("-plain") else "auto")
        return model.eval(), n, bs, time.perf_counter() - t0
    return model.to(device).eval(), n, bs, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="tiny-fp32,tiny-nf4,qwen2.5-1.5b-fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per side (real shape on CPU: 2)")
    p.add_argument("--root", default="data_cache/bench")
    p.add_argument("--shard-mb", type=float, default=128.0)
    p.add_argument("--tiny-samples", type=int, default=2048,
                   help="rows for the tiny cases (GSM8K's train split has 7,473); the first touch of "
                        "the two shard buffers and the last shard's write and fsync cost the same at any size")
    p.add_argument("--write-load", action="store_true",
                   help="also time forward-only while a thread writes the cache's bytes the way stage 1 "
                        "does: the share of the ratio that is the disk's cost to the forward")
    args = p.parse_args(argv)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    tok = tiny.train_tokenizer(tiny.corpus(2000), vocab_size=384)
    print(header(device=args.device))
    results = []
    for case in args.cases.split(","):
        model, n, bs, load_s = build_case(case, tok, args.device, root, args.tiny_samples)
        rows = load_rows("synthetic", "train", max_samples=n)
        cfg = ExtractConfig(teachers=["bench-teacher"], dataset="synthetic", max_samples=n,
                            batch_size=bs, max_length=256, device=args.device, progress=False,
                            shard_mb=args.shard_mb)
        reps = 2 if case.startswith("qwen") and args.device == "cpu" else args.repeats
        warm = prepare_samples(load_rows("synthetic", "train", max_samples=bs), tok, cfg.max_length)[0]
        forward_only(cfg, model, tok, warm)
        fw, ex, wcpu, wl, tk, part = [], [], [], [], [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            samples = prepare_samples(rows, tok, cfg.max_length)[0]   # stage 1 does this too
            tk.append(time.perf_counter() - t0)
            fw.append(forward_only(cfg, model, tok, samples))
            part.append(forward_only(cfg, model, tok, samples, partial=True))
            dt, cpu, sizes = extract_once(cfg, model, tok, rows, root)
            ex.append(dt)
            wcpu.append(cpu)
            if args.write_load:
                wl.append(forward_under_write_load(cfg, model, tok, samples, root, sizes, fw[-1] / len(sizes)))
        ratio = min(ex) / min(fw)
        paired = statistics.median(e / f for e, f in zip(ex, fw))   # each run over its neighbour
        results.append((case, ratio))
        tokens = sum(len(s.ids) for s in samples)
        print(f"{case:>20}: {n} samples, {tokens} tokens, batch {bs}; load {load_s:.1f} s; "
              f"forward-only {min(fw):.2f} s ({tokens / min(fw):.0f} tok/s), stage 1 {min(ex):.2f} s; "
              f"ratio {ratio:.3f}, median of paired runs {paired:.3f} (runs: fwd {', '.join(f'{x:.2f}' for x in fw)}; "
              f"extract {', '.join(f'{x:.2f}' for x in ex)}); writer thread CPU "
              f"{', '.join(f'{x:.2f}' for x in wcpu)} s")
        print(f"{'':>20}  forward ending after the last stored layer's K/V, as stage 1's does: "
              f"{min(part):.2f} s, {min(part) / min(fw):.3f} of forward-only; stage 1 over it (stage 1's "
              f"own costs) {min(ex) / min(part):.3f}, median of pairs "
              f"{statistics.median(e / p for e, p in zip(ex, part)):.3f}")
        print(f"{'':>20}  tokenizing alone (format, tokenize, segment spans): {min(tk):.2f} s, "
              f"{min(tk) / min(fw):.3f} of forward-only")
        if wl:
            print(f"{'':>20}  forward-only while stage 1's writer writes the same {sum(sizes) / 1e9:.2f} GB "
                  f"({len(sizes)} shards) in the background: {min(wl):.2f} s, {min(wl) / min(fw):.3f} x "
                  f"forward-only (median of paired runs {statistics.median(w / f for w, f in zip(wl, fw)):.3f}; "
                  f"runs {', '.join(f'{x:.2f}' for x in wl)})")
        del model
    print("summary: " + "; ".join(f"{c} {r:.3f}" for c, r in results) + " (goal <= 1.10)")


if __name__ == "__main__":
    main()
