"""Check stage 2's peak-memory estimate against a real run, at the seed's setting.

Builds a random-weight Qwen2.5-1.5B-shaped teacher and its cache (samples of four synthetic
problems each, so a sample fills --max-length), a random Qwen2.5-0.5B-shaped student, then runs
a few stage-2 steps per option set (batch 2) and prints the estimate the run printed beside
torch's peak allocated and reserved memory (the estimate also counts ~0.5 GB of CUDA context,
which torch's counters do not). `--pair qwen2-7b-tinyllama` does the same for the original
setup's shapes (a Qwen2-7B teacher, a TinyLlama-1.1B student) with the option sets of
configs/qwen2_7b_to_tinyllama.yaml. `--latent 8` does it for a latent student (KaVa's method:
8 latent steps, the teacher's chain of thought in 8 R-KV slots, one synthetic problem per
sample, batch 8), with and without gradient checkpointing, Jacobi passes or latents one after
another, and the written chain of thought's cross-entropy. Needs a GPU for the measured columns;
`--shape tiny` on the CPU is a quick check that the script itself runs.

    python bench/bench_gpu_memory.py --device cuda            # the check (8-bit AdamW needs bitsandbytes)
    python bench/bench_gpu_memory.py --device cuda --pair qwen2-7b-tinyllama
    python bench/bench_gpu_memory.py --device cuda --latent 8
    python bench/bench_gpu_memory.py --device cpu --shape tiny   # runs the script, ~10 s; nothing measured
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import shutil
import tempfile
from pathlib import Path

import kava_common
kava_common.set_process_defaults()  # before torch is imported
import torch

from kava_demo import tiny
from kava_common.data import Rows, load_fast_tokenizer, load_rows
from kava_demo.tiny import QWEN2_7B, QWEN25_05B, QWEN25_15B, TINYLLAMA_11B
from stage1_extract.config import ExtractConfig
from stage1_extract.extract import extract_teacher
from stage2_train.config import TrainConfig
from stage2_train.train import main as train_main

from header import header

OPTIONS = [("bf16, AdamW", {}),
           ("bf16, 8-bit AdamW", dict(optimizer="adamw8bit")),
           ("bf16, 8-bit AdamW, checkpointing", dict(optimizer="adamw8bit", gradient_checkpointing=True)),
           ("bf16, 8-bit AdamW, ckpt, frozen embeddings", dict(optimizer="adamw8bit",
                                                              gradient_checkpointing=True,
                                                              freeze_embeddings=True)),
           ("bf16, LoRA r=16, checkpointing", dict(lora_r=16, gradient_checkpointing=True)),
           ("bf16, AdamW, ce_chunk 64", dict(ce_chunk=64)),
           ("bf16, 8-bit AdamW, checkpointing, ce_chunk 64", dict(optimizer="adamw8bit",
                                                                 gradient_checkpointing=True, ce_chunk=64)),
           # configs/kv_and_logit_kd.yaml: the student's logits at every position
           ("bf16, 8-bit AdamW, ckpt, logit KD every token", dict(optimizer="adamw8bit", gradient_checkpointing=True,
                                                                 kd_weight=1.0, kd_tokens="all"))]
# configs/qwen2_7b_to_tinyllama.yaml, its variant with trained embeddings, and its LoRA fallback
TINYLLAMA_OPTIONS = [("bf16, 8-bit AdamW, ckpt, frozen embeddings", dict(optimizer="adamw8bit", gradient_checkpointing=True,
                                                                        freeze_embeddings=True)),
                     ("bf16, 8-bit AdamW, checkpointing", dict(optimizer="adamw8bit", gradient_checkpointing=True)),
                     ("bf16, LoRA r=64, checkpointing", dict(lora_r=64, gradient_checkpointing=True))]
# --latent M: KaVa's setting (3 Jacobi passes), what makes it fit, latents one after another, and
# the teacher mode kept (the written chain of thought's cross-entropy)
LATENT_OPTIONS = [("latent, Jacobi 3, bf16, AdamW", dict(jacobi_iters=3)),
                  ("latent, Jacobi 3, 8-bit AdamW, checkpointing", dict(jacobi_iters=3, optimizer="adamw8bit",
                                                                        gradient_checkpointing=True)),
                  ("latent, sequential, 8-bit AdamW, checkpointing", dict(jacobi_iters=0, optimizer="adamw8bit",
                                                                          gradient_checkpointing=True)),
                  ("latent, Jacobi 3, LoRA r=16, ckpt, written CoT CE", dict(jacobi_iters=3, lora_r=16,
                                                                            gradient_checkpointing=True,
                                                                            latent_cot_weight=1.0))]
PAIRS = {"qwen2.5-1.5b-0.5b": (QWEN25_15B, QWEN25_05B, OPTIONS),
         "qwen2-7b-tinyllama": (QWEN2_7B, TINYLLAMA_11B, TINYLLAMA_OPTIONS)}


def long_rows(n: int, per: int = 4) -> Rows:
    """n rows, each `per` synthetic problems in a row (the last one's `#### N` is the final)."""
    r = load_rows("synthetic", "train", max_samples=n * per)
    return Rows("synthetic-long", "train",
                [" ".join(r.questions[i:i + per]) for i in range(0, n * per, per)],
                ["\n".join(r.answers[i:i + per]) for i in range(0, n * per, per)])


def configs(shape: str, tok, pair: str = "qwen2.5-1.5b-0.5b"):
    from transformers import LlamaConfig, Qwen2Config
    if shape == "real":
        teacher, student, _ = PAIRS[pair]
        return Qwen2Config(**teacher), (LlamaConfig if "tinyllama" in pair else Qwen2Config)(**student)
    return tiny.demo_pair(tok)


def main(argv=None):
    from transformers import AutoModelForCausalLM
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="real", choices=["real", "tiny"])
    p.add_argument("--pair", default="qwen2.5-1.5b-0.5b", choices=sorted(PAIRS),
                   help="teacher and student shapes (--shape real) and their option sets")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--samples", type=int, default=12)
    p.add_argument("--options", default="all", help="comma-separated indices into the option list, or all")
    p.add_argument("--latent", type=int, default=0, help="M latent steps: a latent student's option sets instead")
    p.add_argument("--batch", type=int, default=0, help="micro-batch (default 2, or 8 with --latent)")
    a = p.parse_args(argv)
    batch = a.batch or (8 if a.latent else 2)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    root = Path(tempfile.mkdtemp(dir=Path("data_cache").resolve() if Path("data_cache").is_dir() else None))
    try:                    # the caches and runs made here go with the run, however it ends
        print(header(device=dev))
        tok = tiny.train_tokenizer(tiny.corpus(2000), vocab_size=384)
        t_cfg, s_cfg = configs(a.shape, tok, a.pair)
        options = LATENT_OPTIONS if a.latent else PAIRS[a.pair][2]
        student = AutoModelForCausalLM.from_config(s_cfg, dtype=torch.bfloat16)
        sdir = root / "student"
        kava_common.save_pretrained(student, tok, sdir)
        del student
        # the teacher's cache records the tokenizer as the student's folder gives it back, so that
        # logit distillation (which needs the same tokenizer) accepts it
        tok = load_fast_tokenizer(str(sdir), "student")
        torch.manual_seed(0)
        with torch.device(dev):
            teacher = AutoModelForCausalLM.from_config(t_cfg, dtype=torch.bfloat16 if cuda else torch.float32)
        # a latent student reads one problem's question and answer, the teacher's reasoning in slots
        rows = load_rows("synthetic", "train", max_samples=4 * a.samples) if a.latent else long_rows(a.samples)
        ecfg = ExtractConfig(teachers=["teacher"], max_samples=len(rows), batch_size=4, max_length=a.max_length,
                             device=a.device, progress=False, out=str(root / "caches"),
                             **(dict(rkv_slots=a.latent) if a.latent else dict(logits_topk=8)))
        cache = extract_teacher(ecfg, "teacher", rows, model=teacher.eval(), tok=tok, log=lambda *x: None)
        del teacher
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        chosen = range(len(options)) if a.options == "all" else [int(i) for i in a.options.split(",")]
        print(f"batch {batch} x " + (f"one problem, {a.latent} latent steps" if a.latent else f"{a.max_length} tokens")
              + f", {a.steps} steps per option; GB = 2^30 bytes")
        for i in chosen:
            name, kw = options[i]
            if not cuda and kw.get("optimizer") == "adamw8bit":
                kw = {k: v for k, v in kw.items() if k != "optimizer"}
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            lines = []
            latent = dict(latent=a.latent, kv_weight=10.0) if a.latent else {}
            cfg = TrainConfig(student=str(sdir), caches=[str(cache)], out=str(root / f"run-{i}"), batch_size=batch,
                              max_length=a.max_length, max_steps=a.steps, log_every=a.steps, save_every=0,
                              eval_samples=batch, warmup_steps=1, device=a.device, progress=False,
                              precision="bf16" if cuda else "fp32", overwrite=True, **latent, **kw)
            train_main(cfg, echo=lines.append)
            est = next((float(m.group(1)) for l in lines if (m := re.search(r"estimated peak memory ([0-9.]+) GB", l))),
                       float("nan"))
            last = json.loads((root / f"run-{i}" / "metrics.jsonl").read_text().splitlines()[-1])
            if cuda:
                print(f"  {name:<46} estimate {est:5.2f} GB ({est - 0.5:5.2f} without context); measured "
                      f"peak allocated {last['gpu_peak_gb']:5.2f} GB, reserved {last['gpu_reserved_gb']:5.2f} GB")
            else:
                print(f"  {name:<46} estimate {est:5.2f} GB; no GPU, nothing measured (loss {last['loss']:.3f})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
