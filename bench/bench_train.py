"""Stage-2 benchmarks, each a ratio measured in one run:

1. cache: step time when batches are read from the cache (DataLoader) divided by the step time
   with the same batches already collated in memory (goal <= 1.05); tiny models.
2. host memory (RSS) at the start and at the end of an epoch read from the cache (flat).
   int4: step time reading from an int4 cache (kava_common.recompress of the same float16 cache,
   dequantized in the step, and by the loader) over the float16 one (goal <= 1.05); tiny models,
   where the student's step is smallest beside the K/V it reads. int4-real: the same (in the
   step) at the seed's shapes: Qwen2.5-0.5B student, Qwen2.5-1.5B teacher cache, random weights.
3. online: stage-2 step time divided by the online step that runs the teacher's forward in the
   loop to get the same K/V, as the seed did (goal <= 0.5 at real shapes: Qwen2.5-0.5B student,
   Qwen2.5-1.5B teacher, random weights).
4. the peak-GPU-memory estimate for the seed's setting (0.5B student, 1.5B teacher cache,
   batch 2, length 512) under the options that bring it below 7.5 GB, and for a latent 0.5B
   student (--latent 8, micro-batch 8, GSM8K's typical and longest question).

    python bench/bench_train.py                      # all (the real-shape part takes a few minutes)
    python bench/bench_train.py --parts cache,memory
    python bench/bench_train.py --parts int4
    python bench/bench_train.py --parts int4-real        # a few minutes on a CPU
    python bench/bench_train.py --parts int4,online --online-teacher nf4 --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import kava_common
kava_common.set_process_defaults()  # before torch is imported
import torch

from kava_common import save_pretrained
from kava_demo import tiny
from kava_common.data import load_rows
from stage1_extract.config import ExtractConfig
from stage1_extract.extract import extract_teacher
from stage1_extract.teacher import load_teacher, quantization_settings
from stage2_train.config import TrainConfig
from stage2_train.memory import GB, Latent, Shape, describe, estimate
from stage2_train.data import epoch_batches
from stage2_train.trainer import Trainer
from kava_demo.tiny import QWEN25_05B, QWEN25_15B   # real shapes, random weights

from header import header


def rss_gb() -> float:
    return psutil.Process(os.getpid()).memory_info().rss / GB


class BenchTrainer(Trainer):
    """stage 2's own Trainer, fed fixed batches: `step(batch)` is exactly a run's step."""

    def step(self, batch):
        return super().step([batch])["loss"]

    def bench_loader(self, n_batches: int, workers: int):
        self.cfg.num_workers = workers
        return self.feed.loader(self.prog, epoch_batches(len(self.data), self.cfg.batch_size, 0, 0)[:n_batches],
                                self.data)


def build_tiny(root: Path, n: int):
    tok = tiny.train_tokenizer(tiny.corpus(2000), vocab_size=384)
    tcfg, scfg = tiny.demo_pair(tok)
    t, s = tiny.build_model(tcfg, seed=1), tiny.build_model(scfg, seed=2)
    sdir = save_pretrained(s, tok, root / "student")
    ecfg = ExtractConfig(teachers=["tiny"], max_samples=n, batch_size=16, max_length=256, device="cpu",
                         progress=False, out=str(root / "caches"))
    cache = extract_teacher(ecfg, "tiny", load_rows("synthetic", max_samples=n), model=t, tok=tok,
                            log=lambda *a: None)
    return sdir, cache, tok


def bench_cache(root: Path, steps: int, workers: int, device: str = "cpu"):
    from transformers import AutoModelForCausalLM
    sdir, cache, tok = build_tiny(root, 512)
    cfg = TrainConfig(student=str(sdir), caches=[str(cache)], batch_size=8, device=device, progress=False)
    with kava_common.no_hf_progress_bars():
        student = AutoModelForCausalLM.from_pretrained(sdir).to(device)
    tr = BenchTrainer(cfg, student, tok)
    in_memory = list(tr.bench_loader(steps + 1, 0))
    for b in in_memory[:3]:
        tr.step(b)                                          # warm-up
    times = {"memory": [], "cache": [], "startup": []}
    for _ in range(3):                                      # alternate; keep each side's best
        t0 = time.perf_counter()
        for b in in_memory[1:]:
            tr.step(b)
        times["memory"].append(time.perf_counter() - t0)
        # the steady state: the loader's start-up (its workers, the first batch) is timed apart, as
        # it is paid once per epoch, not per step
        t0 = time.perf_counter()
        it = tr.bench_loader(steps + 1, workers)
        tr.step(next(it))
        times["startup"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for b in it:
            tr.step(b)
        times["cache"].append(time.perf_counter() - t0)
    ratio = min(times["cache"]) / min(times["memory"])
    paired = statistics.median(c / m for c, m in zip(times["cache"], times["memory"]))
    print(f"cache: {steps} steps of batch 8, workers {workers}: from cache {min(times['cache']):.2f} s, "
          f"in memory {min(times['memory']):.2f} s; ratio {ratio:.3f} (goal <= 1.05), median of "
          f"paired runs {paired:.3f}; runs "
          f"{[round(x, 2) for x in times['cache']]} vs {[round(x, 2) for x in times['memory']]}; the loader's "
          f"start-up and first step, once per epoch, apart: {statistics.median(times['startup']):.2f} s")
    # host memory over one whole epoch read from the cache
    n_batches = len(tr.data) // cfg.batch_size
    start = rss_gb()
    for b in tr.bench_loader(n_batches, workers):
        tr.step(b)
    end = rss_gb()
    print(f"host memory: epoch of {n_batches} batches ({len(tr.data)} samples): RSS {start:.3f} GB at "
          f"start, {end:.3f} GB at end ({(end - start) * 1024:+.1f} MB)")
    return ratio


def bench_int4(root: Path, steps: int, workers: int, device: str = "cpu", rounds: int = 12):
    """Step time reading batches from an int4 cache over the same steps from the float16 cache
    it was derived from (goal <= 1.05): dequantized in the step (--kv-dequant device, the
    default) and in the loader (--kv-dequant loader). `rounds` runs of each, the order turning
    each round: this machine's step time drifts by more than the difference measured, so the
    median of the paired runs is the steadier figure."""
    from transformers import AutoModelForCausalLM
    from kava_common.recompress import RecompressArgs, recompress
    sdir, f16, tok = build_tiny(root, 512)
    q4 = recompress(RecompressArgs(cache=str(f16), kv_quant="int4", progress=False), log=lambda *a: None)
    trs = {}
    runs = {"float16": (f16, "device"), "int4": (q4, "device"), "int4-loader": (q4, "loader")}
    for name, (cache, where) in runs.items():
        cfg = TrainConfig(student=str(sdir), caches=[str(cache)], batch_size=8, device=device, progress=False,
                          kv_dequant=where)
        with kava_common.no_hf_progress_bars():
            student = AutoModelForCausalLM.from_pretrained(sdir).to(device)
        trs[name] = BenchTrainer(cfg, student, tok)
        for b in trs[name].bench_loader(3, workers):
            trs[name].step(b)                               # warm-up
    times = {name: [] for name in runs}
    for r in range(rounds):                                 # rotate the order each round
        for name in list(runs)[r % 3:] + list(runs)[:r % 3]:
            t0 = time.perf_counter()
            for b in trs[name].bench_loader(steps, workers):
                trs[name].step(b)
            times[name].append(time.perf_counter() - t0)
    line = f"int4 cache: {steps} steps of batch 8, workers {workers}: float16 {min(times['float16']):.2f} s"
    for name in ("int4", "int4-loader"):
        ratio = min(times[name]) / min(times["float16"])
        paired = statistics.median(q / f for q, f in zip(times[name], times["float16"]))
        line += (f"; {name} (kv_dequant {runs[name][1]}) {min(times[name]):.2f} s, ratio {ratio:.3f} "
                 f"(goal <= 1.05), median of paired runs {paired:.3f}")
    print(line + f"; cache bytes {open_cache_bytes(q4) / 1e6:.1f} MB vs {open_cache_bytes(f16) / 1e6:.1f} MB")
    ratio = min(times["int4"]) / min(times["float16"])
    return ratio


def real_shapes(root: Path, n: int, batch: int, seq: int):
    """A random Qwen2.5-1.5B teacher (fp32) and the float16 cache of its forward over `n`
    synthetic samples, and a random Qwen2.5-0.5B student saved beside it: the seed's shapes."""
    from transformers import Qwen2Config, AutoModelForCausalLM
    tok = tiny.train_tokenizer(tiny.corpus(2000), vocab_size=384)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN25_15B), dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN25_05B), dtype=torch.float32)
    sdir = kava_common.save_pretrained(student, tok, root / "student-05b")
    ecfg = ExtractConfig(teachers=["q15"], max_samples=n, batch_size=batch, max_length=seq, device="cpu",
                         progress=False, out=str(root / "caches"))
    cache = extract_teacher(ecfg, "q15", load_rows("synthetic", max_samples=n), model=teacher, tok=tok,
                            log=lambda *a: None)
    return tok, teacher, student, sdir, cache


def bench_int4_real(root: Path, steps: int, seq: int, reps: int, batch: int = 2, device: str = "cpu"):
    """The int4 / float16 step ratio at the seed's shapes: a random Qwen2.5-1.5B teacher's cache
    (its own forward, fp32) and its int4 recompression, read by a random Qwen2.5-0.5B student;
    `reps` alternating runs of the same `steps` batches, K/V dequantized in the step."""
    from kava_common.recompress import RecompressArgs, recompress
    tok, teacher, student, sdir, f16 = real_shapes(root, steps * batch + 1, batch, seq)
    del teacher
    q4 = recompress(RecompressArgs(cache=str(f16), kv_quant="int4", progress=False), log=lambda *a: None)
    trs, batches = {}, {}
    for name, cache in (("float16", f16), ("int4", q4)):    # one student, two trainers
        cfg = TrainConfig(student=str(sdir), caches=[str(cache)], batch_size=batch, max_length=seq,
                          eval_samples=1, device=device, progress=False)
        trs[name] = BenchTrainer(cfg, student.to(device), tok)
        batches[name] = list(trs[name].bench_loader(steps, 0))
        trs[name].step(batches[name][0])                    # warm-up
    times = {name: [] for name in trs}
    for r in range(reps):                                   # alternate, the order turning each round
        for name in (list(trs) if r % 2 == 0 else list(trs)[::-1]):
            t0 = time.perf_counter()
            for b in batches[name]:
                trs[name].step(b)
            times[name].append((time.perf_counter() - t0) / steps)
    ratio = min(times["int4"]) / min(times["float16"])
    paired = statistics.median(q / f for q, f in zip(times["int4"], times["float16"]))
    print(f"int4 cache at real shapes: batch {batch} x {seq} tokens, {steps} steps x {reps} alternating runs: "
          f"float16 {min(times['float16']):.2f} s, int4 (kv_dequant device) {min(times['int4']):.2f} s per step; "
          f"ratio {ratio:.3f} (goal <= 1.05), median of paired runs {paired:.3f}; per-step means "
          f"{[round(x, 2) for x in times['float16']]} vs {[round(x, 2) for x in times['int4']]}; cache bytes "
          f"{open_cache_bytes(q4) / 1e6:.1f} MB vs {open_cache_bytes(f16) / 1e6:.1f} MB")
    return ratio


def open_cache_bytes(path) -> int:
    from kava_common.cache import open_cache
    return open_cache(path).manifest["total_bytes"]


def bench_online(root: Path, steps: int, seq: int, reps: int, freeze_embeddings: bool = False,
                 batch: int = 2, teacher_kind: str = "fp32", device: str = "cpu"):
    """Offline (cache) step vs online step (teacher forward in the loop) at real shapes.
    `teacher_kind` nf4: the online loop runs the teacher in 4-bit as the seed did (the cache
    still comes from the fp32 teacher: what the K/V hold does not change the step's time)."""
    from stage1_extract.capture import teacher_forward
    from stage1_extract.samples import collate as s1_collate
    t0 = time.perf_counter()
    tok, teacher, student, sdir, cache = real_shapes(root, steps * batch + 1, batch, seq)
    print(f"online: built random Qwen2.5-1.5B teacher and 0.5B student, and the teacher's cache, in "
          f"{time.perf_counter() - t0:.0f} s")
    if teacher_kind == "nf4":
        t0 = time.perf_counter()
        tdir = root / "teacher-15b"
        kava_common.save_pretrained(teacher.to(torch.bfloat16), tok, tdir)
        del teacher
        dev = torch.device(device)               # loaded as stage 1 loads a 4-bit teacher
        teacher = load_teacher(str(tdir), quantization_settings(True, "nf4", False, dev, "auto"), dev)
        print(f"online: teacher saved and reloaded in NF4 (compute bf16) in {time.perf_counter() - t0:.0f} s")
    elif device != "cpu":
        teacher = teacher.to(device, torch.bfloat16)      # a GPU runs the unquantized teacher in bf16
    cfg = TrainConfig(student=str(sdir), caches=[str(cache)], batch_size=batch, max_length=seq,
                      eval_samples=1, device=device, progress=False, freeze_embeddings=freeze_embeddings)
    tr = BenchTrainer(cfg, student.to(device), tok)
    batches = list(tr.bench_loader(steps, 0))
    tr.step(batches[0])                                     # warm-up
    times = {"offline": [], "online": []}
    for _ in range(reps):                                   # alternate; keep each side's best
        t0 = time.perf_counter()
        for b in batches:
            tr.step(b)
        times["offline"].append((time.perf_counter() - t0) / len(batches))
        t0 = time.perf_counter()
        for b in batches:                                   # the seed: teacher forward, then the step
            with torch.inference_mode():       # the same texts (shared tokenizer), unpadded
                rows = [i[m.bool()].tolist() for i, m in zip(b["input_ids"], b["attention_mask"])]
                teacher_forward(teacher, *s1_collate(rows, 0))
            tr.step(b)
        times["online"].append((time.perf_counter() - t0) / len(batches))
    offline, online = min(times["offline"]), min(times["online"])
    paired = statistics.median(a / b for a, b in zip(times["offline"], times["online"]))
    print(f"online, {teacher_kind} teacher{', frozen embeddings' if freeze_embeddings else ''}: batch {batch}, "
          f"~{int(batches[0]['attention_mask'].sum())} tokens per step, {steps} steps x {reps} "
          f"alternating runs: stage-2 step {offline:.2f} s, online step {online:.2f} s; ratio "
          f"{offline / online:.3f} (goal <= 0.5), median of paired runs {paired:.3f}; per-step means {[round(x, 2) for x in times['offline']]} "
          f"vs {[round(x, 2) for x in times['online']]}")
    return offline / online


def bench_memory():
    from transformers import Qwen2Config
    s = Shape.from_config(Qwen2Config(**QWEN25_05B))
    t = Qwen2Config(**QWEN25_15B)
    kv = (s.layers, t.num_key_value_heads, t.hidden_size // t.num_attention_heads)
    print(f"memory: seed setting, Qwen2.5-0.5B student ({s.params / 1e6:.0f}M params), Qwen2.5-1.5B "
          f"cache ({kv[1]} KV heads x {kv[2]}), batch 2 x 512, {kv[0]} distilled layers")
    options = [("fp32 weights, AdamW", dict(precision="fp32")),
               ("bf16, AdamW", dict()),
               ("bf16, 8-bit AdamW", dict(optimizer="adamw8bit")),
               ("bf16, 8-bit AdamW, checkpointing", dict(optimizer="adamw8bit", gradient_checkpointing=True)),
               ("bf16, 8-bit AdamW, ckpt, frozen embeddings", dict(optimizer="adamw8bit", gradient_checkpointing=True,
                                                                  freeze="embeddings")),
               ("bf16, LoRA r=16, checkpointing", dict(lora_r=16, gradient_checkpointing=True)),
               ("bf16, AdamW, --ce-chunk 64", dict(ce_chunk=64)),
               ("bf16, 8-bit AdamW, checkpointing, --ce-chunk 64", dict(optimizer="adamw8bit",
                                                                       gradient_checkpointing=True,
                                                                       ce_chunk=64))]
    # Cross-entropy covers reasoning and final answer: logits at up to every position of a batch
    # of long answers (the bound), or ~128 per sample for a typical GSM8K answer (its answers
    # average 287 characters, about 115 Qwen tokens at GSM8K's ~2.5 characters per token).
    print(f"  {'':<48} {'long answers':>12} {'128 per sample':>15}")
    for name, kw in options:
        e, typical = estimate(s, kv, 2, 512, **kw), estimate(s, kv, 2, 512, answer_tokens=128, **kw)
        verdict = "fits" if e["total"] < 7.5 * GB else \
            "fits only with typical answers" if typical["total"] < 7.5 * GB else "does not fit"
        print(f"  {name:<48} {e['total'] / GB:9.2f} GB {typical['total'] / GB:12.2f} GB  {verdict} in 7.5 GB")
    print("  (" + describe(estimate(s, kv, 2, 512, optimizer="adamw8bit", gradient_checkpointing=True)) + ")")
    # A latent student (--latent 8) on GSM8K: a question of 235 characters on average (985 at
    # most), about 100 Qwen tokens with the prompt (400 at most) at GSM8K's ~2.5 characters per
    # token; eot, the answer line and EOS about 8; the written chain of thought 115 (300).
    def latent(question: int, cot: int, iters: int, written: bool) -> Latent:
        """The token counts of one question; with the written chain of thought's cross-entropy,
        its forward over question, chain of thought and answer, logits over the last two."""
        return Latent(question, 8, 8, question + cot + 8 if written else 0, iters, cot + 8 if written else None)
    print("memory: latent student (--latent 8, 8 R-KV slots), batch 8, GSM8K questions of ~100 tokens "
          "(400 at most)")
    ckpt = dict(optimizer="adamw8bit", gradient_checkpointing=True)
    latent_options = [("latent, Jacobi 3, bf16, AdamW", dict(), 3, False),
                      ("latent, Jacobi 3, 8-bit AdamW", dict(optimizer="adamw8bit"), 3, False),
                      ("latent, Jacobi 3, 8-bit AdamW, checkpointing", ckpt, 3, False),
                      ("latent, sequential, 8-bit AdamW, checkpointing", ckpt, 0, False),
                      ("latent, Jacobi 3, LoRA r=16, checkpointing", dict(lora_r=16, gradient_checkpointing=True),
                       3, False),
                      ("latent, Jacobi 3, 8-bit AdamW, ckpt, written CoT CE", ckpt, 3, True)]
    print(f"  {'':<52} {'longest':>10} {'typical':>12}")
    for name, kw, iters, written in latent_options:
        e_long, e_typ = (estimate(s, kv, 8, 0, latent=latent(q, cot, iters, written), **kw)
                         for q, cot in ((400, 300), (100, 115)))
        verdict = "fits" if e_long["total"] < 7.5 * GB else \
            "fits only with typical questions" if e_typ["total"] < 7.5 * GB else "does not fit"
        print(f"  {name:<52} {e_long['total'] / GB:7.2f} GB {e_typ['total'] / GB:9.2f} GB  {verdict} in 7.5 GB")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="cache,int4,memory,online")
    p.add_argument("--steps", type=int, default=60, help="steps per timing in the cache part (a timing "
                   "much under 2 s on a 2-core CPU is mostly noise)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers in the cache part; default 0 with --device cpu (a worker then "
                        "takes CPU time from the step it feeds), 1 on a GPU")
    p.add_argument("--online-steps", type=int, default=3)
    p.add_argument("--online-seq", type=int, default=256)
    p.add_argument("--online-reps", type=int, default=2, help="alternating offline/online runs")
    p.add_argument("--online-batch", type=int, default=2, help="samples per step (the seed used 2)")
    p.add_argument("--freeze-embeddings", action="store_true", help="online part: the student's embeddings fixed")
    p.add_argument("--device", default="cpu", help="where stage 2 (and the online teacher) run: cpu, cuda")
    p.add_argument("--online-teacher", choices=["fp32", "nf4"], default="fp32",
                   help="online part: the teacher in the loop; nf4 as the seed ran it (bitsandbytes' CPU "
                        "kernel is ~6x slower than fp32 here, so fp32 is the strict comparison)")
    a = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(dir=Path("data_cache").resolve() if Path("data_cache").is_dir() else None))
    print(header(device=a.device))
    parts = a.parts.split(",")
    workers = a.workers if a.workers is not None else int(a.device != "cpu")
    try:                    # the caches and runs made here go with the run, however it ends
        if "cache" in parts:
            bench_cache(root / "tiny", a.steps, workers, a.device)
        if "int4" in parts:
            bench_int4(root / "int4", a.steps, workers, a.device)
        if "int4-real" in parts:
            bench_int4_real(root / "int4-real", a.online_steps, a.online_seq, max(a.online_reps, 4),
                            a.online_batch, a.device)
        if "memory" in parts:
            bench_memory()
        if "online" in parts:
            bench_online(root / "real", a.online_steps, a.online_seq, a.online_reps, a.freeze_embeddings,
                         a.online_batch, a.online_teacher, a.device)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
