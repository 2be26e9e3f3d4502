"""What distillation from a stage-1 cache buys a student, with power: one command, resumable.

    python bench/bench_learn.py                  # everything: about 75 min on 2 CPU cores
    python bench/bench_learn.py --phase validation   # teachers, caches and the validation arms only

The design is fixed in bench/bench_learn_prereg.yaml (arms, settings, metric, decision rule), which
must be committed before the run that produces a reported table: the script refuses to start when
that file differs from the committed one (--allow-uncommitted for trials) and prints its commit.

1. Task: `synthetic` GSM8K-format problems. Two teachers are trained from scratch on 20,000 of
   them: a Qwen2 (tokenizer A) and a Llama (its own tokenizer B, with BOS).
2. Stage 1 runs once per teacher over the few training problems the student will see: the Qwen2
   teacher in 4-bit NF4 with its top-K next-token log-probs (--logits-topk), the Llama unquantized.
3. A smaller Qwen2 student (tokenizer A) trains on those problems only, through the sweep runner,
   once per arm and seed; seed s fixes the student's initialisation and data order for every arm, so
   each arm is paired with cross-entropy alone on the same seed. A registration may name several
   students (`students:`, e.g. a Llama one with tokenizer B), each with its own cross-entropy
   baseline (`baselines:`); an arm says which it trains (`student:`).
4. Every student is scored by exact match per held-out problem. Per arm: mean exact match, the
   mean paired difference to its student's cross-entropy alone with a 95% bootstrap interval over
   seeds and problems (bench/stats.py, paired_bootstrap), and the held-out and shuffled K/V
   cosines.
5. Validation split: the headroom check (logit KD against cross-entropy) and the ablations; each
   decision of `choose:` takes the candidate arm with the best paired difference there (of tied
   arms, the first listed; `@name` is the arm another decision chose). An arm may be built from
   chosen arms (`from_choice: NAME`: that arm's settings; `take: {NAME: [keys]}`: some of them),
   and runs once those decisions are made. Test split, once: the pre-registered arms and every
   chosen one, trained again or, with `reuse_validation_students: true`, the students trained for
   validation scored on test. Writes results-NAME.md, .json and .png in the root, NAME the
   registration file's name (so that registrations sharing a root keep their own reports).

The registration's `task: {device: cuda}` (default cpu) trains the teachers, runs stage 1 and
scores every model on that device, and is the students' device unless their settings name one; a
teacher may set its own `lr` (2e-3) and `batch` (32). A teacher's training settings are kept
beside it (ROOT/teacher-NAME.settings.json): a re-run reuses it, and another registration that
gives its name other settings in the same root is refused.

`torch_cpu_kernels: AVX2` runs a registration on the code paths of a CPU without AVX512 (torch's
kernels, MKL's and oneDNN's code; the run refuses to start on others and names the variables that
set them, ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS); a teacher's
`stage1: {cpu_4bit_kernel: plain}` takes bitsandbytes' 4-bit path of a CPU without AVX512-BF16.
That is another machine's arithmetic on this machine's cores, not another machine.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import kava_common
kava_common.set_process_defaults()  # before torch is imported
from kava_common import save_pretrained
from kava_demo import tiny
import numpy as np
import torch
import yaml

from kava_common.data import load_rows
from kava_common.synthetic import SYNTHETIC, synthetic_problems
from kava_common.prompt import format_sample
from stage1_extract.config import ExtractConfig
from stage1_extract.extract import main as extract
from stage2_train.evaluate import evaluate
from stats import paired_bootstrap
from stage2_train.sweep import run_sweep

from header import ISA_LIMITS, header, isa_settings

PREREG = Path(__file__).with_name("bench_learn_prereg.yaml")
COSINES = ("cos_k", "cos_k_shuffled", "cos_v", "cos_v_shuffled")


def check_prereg(path: Path, allow_uncommitted: bool) -> str:
    """The commit that last changed the pre-registration; refuses an uncommitted one."""
    root = PREREG.parents[1]
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()
    changed = git("status", "--porcelain", "--", str(path.resolve()))
    rev = git("log", "-1", "--format=%h %cI", "--", str(path.resolve()))
    if (changed or not rev) and not allow_uncommitted:
        raise SystemExit(f"error: {path} is not committed as it is; commit it before the run "
                         "(or pass --allow-uncommitted for a trial whose table is not reported)")
    return rev + (" (uncommitted changes)" if changed or not rev else "")


def check_kernels(reg: dict, capability: str) -> str:
    """A registration that names `torch_cpu_kernels` (AVX2, AVX512 or DEFAULT: the kernels another
    kind of CPU runs, emulated on this one) is refused unless torch runs those; its line for the
    log otherwise (none for a registration that names none: the header names the kernels)."""
    want = reg.get("torch_cpu_kernels")
    if want is None:
        return ""
    want = str(want).upper()
    if want not in ISA_LIMITS:
        raise SystemExit(f"error: torch_cpu_kernels {want}: choose one of {', '.join(ISA_LIMITS)}")
    if want != capability.upper():
        raise SystemExit(f"error: the registration asks for torch CPU kernels {want} and torch runs "
                         f"{capability}; set {isa_settings(want)} before the run")
    return f"torch CPU kernels {capability}, as the registration asks"


def train_lm(model, tok, texts: list[str], steps: int, batch: int, lr: float, seed: int, log,
             device: str = "cpu") -> None:
    """Plain next-token training on whole texts (ending in EOS), for the teachers; the batches
    are drawn on the CPU, so a seed gives the same batches on any device."""
    g = torch.Generator().manual_seed(seed)
    model.to(device)
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
        ids, mask = ids.to(device), mask.to(device)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 250 == 0:
            log(f"    step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()


# Beside a teacher's folder, not in it: stage 1 hashes every .json in the folder into the weights'
# identity, so a file added there would make every cache of that teacher stale.
TEACHER_RECORD = ".settings.json"           # teacher-NAME.settings.json: the settings it was trained with


def task_device(task: dict) -> str:
    """Where a registration trains its teachers, runs stage 1 and scores (`task: device`)."""
    return task.get("device", "cpu")


def teacher_record(spec: dict, task: dict) -> dict:
    """What a teacher's training depends on (not its stage-1 settings or the device)."""
    return {"arch": spec["arch"], "tokenizer": spec.get("tokenizer"), "init_seed": spec["init_seed"],
            "steps": spec["steps"], "model": spec["model"], "lr": float(spec.get("lr", 2e-3)),
            "batch": int(spec.get("batch", 32)), "dataset": task["dataset"],
            "teacher_problems": task["teacher_problems"]}


def build_teacher(root: Path, name: str, spec: dict, task: dict, tok, log) -> Path:
    """A teacher trained from scratch, kept on disk with the settings it was trained with: a re-run
    reuses it, a registration that gives the same name other settings is refused."""
    path, want = root / name, teacher_record(spec, task)
    rec = root / (name + TEACHER_RECORD)
    if (path / "config.json").is_file():
        if not rec.is_file():           # trained before the settings were kept beside it
            rec.write_text(json.dumps(want, indent=1) + "\n")
            log(f"  {path}: its training settings were not recorded; recorded now as this registration gives them")
            return path
        have = json.loads(rec.read_text())
        diff = [f"{k} {have.get(k)!r} there, {want.get(k)!r} here" for k in sorted(set(have) | set(want))
                if have.get(k) != want.get(k)]
        if diff:
            raise SystemExit(f"error: {path} was trained with other settings ({'; '.join(diff)}); give this "
                             "teacher another name, or another --root")
        return path
    arch = spec["arch"]
    cfg = tiny.tiny_config(arch, len(tok), tok=tok, **spec["model"])
    model = tiny.build_model(cfg, seed=spec["init_seed"])
    rows = load_rows(task["dataset"], "train", task["teacher_problems"])
    texts = [format_sample(q, a).text for q, a in zip(rows.questions, rows.answers)]
    log(f"  training teacher {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"{arch}) for {spec['steps']} steps on {len(texts)} problems")
    train_lm(model, tok, texts, spec["steps"], want["batch"], want["lr"], 0, log, task_device(task))
    model.to("cpu")
    tmp = root / (name + ".tmp")
    save_pretrained(model, tok, tmp)
    tmp.rename(path)
    rec.write_text(json.dumps(want, indent=1) + "\n")
    return path


def prepare(root: Path, reg: dict, log) -> dict:
    """Tokenizers, teachers, their caches and one student initialisation per seed: the
    values of the {placeholders} in the arms' settings."""
    task = reg["task"]
    rows = load_rows(task["dataset"], "train", 3000)
    corpus = [format_sample(q, a).text for q, a in zip(rows.questions, rows.answers)]
    toks = {"a": tiny.train_tokenizer(corpus, vocab_size=512),
            "b": tiny.train_tokenizer(corpus[::-1][:2000], vocab_size=600, add_bos=True)}
    paths = {"student_data": student_data(root, task)}
    n_eval = reg["eval"].get("teachers", 200)
    for name, spec in reg["teachers"].items():
        trained = spec.get("same_as", name)         # another stage-1 setting of a teacher already there
        tpath = build_teacher(root, f"teacher-{trained}", spec, task, toks[spec["tokenizer"]], log)
        paths[f"teacher_{name}"] = str(tpath)
        paths[f"teacher_{name}_acc"] = teacher_accuracy(tpath, name, task, n_eval, False, log)
        if reg["eval"].get("teachers_direct"):      # the same teacher without its chain of thought
            paths[f"teacher_{name}_direct_acc"] = teacher_accuracy(tpath, name, task, n_eval, True, log)
        data = answer_only_data(root, task, paths["student_data"]) if spec.get("answer_only") else paths["student_data"]
        (cache,) = extract(ExtractConfig(teachers=[str(tpath)], dataset=data,
                                         max_samples=task["student_problems"],
                                         batch_size=32, max_length=256, device=task_device(task),
                                         progress=False,
                                         out=str(root / "caches"), **spec["stage1"]))
        paths[f"cache_{name}"] = str(cache)
    for name, spec in students(reg).items():
        if "from_teacher" in spec:      # fine-tuned from that teacher: the same start for every seed
            for seed in reg["seeds"]:
                paths[student_key(name, seed)] = paths[f"teacher_{spec['from_teacher']}"]
            continue
        tok = toks[spec["tokenizer"]]
        for seed in reg["seeds"]:
            init = root / (f"student-init-{seed}" if name == DEFAULT else f"student-{name}-init-{seed}")
            if not (init / "config.json").is_file():
                cfg = tiny.tiny_config(spec["arch"], len(tok), tok=tok, **spec["model"])
                save_pretrained(tiny.build_model(cfg, seed=1000 + seed), tok, init)
            paths[student_key(name, seed)] = str(init)
    return paths


def teacher_accuracy(tpath: Path, name: str, task: dict, n: int, direct: bool, log) -> float:
    """A teacher's exact match on the first `n` validation problems, scored once (kept beside
    it); `direct`: without its chain of thought (evaluate --direct: the answer line begun for it)."""
    ev = tpath / (f"eval-validation{'-direct' if direct else ''}" + ("" if n == 200 else f"-{n}") + ".jsonl")
    r = evaluate(str(tpath), task["dataset"], "validation", n, batch_size=100, max_new_tokens=task["max_new_tokens"],
                 out=ev, device=task_device(task), progress=False, direct=direct) if not ev.is_file() else None
    scores = [json.loads(x)["correct"] for x in ev.read_text().splitlines()]
    log(f"  teacher {name}: exact match {np.mean(scores):.3f} on {n} validation problems"
        + (" without its chain of thought" if direct else "") + ("" if r else " (scored before)"))
    return float(np.mean(scores))


def answer_only_data(root: Path, task: dict, data: str) -> str:
    """The student's training problems with each answer cut to its final `#### N` line (a jsonl
    file in `root`): what a student without a chain of thought learns from."""
    from kava_common.prompt import FINAL_MARK
    path = root / f"student-{Path(data).stem}-{task['student_problems']}-answer-only.jsonl"
    if not path.is_file():
        rows = load_rows(data, "train", task["student_problems"])
        cut = []
        for i, (q, a) in enumerate(zip(rows.questions, rows.answers)):
            if FINAL_MARK not in a:
                raise SystemExit(f"error: {data} train row {i} has no {FINAL_MARK} line to keep as its answer")
            cut.append((q, a[a.rindex(FINAL_MARK):].strip()))
        write_problems(path, cut)
    return str(path)


def write_problems(path: Path, rows: list[tuple[str, str]]) -> None:
    """(question, answer) pairs as a jsonl data set, put in place whole (a stopped run leaves none)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    tmp.rename(path)


DEFAULT = "default"      # the one student of a registration without `students:`


def students(reg: dict) -> dict:
    """The registration's students: name -> {arch, tokenizer, model}."""
    if "students" in reg:
        return reg["students"]
    return {DEFAULT: {"arch": "qwen2", "tokenizer": "a", "model": reg["student"]["model"]}}


def student_key(name: str, seed: int) -> str:
    return f"student_{seed}" if name == DEFAULT else f"student_{name}_{seed}"


def arm_student(reg: dict, arm: str) -> str:
    return reg["arms"][arm].get("student", next(iter(students(reg))))


def baseline(reg: dict, arm: str) -> str:
    """The cross-entropy arm of the student that `arm` trains."""
    return reg["baselines"][arm_student(reg, arm)] if "baselines" in reg else reg["baseline"]


def decisions(reg: dict) -> dict:
    """name -> candidate arms (`@other`: the arm decision `other` chose)."""
    if "choose" not in reg and "choose_from" not in reg:    # every setting fixed before the run
        return {}
    return reg.get("choose") or {"chosen": reg["choose_from"]}


def refs(reg: dict, arm: str) -> set[str]:
    """The decisions an arm is built from."""
    spec = reg["arms"][arm]
    return ({spec["from_choice"]} if "from_choice" in spec else set()) | set(spec.get("take") or {})


def arm_settings(reg: dict, arm: str, chosen: dict) -> dict:
    """An arm's settings over student.settings (without `what` and `student`): its own, over
    those of the arm it is built from (`from_choice`) and the keys it takes from others."""
    spec = reg["arms"][arm]
    out = {}
    if "from_choice" in spec:
        out.update(arm_settings(reg, chosen[spec["from_choice"]], chosen))
    for name, keys in (spec.get("take") or {}).items():
        src = arm_settings(reg, chosen[name], chosen)
        out.update({k: src[k] for k in keys if k in src})
    out.update({k: v for k, v in spec.items() if k not in ("what", "student", "from_choice", "take")})
    return out


def resolve(name: str, chosen: dict) -> str:
    return chosen[name[1:]] if name.startswith("@") else name


def student_data(root: Path, task: dict) -> str:
    """The student's training problems: the data set's first `student_problems`, or with
    `student_slip_rate` the same draws with that share holding an arithmetic slip (written to a
    jsonl file in `root`), while the teachers learn from clean problems."""
    rate = task.get("student_slip_rate", 0.0)
    if not rate:
        return task["dataset"]
    path = root / f"student-{task['dataset']}-{task['student_problems']}-slip{rate}.jsonl"
    if not path.is_file():
        steps, max_start, varied = SYNTHETIC[task["dataset"]]
        write_problems(path, synthetic_problems(task["student_problems"], "train", 0, steps, max_start, rate, varied))
    return str(path)


def teacher_certainty(cache: str, every: int = 8, part: str = "answer") -> dict:
    """How much the cached teacher distribution says beyond the label, on the answer tokens
    (`part` "answer", from the reasoning on) or the question's tokens ("question": every token
    before the reasoning, the prompt template's too) of every `every`-th sample: mean top-1
    probability, the share of tokens above 0.99, the entropy of the top-K (nats) and how often
    the teacher's top token is the text's."""
    from kava_common.cache import open_cache
    c = open_cache(cache)
    top1, ent, agree = [], [], []
    for i in range(0, len(c), every):
        s = c[i]
        a = s["token_segments"]["reasoning"][0]
        rows = slice(a - 1, -1) if part == "answer" else slice(0, a - 1)     # position t predicts t+1
        p = s["topk_logprobs"][rows].exp()
        q = p / p.sum(-1, keepdim=True)
        top1.append(p[:, 0])
        ent.append(-(q * q.clamp(min=1e-12).log()).sum(-1))
        agree.append((s["topk_ids"][rows, 0] == s["input_ids"][rows.start + 1:rows.stop + 1 or None]).double())
    t, e, g = torch.cat(top1), torch.cat(ent), torch.cat(agree)
    return {"tokens": len(t), "top1": float(t.mean()), "above_099": float((t > 0.99).double().mean()),
            "entropy": float(e.mean()), "argmax_is_text": float(g.mean())}


def fill(value, paths: dict):
    """The arm's settings with {placeholders} (caches, student) replaced by prepared paths."""
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return paths[value[1:-1]]
    if isinstance(value, list):
        return [fill(v, paths) for v in value]
    return value


def run_one(job: tuple) -> dict:
    """One seed of one arm: a one-point sweep (the student's initialisation differs by seed),
    trained and scored on `split`; a finished run is read back, not repeated. With `trained`,
    the folder of the same arm and seed trained for another split (same settings, checked), its
    final student is scored on this split instead of training it again. "trained": whether this
    call trained it (a report's wall time covers only the runs trained in it)."""
    out, sweep, threads, trained = job
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if trained is not None and (trained / "results.csv").is_file():
        return dict(score_trained(out, sweep, trained, t0), trained=False)
    finished = any(out.glob("*/result.json"))
    (out / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    (row,) = run_sweep(out / "sweep.yaml", echo=lambda m: None, progress=False)
    return dict(scored(out / row["run"] / "eval.jsonl", row, t0), trained=not finished)


def scored(ev: Path, row: dict, t0: float) -> dict:
    """A run's per-problem scores (its eval.jsonl) and held-out cosines (its results row)."""
    per_problem = [json.loads(x) for x in ev.read_text().splitlines()]
    passes = [r["forward_passes"] for r in per_problem if "forward_passes" in r]
    return {"scores": [bool(r["correct"]) for r in per_problem], "wall": time.perf_counter() - t0,
            "passes": float(np.mean(passes)) if len(passes) == len(per_problem) else float("nan"),
            **{c: float(row[c]) if row.get(c) not in (None, "") else float("nan") for c in COSINES}}


def score_trained(out: Path, sweep: dict, trained: Path, t0: float) -> dict:
    """The final student of `trained` (a finished one-point sweep) scored on `sweep`'s split."""
    import csv
    before = yaml.safe_load((trained / "sweep.yaml").read_text())
    if (before["settings"], before["grid"]) != (sweep["settings"], sweep["grid"]):
        raise SystemExit(f"error: {trained} was trained with other settings than {out}; remove one of them")
    (row,) = list(csv.DictReader((trained / "results.csv").open()))
    ev = out / "eval.jsonl"
    if not ev.is_file():
        evaluate(str(trained / row["run"] / "final" / "student"), out=ev, progress=False, **sweep["eval"])
    return scored(ev, row, t0)


def arm_sweep(root: Path, arm: str, seed: int, split: str, reg: dict, paths: dict, chosen: dict) -> dict:
    """The one-point sweep that trains seed `seed` of `arm` and scores it on `split`."""
    own = arm_settings(reg, arm, chosen)
    settings = dict(reg["student"]["settings"], **{k: fill(v, paths) for k, v in own.items()})
    settings.setdefault("device", task_device(reg["task"]))     # unless the settings name one
    return {"out": str(root / split / arm / f"seed-{seed}"),
            "settings": dict(settings, student=paths[student_key(arm_student(reg, arm), seed)]),
            "grid": {"seed": [seed]},
            "eval": {"dataset": reg["task"]["dataset"], "split": split, "max_samples": reg["eval"][split],
                     "batch_size": reg["eval"]["batch_size"], "max_new_tokens": reg["task"]["max_new_tokens"],
                     "device": settings["device"],
                     # a latent student answers after its latent steps, as it trained
                     **({"latent": settings["latent"], "jacobi_iters": settings.get("jacobi_iters", 3)}
                        if settings.get("latent") else {})}}


def run_arms(root: Path, arms: list[str], split: str, reg: dict, paths: dict, pool, threads: int, log,
             reuse: str | None = None, chosen: dict | None = None) -> list[dict]:
    """Every seed of every arm in `arms`, `pool` running the runs side by side; an arm already
    trained for split `reuse` is scored, not trained again. `chosen`: the decisions made so far
    (arms built from them take the chosen arms' settings)."""
    jobs = []
    for arm in arms:
        for seed in reg["seeds"]:
            trained = root / reuse / arm / f"seed-{seed}" if reuse else None
            sweep = arm_sweep(root, arm, seed, split, reg, paths, chosen or {})
            jobs.append((arm, seed, (root / split / arm / f"seed-{seed}", sweep, threads, trained)))
    done = {}
    for (arm, seed, _), r in zip(jobs, pool.map(run_one, [j for *_, j in jobs])):
        done[arm, seed] = r
        log(f"    {split} {arm} seed {seed}: exact match {np.mean(r['scores']):.3f}, "
            f"{r['passes']:.1f} forward passes, cos K {r['cos_k']:.3f} "
            f"(shuffled {r['cos_k_shuffled']:.3f}) [{r['wall']:.0f} s{'' if r['trained'] else ', read back'}]")
    results = []
    for arm in arms:
        rs = [done[arm, seed] for seed in reg["seeds"]]
        results.append({"arm": arm, "what": reg["arms"][arm]["what"], "baseline": baseline(reg, arm),
                        "runs_trained": sum(r["trained"] for r in rs),
                        "scores": np.array([r["scores"] for r in rs], dtype=np.float64),
                        **{c: float(np.nanmean([r[c] for r in rs])) if any(r[c] == r[c] for r in rs)
                           else float("nan") for c in (*COSINES, "passes")}})
    return results


def compare(results: list[dict]) -> list[dict]:
    """Per arm: mean exact match and the paired difference to its baseline (the cross-entropy arm
    of its student, among `results`) with its 95% interval."""
    scores = {r["arm"]: r["scores"] for r in results}
    rows = []
    for r in results:
        row = {k: v for k, v in r.items() if k != "scores"}
        per_seed = r["scores"].mean(axis=1)
        row.update(acc=float(r["scores"].mean()), acc_min=float(per_seed.min()), acc_max=float(per_seed.max()))
        if r["arm"] != r["baseline"]:
            row["paired"] = paired_bootstrap(r["scores"], scores[r["baseline"]])
        rows.append(row)
    return rows


def table(rows: list[dict]) -> list[str]:
    f = lambda x: "-" if x != x else f"{x:.3f}"
    passes = any(r["passes"] == r["passes"] for r in rows)      # NaN: eval files without forward passes
    lines = ["| arm | exact match (seed min-max) | paired diff to " + ("its baseline" if passes else "CE") +
             " [95% CI] | cos K (shuffled) | cos V (shuffled) |" + (" forward passes per answer |" if passes else ""),
             "|---|---|---|---|---|" + ("---|" if passes else "")]
    for r in rows:
        p = r.get("paired")
        diff = "(baseline)" if p is None else f"{p['diff']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}]"
        lines.append(f"| {r['what']} | {r['acc']:.3f} ({r['acc_min']:.3f}-{r['acc_max']:.3f}) | {diff} | "
                     f"{f(r['cos_k'])} ({f(r['cos_k_shuffled'])}) | {f(r['cos_v'])} ({f(r['cos_v_shuffled'])}) |"
                     + (f" {r['passes']:.1f} |" if passes else ""))
    return lines


def diff_label(rows: list[dict]) -> str:
    """The x axis of a section's plot: what its paired differences are taken against (the
    baseline arm's description when every row shares one)."""
    what = {r["arm"]: r["what"] for r in rows}
    bases = {r["baseline"] for r in rows if "paired" in r}
    base = what.get(bases.pop()) if len(bases) == 1 else None
    return f"exact match minus {base or 'its baseline'} (paired, 95% CI)"


def figure(sections: list[tuple[str, list[dict]]]):
    """One panel per section: each arm's paired difference to its baseline with its 95% interval,
    green above zero, red below, gray across it. Long labels are wrapped and the figure is as tall
    as they need, so that none is cut off at its edge."""
    import textwrap
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    wrap = lambda text, width: "\n".join(textwrap.wrap(text, width))
    lines = max(sum(wrap(r["what"], 40).count("\n") + 1 for r in rows if "paired" in r) for _, rows in sections)
    fig, axes = plt.subplots(1, len(sections), figsize=(8 * len(sections), max(3.0, 1.5 + 0.3 * lines)),
                             squeeze=False)
    for ax, (title, every) in zip(axes[0], sections):
        rows = [r for r in every if "paired" in r]
        y = list(range(len(rows)))[::-1]
        d = [r["paired"]["diff"] for r in rows]
        err = [[r["paired"]["diff"] - r["paired"]["low"] for r in rows],
               [r["paired"]["high"] - r["paired"]["diff"] for r in rows]]
        colors = ["tab:green" if r["paired"]["low"] > 0 else "tab:red" if r["paired"]["high"] < 0 else "tab:gray"
                  for r in rows]
        ax.barh(y, d, xerr=err, capsize=4, color=colors)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y, [wrap(r["what"], 40) for r in rows], fontsize=8)
        ax.set_title(wrap(title, 50))
        ax.set_xlabel(wrap(diff_label(every), 80), fontsize=8)
    fig.tight_layout()
    return fig


def plot(sections: list[tuple[str, list[dict]]], png: Path) -> None:
    import matplotlib.pyplot as plt
    fig = figure(sections)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def choose(rows: list[dict], candidates: list[str]) -> str:
    """The decision rule of the pre-registration: the candidate arm with the largest mean
    paired difference to cross-entropy alone on validation; of tied arms, the first listed."""
    by_arm = {r["arm"]: r for r in rows}
    return max(candidates, key=lambda arm: (by_arm[arm]["paired"]["diff"], -candidates.index(arm)))


def validate(root: Path, reg: dict, paths: dict, pool, threads: int, log) -> tuple[list[dict], dict]:
    """The validation arms, in rounds: the arms whose decisions are made run, then every decision
    whose candidates have all run is taken; until every arm has run. Returns the raw results
    and {decision: chosen arm}."""
    chosen, raw, pending = {}, [], list(reg.get("validation") or [])
    while pending:
        ready = [a for a in pending if refs(reg, a) <= set(chosen)]
        if not ready:
            raise SystemExit(f"error: validation arms {pending} are built from decisions that are never made")
        raw += run_arms(root, ready, "validation", reg, paths, pool, threads, log, chosen=chosen)
        pending = [a for a in pending if a not in ready]
        made = True
        while made:                             # a decision may name another one's choice
            made = False
            rows = compare(raw)
            have = {r["arm"] for r in rows}
            for name, cands in decisions(reg).items():
                if name in chosen or any(c.startswith("@") and c[1:] not in chosen for c in cands):
                    continue
                arms = [resolve(c, chosen) for c in cands]
                if set(arms) <= have:
                    chosen[name] = choose(rows, list(dict.fromkeys(arms)))
                    log(f"  decision {name}: {chosen[name]} ({', '.join(arms)} on validation)")
                    made = True
    missing = sorted(set(decisions(reg)) - set(chosen))
    if missing:
        raise SystemExit(f"error: decisions {missing} name arms that validation does not run")
    return raw, chosen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="data_cache/bench_learn")
    p.add_argument("--phase", choices=("prepare", "validation", "all"), default="all",
                   help="stop after the teachers and caches, after validation, or run all")
    p.add_argument("--prereg", default=str(PREREG), help="the pre-registration (arms, settings, rule)")
    p.add_argument("--workers", type=int, default=2, help="student runs side by side (threads split among them)")
    p.add_argument("--allow-uncommitted", action="store_true",
                   help="run with a pre-registration that differs from the committed one (trials only)")
    a = p.parse_args(argv)
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    log = lambda *x: print(*x, flush=True)
    log(header())
    prereg = Path(a.prereg)
    log(f"pre-registration {prereg}: commit {check_prereg(prereg, a.allow_uncommitted)}")
    reg = yaml.safe_load(prereg.read_text())
    if kernels := check_kernels(reg, torch.backends.cpu.get_cpu_capability()):
        log(kernels)
    t0 = time.perf_counter()
    log("teachers and caches")
    paths = prepare(root, reg, log)
    if a.phase == "prepare":
        return
    # shut down on the way out, so that the interpreter's exit does not find the pool's pipes closed
    with ProcessPoolExecutor(a.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        threads = max(1, torch.get_num_threads() // a.workers)
        log(f"validation arms ({a.workers} runs side by side, {threads} thread(s) each)")
        raw, chosen = validate(root, reg, paths, pool, threads, log)
        sections, pairs = [], []
        if raw:              # a registration that fixes every setting beforehand has no validation arms
            sections.append((f"validation ({reg['eval']['validation']} problems x {len(reg['seeds'])} seeds)", compare(raw)))
            pairs.append(("validation", *also(raw, reg, chosen)))
        if a.phase == "all":
            log("test arms")
            arms = list(dict.fromkeys([*(resolve(x, chosen) for x in reg["test"]), *chosen.values()]))
            raw = run_arms(root, arms, "test", reg, paths, pool, threads, log,
                           reuse="validation" if reg.get("reuse_validation_students") else None, chosen=chosen)
            sections.append((f"test ({reg['eval']['test']} problems x {len(reg['seeds'])} seeds)", compare(raw)))
            pairs.append(("test", *also(raw, reg, chosen)))
    for split, lines, _ in pairs:
        for line in lines:
            log(f"{split}, {line}")
    report(root / f"results-{prereg.stem}", reg, paths, sections, chosen, [(s, rows) for s, _, rows in pairs],
           time.perf_counter() - t0, log)


def also(raw: list[dict], reg: dict, chosen: dict) -> tuple[list[str], list[dict]]:
    """The registration's `also_compare` pairs (arm - other, paired as every arm is with its
    baseline) among the arms in `raw`: lines to print, and rows for results.json."""
    scores = {r["arm"]: r["scores"] for r in raw}
    lines, rows = [], []
    for arm, other in reg.get("also_compare", []):
        a, b = resolve(arm, chosen), resolve(other, chosen)
        if a in scores and b in scores:
            d = paired_bootstrap(scores[a], scores[b])
            lines.append(f"{arm} ({a}) - {other} ({b}): {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")
            rows.append({"arm": a, "other": b, "paired": d})
    return lines, rows


def steps_text(reg: dict) -> str:
    """The students' training length: the registration's steps x batch, and the arms that set
    their own steps."""
    base = reg["student"]["settings"]
    own = [f"{arm} {spec['max_steps']}" for arm, spec in reg["arms"].items()
           if spec.get("max_steps", base["max_steps"]) != base["max_steps"]]
    return f"{base['max_steps']} steps x batch {base['batch_size']}" + (
        f" ({', '.join(own)} steps: arms that set their own)" if own else "")


def report(out: Path, reg: dict, paths: dict, sections, chosen: dict, pairs, wall: float, log) -> None:
    """The table, numbers and plot of a registration: `out` with .md, .json and .png."""
    t = reg["task"]
    lines = [f"Task {t['dataset']}: students see {t['student_problems']} problems, {steps_text(reg)}, "
             f"seeds {reg['seeds']}. Teachers ({reg['eval'].get('teachers', 200)} validation problems): "
             + ", ".join(f"{n} {paths[f'teacher_{n}_acc']:.3f}" + (
                 f" with its chain of thought, {paths[f'teacher_{n}_direct_acc']:.3f} without (--direct)"
                 if f"teacher_{n}_direct_acc" in paths else "") for n in reg["teachers"]) + "."]
    for name, spec in reg["teachers"].items():
        if not spec["stage1"].get("logits_topk"):
            continue
        c = teacher_certainty(paths[f"cache_{name}"])
        lines.append(f"The {name} teacher's cached next-token distribution on the answer tokens ({c['tokens']} tokens "
                     f"of every 8th sample): mean top-1 probability {c['top1']:.4f}, {c['above_099']:.1%} of "
                     f"tokens above 0.99, top-K entropy {c['entropy']:.4f} nats, top token = the text's "
                     f"{c['argmax_is_text']:.2%}: what logit distillation can add to the labels.")
        if any(reg["arms"][arm].get("kd_tokens") == "all" for arm in reg["arms"]):
            c = teacher_certainty(paths[f"cache_{name}"], part="question")
            lines.append(f"On the question's tokens (the prompt's too; {c['tokens']} tokens): mean top-1 probability "
                         f"{c['top1']:.4f}, {c['above_099']:.1%} above 0.99, top-K entropy {c['entropy']:.4f} nats, "
                         f"top token = the text's {c['argmax_is_text']:.2%}.")
    for title, rows in sections:
        lines += ["", f"{title}:", "", *table(rows)]
    lines += [""] + [f"Chosen on validation by the pre-registered rule ({name}): {reg['arms'][arm]['what']} ({arm})."
                     for name, arm in chosen.items()]
    for split, rows in pairs:
        lines += [f"{split}, {reg['arms'][r['arm']]['what']} - {reg['arms'][r['other']]['what']}: "
                  f"{r['paired']['diff']:+.3f} [{r['paired']['low']:+.3f}, {r['paired']['high']:+.3f}]" for r in rows]
    text = "\n".join(lines)
    # a re-run that reads every run back is quick: say how many runs the wall time paid for
    runs = {"trained": sum(r.get("runs_trained", 0) for _, rows in sections for r in rows),
            "all": len(reg["seeds"]) * sum(len(rows) for _, rows in sections)}
    Path(f"{out}.md").write_text(text + "\n")
    Path(f"{out}.json").write_text(json.dumps({"paths": paths, "chosen": chosen, "sections": [
        {"title": s, "rows": rows} for s, rows in sections], "also_compare": [
        {"split": s, "rows": rows} for s, rows in pairs], "wall_s": wall, "runs": runs}, indent=1))
    plot(sections, Path(f"{out}.png"))
    log("")
    log(text)
    log(f"\nwall time {wall:.0f} s ({runs['trained']} of {runs['all']} runs trained in it, the rest read back); "
        f"table {out}.md, plot {out}.png")


if __name__ == "__main__":
    main()
