"""How small int8/int4 K/V caches are, and how close to the float16 ones: one command.

    python bench/bench_quant.py                         # both teachers, about 5 min on 2 CPU cores
    python bench/bench_quant.py --teachers trained      # only the trained teacher

For each teacher, stage 1 writes a float16 cache over GSM8K-format problems, then
kava_common.recompress derives int8 and int4 caches (group 128, the default; int4 also with value
groups kept inside each head, --kv-quant-v-span head; both also with symmetric values,
--kv-quant-v-symmetric) from it. Printed per
cache: K/V bytes per token (codes and groups) and its ratio to float16, the reconstruction
cosines of K and V that the manifest records (every layer of each shard's first and last
sample), the cosines over every token of every sample (read back and compared here), and for
Qwen2.5-1.5B's geometry the projected size of a GSM8K train cache.

Teachers: `random`, a random-weight model with Qwen2.5-1.5B's exact config (28 layers, 2 KV heads
x head_dim 128), run unquantized in bfloat16; `trained`, the learning benchmark's Qwen2 teacher
(bench/bench_learn.py must have built it), whose K/V have the outlier channels of a trained
model, in 4-bit NF4 as stage 1 runs it by default.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import kava_common
kava_common.set_process_defaults()  # before torch is imported
from kava_demo import tiny
import torch

from kava_common.cache import open_cache
from kava_common.data import load_rows
from kava_common.recompress import RecompressArgs, recompress
from kava_demo.tiny import QWEN25_15B
from stage1_extract.config import ExtractConfig
from stage1_extract.extract import extract_teacher

from header import header

GSM8K_TRAIN_ROWS = 7473
GSM8K_TOKENS_PER_ROW = 220        # Qwen2.5's tokenizer, prompt template included (docs/cache.md)


def random_teacher(tok):
    from transformers import AutoModelForCausalLM, Qwen2Config
    torch.manual_seed(0)
    cfg = Qwen2Config(**QWEN25_15B, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def measured_cosines(float_cache: Path, quant_cache: Path) -> tuple[float, float]:
    """Mean cosine of quantized to float16 K and V vectors over every token, layer and head."""
    a, b = open_cache(float_cache), open_cache(quant_cache)
    cos = {"k": [], "v": []}
    for i in range(len(a)):
        x, y = a[i], b[i]
        for n in ("k", "v"):
            cos[n].append(torch.nn.functional.cosine_similarity(x[n].float(), y[n].float(), dim=-1).flatten())
    return tuple(float(torch.cat(cos[n]).mean()) for n in ("k", "v"))


def report(name: str, parent: Path, root: Path, log) -> None:
    f16 = open_cache(parent).manifest
    log(f"{name}: {f16['num_layers']} layers x {f16['num_kv_heads']} KV heads x head_dim {f16['head_dim']}, "
        f"{f16['num_samples']} samples, {f16['num_tokens']} tokens; float16 {f16['kv_bytes_per_token']} K/V B/token")
    log("| cache | K/V B/token | x float16 | cos K (manifest) | cos V (manifest) | cos K (all tokens) | "
        "cos V (all tokens) | GSM8K train, projected |")
    log("|---|---|---|---|---|---|---|---|")
    # the default value groups span a token's KV heads; int4 with groups inside each head beside
    # it; symmetric values (a scale per group, no low) after them
    for kind, span, sym in (("int8", "token", False), ("int4", "token", False), ("int4", "head", False),
                            ("int8", "token", True), ("int4", "token", True)):
        path = recompress(RecompressArgs(cache=str(parent), out=str(root), kv_quant=kind, kv_quant_v_span=span,
                                         kv_quant_v_symmetric=sym, progress=False), log=lambda *a: None)
        m = open_cache(path).manifest
        q = m["kv_quant"]
        ck, cv = measured_cosines(parent, path)
        ratio = q["bytes_per_token"] / m["kv_bytes_per_token"]
        on_disk = m["total_bytes"] / m["num_tokens"]          # with ids, offsets and texts
        projected = on_disk / m["kv_bytes_per_token"] * 28672 * GSM8K_TRAIN_ROWS * GSM8K_TOKENS_PER_ROW
        what = kind + (", value groups inside each head" if span == "head" else "") + (", symmetric values" if sym else "")
        log(f"| {what} | {q['bytes_per_token']:.0f} | {ratio:.3f} | {q['k_cosine']:.5f} | {q['v_cosine']:.5f} | "
            f"{ck:.5f} | {cv:.5f} | {projected / 1e9:.1f} GB |")
    log("(projected: this cache's bytes on disk per token, scaled to Qwen2.5-1.5B's 28,672 float16 B/token, x "
        f"{GSM8K_TRAIN_ROWS} rows x {GSM8K_TOKENS_PER_ROW} tokens)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teachers", nargs="+", choices=("random", "trained"), default=["random", "trained"])
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--learn-root", default="data_cache/bench_learn", help="where bench_learn.py keeps its teacher")
    a = p.parse_args(argv)
    log = lambda *x: print(*x, flush=True)
    log(header())
    rows = load_rows("synthetic", "train", a.samples)
    with tempfile.TemporaryDirectory(dir="data_cache") as tmp:
        root = Path(tmp)
        base = dict(dataset="synthetic", max_samples=a.samples, batch_size=4, max_length=512, device="cpu",
                    progress=False, out=str(root), kv_dtype="float16")
        if "random" in a.teachers:
            tok = tiny.train_tokenizer(tiny.corpus(400), vocab_size=512)
            cfg = ExtractConfig(teachers=["qwen25-1.5b-random"], quantize=False, **base)
            parent = extract_teacher(cfg, "qwen25-1.5b-random", rows, model=random_teacher(tok), tok=tok,
                                     log=lambda *x: None)
            report("Qwen2.5-1.5B config, random weights, bfloat16", parent, root, log)
        if "trained" in a.teachers:
            teacher = Path(a.learn_root) / "teacher-qwen2"
            if not (teacher / "config.json").is_file():
                raise SystemExit(f"error: {teacher} is missing; run bench/bench_learn.py --phase prepare first")
            (parent,) = [extract_teacher(ExtractConfig(teachers=[str(teacher)], **base), str(teacher), rows,
                                         log=lambda *x: None)]
            report("the learning benchmark's trained Qwen2 teacher, NF4", parent, root, log)


if __name__ == "__main__":
    main()
