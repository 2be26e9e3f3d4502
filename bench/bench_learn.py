"""What KV distillation buys: a CPU-scale learning benchmark, from one command.

    python bench/bench_learn.py               # about 33 min on 2 CPU cores; re-runs skip finished work

1. Task: `synthetic` GSM8K-format problems (2-3 operations, each with calculator notes, and a
   `#### N` line); tokenizers split digits one per token, as Qwen2's does.
2. Teachers trained from scratch with cross-entropy on 20,000 training problems: a Qwen2
   (byte-level BPE tokenizer A) and a Llama (its own tokenizer B, with BOS), so their K/V
   geometry and tokenization differ from each other and from the student's.
3. Stage 1 extracts their caches over the first N_STUDENT training problems: the Qwen teacher
   in 4-bit NF4 and unquantized, the Llama teacher unquantized.
4. A smaller Qwen2 student (tokenizer A) is trained from scratch on those N_STUDENT problems only
   (the low-data budget that leaves headroom), same steps and data, over 3 seeds, by the sweep
   runner: (a) cross-entropy only; (b) + K/V distillation from the NF4 cache; (c) from the
   unquantized cache; (d) from the Llama cache (character-overlap alignment); (e) from both
   teachers fused.
5. Each final student is evaluated by exact match on 200 held-out test problems. The table gives
   mean and spread (min-max) over seeds, the held-out K/V cosine beside the shuffled-target
   cosine, and is written to data_cache/bench_learn/results.md with a PNG.
6. Diagnostics (direction, K/V weight) are compared on a separate validation split; only the
   variant that wins there is then evaluated on test, and reported apart.

Settings were fixed before looking at the test split; nothing is tuned on it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import kava_common  # before torch: kava_common sets its allocator options
import torch
import yaml

from kava_common import save_pretrained, tiny
from kava_common.data import load_rows
from kava_common.prompt import format_sample
from stage1_extract.config import ExtractConfig
from stage1_extract.extract import main as extract
from stage2_train.evaluate import evaluate
from stage2_train.sweep import run_sweep

from header import header

DATA = "synthetic"
N_TEACHER = 20000          # problems the teachers learn from
N_STUDENT = 256            # problems in the caches; all the student ever sees
N_TEST = 200
SEEDS = [0, 1, 2]
STUDENT_STEPS = 600
TEACHER_STEPS = 1500


def train_lm(model, tok, texts: list[str], steps: int, batch: int, lr: float, seed: int, log) -> None:
    """Plain next-token training on whole texts (ending in EOS) for the teachers."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    enc = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(enc), (batch,), generator=g).tolist()
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((batch, width), tok.pad_token_id)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, :len(enc[i])], mask[b, :len(enc[i])] = torch.tensor(enc[i]), 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 250 == 0:
            log(f"    step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()


def build_teacher(root: Path, name: str, arch: str, tok, log) -> Path:
    path = root / name
    if (path / "config.json").is_file():
        return path
    cfg = tiny.tiny_config(arch, len(tok), hidden=128, layers=4, heads=4,
                           kv_heads=2 if arch == "qwen2" else 4, head_dim=32, intermediate=384, tok=tok)
    model = tiny.build_model(cfg, seed=11 if arch == "qwen2" else 12)
    rows = load_rows(DATA, "train", N_TEACHER)
    texts = [format_sample(q, a).text for q, a in zip(rows.questions, rows.answers)]
    log(f"  training teacher {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"{arch}) for {TEACHER_STEPS} steps on {N_TEACHER} problems")
    train_lm(model, tok, texts, TEACHER_STEPS, 32, 2e-3, 0, log)
    tmp = root / (name + ".tmp")
    save_pretrained(model, tok, tmp)
    tmp.rename(path)
    return path


def run_arms(root: Path, arms: dict, settings: dict, split: str, log) -> list[dict]:
    """Each arm is a sweep over the seeds; finished runs are skipped on a re-run."""
    rows = []
    for arm, spec in arms.items():
        log(f"students: {arm} ({spec['what']}), evaluated on {split}")
        extra = {k: v for k, v in spec.items() if k != "what"}
        sweep = {"out": str(root / arm), "settings": dict(settings, **extra), "grid": {"seed": SEEDS},
                 "eval": {"dataset": DATA, "split": split, "max_samples": N_TEST, "batch_size": 50,
                          "max_new_tokens": 160, "device": "cpu"}}
        path = root / f"sweep-{arm}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(sweep, sort_keys=False))
        for r in run_sweep(path, echo=lambda m: log("  " + m), progress=False):
            rows.append(dict(r, arm=arm))
            log(f"    seed {r['seed']}: exact match {r['accuracy']:.3f}, held-out cos K {r['cos_k']:.3f} "
                f"(shuffled {r['cos_k_shuffled']:.3f}), V {r['cos_v']:.3f} (shuffled {r['cos_v_shuffled']:.3f})")
    return rows


def table_lines(table: list[dict]) -> list[str]:
    lines = ["| arm | exact match, mean (min-max) | sd | held-out cos K (shuffled) | cos V (shuffled) |",
             "|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['what']} | {t['acc_mean']:.3f} ({t['acc_min']:.3f}-{t['acc_max']:.3f}) | "
                     f"{t['acc_sd']:.3f} | {t['cos_k']:.3f} ({t['cos_k_shuffled']:.3f}) | "
                     f"{t['cos_v']:.3f} ({t['cos_v_shuffled']:.3f}) |")
    return lines


def summarize(rows: list[dict], arms: dict) -> list[dict]:
    out = []
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm]
        acc = [r["accuracy"] for r in rs]
        out.append({"arm": arm, "what": arms[arm]["what"], "seeds": len(rs),
                    "acc_mean": statistics.mean(acc), "acc_min": min(acc), "acc_max": max(acc),
                    "acc_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    **{k: statistics.mean(r[k] for r in rs) for k in
                       ("cos_k", "cos_k_shuffled", "cos_v", "cos_v_shuffled")}})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="data_cache/bench_learn")
    a = p.parse_args(argv)
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    log = lambda *x: print(*x, flush=True)
    log(header())
    t0 = time.perf_counter()
    torch.manual_seed(0)

    log("teachers")
    corpus = [format_sample(q, a).text for q, a in zip(*(lambda r: (r.questions, r.answers))(load_rows(DATA, "train", 3000)))]
    tok_a = tiny.train_tokenizer(corpus, vocab_size=512)
    tok_b = tiny.train_tokenizer(corpus[::-1][:2000], vocab_size=600, add_bos=True)
    qwen = build_teacher(root, "teacher-qwen2", "qwen2", tok_a, log)
    llama = build_teacher(root, "teacher-llama", "llama", tok_b, log)
    teacher_acc = {}
    for name, path in (("qwen2", qwen), ("llama", llama)):
        r = evaluate(str(path), DATA, "test", N_TEST, batch_size=50, max_new_tokens=160,
                     out=path / "eval-test.jsonl", device="cpu", progress=False)
        teacher_acc[name] = r.accuracy
        log(f"  teacher {name}: exact match {r.correct}/{r.n} = {r.accuracy:.3f}")

    log("stage 1 caches")
    base = dict(dataset=DATA, max_samples=N_STUDENT, batch_size=32, max_length=256, device="cpu",
                progress=False, out=str(root / "caches"))
    (c_nf4,) = extract(ExtractConfig(teachers=[str(qwen)], **base))
    (c_fp,) = extract(ExtractConfig(teachers=[str(qwen)], quantize=False, **base))
    (c_llama,) = extract(ExtractConfig(teachers=[str(llama)], quantize=False, **base))

    student = root / "student-init"
    if not (student / "config.json").is_file():
        cfg = tiny.tiny_config("qwen2", len(tok_a), hidden=64, layers=2, heads=4, kv_heads=1, head_dim=16,
                               intermediate=128, tok=tok_a)
        save_pretrained(tiny.build_model(cfg, seed=21), tok_a, student)
    settings = dict(student=str(student), max_steps=STUDENT_STEPS, batch_size=16, lr_student=2e-3,
                    lr_projector=2e-3, warmup_steps=30, min_lr_ratio=0.1, eval_samples=16, log_every=50,
                    save_every=0, device="cpu", max_length=256, projector="head",
                    direction="teacher_to_student")   # as pre-registered (the default then)
    arms = {
        "a_ce_only": {"what": "cross-entropy only", "caches": [str(c_fp)], "kv_weight": 0.0},
        "b_kv_nf4": {"what": "+ K/V from Qwen2 teacher, NF4 cache", "caches": [str(c_nf4)]},
        "c_kv_fp32": {"what": "+ K/V from Qwen2 teacher, fp32 cache", "caches": [str(c_fp)]},
        "d_kv_llama": {"what": "+ K/V from Llama teacher (other tokenizer)", "caches": [str(c_llama)]},
        "e_kv_fused": {"what": "+ K/V from both, learned gate", "caches": [str(c_fp), str(c_llama)],
                       "fusion": "target", "gate": "learned"},
    }
    rows = run_arms(root / "runs", arms, settings, "test", log)
    table = summarize(rows, arms)
    lines = [f"Task {DATA}: students see {N_STUDENT} problems, {STUDENT_STEPS} steps x batch 16, seeds "
             f"{SEEDS}; exact match on {N_TEST} test problems. Teachers: Qwen2 {teacher_acc['qwen2']:.3f}, "
             f"Llama {teacher_acc['llama']:.3f}.", "", "Pre-registered arms (test split):", "",
             *table_lines(table)]
    # Diagnostics, chosen on a validation split (other problems than test), never on test:
    # the teacher target fixed (student_to_teacher) and a lighter K/V weight.
    diag = {
        "a_ce_only": arms["a_ce_only"],
        "f_s2t": {"what": "+ K/V (Qwen2 fp32), student_to_teacher", "caches": [str(c_fp)],
                  "direction": "student_to_teacher"},
        "g_kv01": {"what": "+ K/V (Qwen2 fp32), kv_weight 0.1", "caches": [str(c_fp)], "kv_weight": 0.1},
        "h_s2t_kv01": {"what": "+ K/V (Qwen2 fp32), student_to_teacher, kv_weight 0.1",
                       "caches": [str(c_fp)], "direction": "student_to_teacher", "kv_weight": 0.1},
    }
    vrows = run_arms(root / "runs-validation", diag, settings, "validation", log)
    vtable = summarize(vrows, diag)
    best = max((t for t in vtable if t["arm"] != "a_ce_only"), key=lambda t: t["acc_mean"])
    lines += ["", "Diagnostics (validation split, 200 other problems):", "", *table_lines(vtable)]
    trows = []
    for r in vrows:                       # the one variant chosen on validation, now on test
        if r["arm"] == best["arm"]:
            res = evaluate(str(root / "runs-validation" / best["arm"] / f"seed-{r['seed']}" / "final" / "student"),
                           DATA, "test", N_TEST, batch_size=50, max_new_tokens=160, device="cpu", progress=False)
            trows.append(dict(r, accuracy=res.accuracy))
    chosen = summarize(trows, {best["arm"]: diag[best["arm"]]})
    lines += ["", f"Chosen on validation ({best['what']}), then evaluated once on test:", "",
              *table_lines(chosen)]
    text = "\n".join(lines)
    (root / "results.md").write_text(text + "\n")
    (root / "results.json").write_text(json.dumps({"teachers": teacher_acc, "arms": table, "runs": rows,
                                                   "validation": vtable, "chosen_on_test": chosen}, indent=1))
    plot(table, root / "results.png")
    log("")
    log(text)
    log(f"\nwall time {time.perf_counter() - t0:.0f} s; table {root / 'results.md'}, plot {root / 'results.png'}")


def plot(table, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    x = range(len(table))
    means = [t["acc_mean"] for t in table]
    err = [[m - t["acc_min"] for m, t in zip(means, table)], [t["acc_max"] - m for m, t in zip(means, table)]]
    ax.bar(list(x), means, yerr=err, capsize=6, color=["gray"] + ["tab:blue"] * (len(table) - 1))
    ax.set_xticks(list(x), [t["what"] for t in table], rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="held-out exact match (min-max over seeds)", ylim=(0, 1),
           title="student accuracy: cross-entropy only vs + K/V distillation")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
