"""python -m stage2_train.evaluate --model PATH --dataset {gsm8k,synthetic,PATH} --split test

Batched greedy generation with any Hugging Face causal LM (base student, distilled student,
teacher) on the shared prompt template; the answer is the number after the last `####`, else
the last number in the output; exact match against the gold `####` answer. Writes one JSON
line per sample (prompt, output, extracted, gold, correct) and prints the accuracy.
"""

from __future__ import annotations

import json
import os
import re
import sys
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from kava_common import KavaError, no_hf_progress_bars
from kava_common.cli import coerce_settings, command, setting
from kava_common.data import load_rows
from kava_common.device import resolve_device
from kava_common.prompt import FINAL_MARK, extract_final_answer, format_prompt

DIRECT = " " + FINAL_MARK       # what --direct puts after the prompt: the answer line, begun
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The `####` answer if there is one, else the last number; normalised (no commas, no
    trailing zeros after a decimal point, no '+')."""
    final = extract_final_answer(text)
    if final is not None:
        m = _NUMBER.search(final)
        return normalize(m.group(0)) if m else (final or None)
    nums = _NUMBER.findall(text)
    return normalize(nums[-1]) if nums else None


def direct_answer(output: str) -> str:
    """What --direct scores of a continuation of `prompt ####`: its answer line up to the end of
    the line or another `####` (a model that goes on to write its reasoning and a later answer
    line would otherwise be scored on an answer it reasoned its way to)."""
    return FINAL_MARK + output.split("\n")[0].split(FINAL_MARK)[0]


def normalize(num: str) -> str:
    num = num.replace(",", "").strip().lstrip("+")
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return num or "0"


def gold_answer(answer: str) -> str | None:
    final = extract_final_answer(answer)
    return normalize(final) if final else None


@dataclass
class EvalResult:
    n: int                 # rows scored (those with a gold `####` answer)
    correct: int
    unscored: int = 0      # rows without a gold `####` answer: generated and written, not scored
    forward_passes: float = float("nan")   # per problem, on average
    seconds: float = float("nan")          # wall time per problem, on average

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int, device) -> tuple[list[str], list[int]]:
    """Greedy continuations of a batch of prompts (left-padded), cut at EOS, and the forward
    passes each took: one per generated token (the prompt's pass gives the first)."""
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    counts = [(row.index(tok.eos_token_id) + 1) if tok.eos_token_id in row else len(row) for row in new]
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True), counts


EVAL_KEYS = {"index", "prompt", "output", "extracted", "gold", "correct"}


def check_out(out: Path, overwrite: bool = False) -> None:
    """Refuse an --out that holds a file evaluate did not write (its first line is not one of
    evaluate's records) unless `overwrite`, and always one that is a model's, cache's or run's
    own file (its folder holds config.json, manifest.json or metrics.jsonl): a typo must not
    replace weights with JSONL."""
    from kava_common import check_output_folder
    check_output_folder(out.parent, "--out")
    if out.is_dir():
        raise KavaError(f"--out {out}: a folder; give a file name for the per-sample JSONL")
    if not out.exists():
        return
    try:
        with open(out, "rb") as f:
            first = f.readline(1 << 16).decode("utf-8")
        ours = not first.strip() or EVAL_KEYS <= set(json.loads(first))
    except (ValueError, TypeError, UnicodeDecodeError):
        ours = False
    if ours:
        return
    owned = any((out.parent / n).exists() for n in ("config.json", "manifest.json", "metrics.jsonl"))
    if owned or not overwrite:
        raise KavaError(f"--out {out}: exists and is not a file evaluate wrote" + (
            " (it belongs to the model, cache or run in that folder); choose another path" if owned else
            "; choose another path, or pass --overwrite to replace it"))


def check_finite_weights(model, name: str) -> None:
    """A model whose weights hold NaN or Inf answers nothing that means anything: refused."""
    from kava_common import all_finite
    for pname, p in (model.named_parameters() if isinstance(model, torch.nn.Module) else ()):
        if not all_finite(p.detach()):
            raise KavaError(f"{name}: weight {pname} holds NaN or Inf; its answers would mean nothing, so it is "
                            "not evaluated")


def evaluate(model_path: str, dataset: str = "synthetic", split: str = "test", max_samples: int | None = None,
             batch_size: int = 16, max_new_tokens: int = 256, out: str | Path | None = None,
             seed: int = 0, device: str = "auto", progress: bool = True, model=None, tok=None,
             overwrite: bool = False, latent: int = 0, jacobi_iters: int = 3, direct: bool = False) -> EvalResult:
    """Exact match of greedy answers; with `latent` M the student answers after M latent steps
    (its LatentHead read from beside it), else it writes its answer out; with `direct` the answer
    line is begun for it (DIRECT after the prompt), so that it gives the number without reasoning."""
    import time
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM
    from kava_common.data import load_fast_tokenizer
    dev = resolve_device(device)
    if out is not None:
        check_out(Path(out), overwrite)
    if latent and direct:
        raise KavaError("--latent and --direct: a latent student answers after its latent steps; choose one")
    if model is None:
        tok = load_fast_tokenizer(model_path, "model")
        with no_hf_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(model_path).to(dev)
    check_finite_weights(model, model_path)
    model.eval()
    head = None
    if latent:
        from .latent import load_latent_head
        head = load_latent_head(model_path, model.config.get_text_config().hidden_size, dev)
    rows = load_rows(dataset, split, max_samples, seed=seed)
    tmp = Path(str(out) + ".tmp") if out else None
    out_f = open(tmp, "w", encoding="ascii") if out else None    # renamed into place when complete
    correct, unscored, done, passes, t0 = 0, 0, False, 0, time.perf_counter()
    bar = tqdm(total=len(rows), desc="evaluate", unit="sample", disable=not progress, ascii=True)
    try:
        for i in range(0, len(rows), batch_size):
            qs, golds = rows.questions[i:i + batch_size], rows.answers[i:i + batch_size]
            prompts, outs, counts = answer_batch(model, tok, head, qs, max_new_tokens, dev, latent, jacobi_iters,
                                                 direct)
            passes += sum(counts)
            for j, (p, o, g, c) in enumerate(zip(prompts, outs, golds, counts)):
                pred, gold = extract_answer(direct_answer(o) if direct else o), gold_answer(g)
                ok = (pred is not None and pred == gold) if gold is not None else None
                correct += bool(ok)
                unscored += gold is None
                if out_f:
                    out_f.write(json.dumps({"index": i + j, "prompt": p, "output": o, "extracted": pred,
                                            "gold": gold, "correct": ok, "forward_passes": c}) + "\n")
            bar.update(len(qs))
            bar.set_postfix_str(f"acc {correct / max(1, min(i + batch_size, len(rows)) - unscored):.3f}")
        done = True
    finally:
        bar.close()
        if out_f:
            out_f.close()
            if done:
                os.replace(tmp, out)
            else:
                tmp.unlink(missing_ok=True)
    n = max(len(rows), 1)
    return EvalResult(len(rows) - unscored, correct, unscored, passes / n, (time.perf_counter() - t0) / n)


def answer_batch(model, tok, head, questions: list[str], max_new_tokens: int, dev, latent: int = 0,
                 jacobi_iters: int = 3, direct: bool = False) -> tuple[list[str], list[str], list[int]]:
    """Prompts, greedy outputs and forward passes for a batch of questions: after `latent` steps
    through `head`, with the answer line begun (`direct`), or written out."""
    prompts = [format_prompt(q) + (DIRECT if direct else "") for q in questions]
    if head is not None:
        from .latent import latent_generate
        return prompts, *latent_generate(model, tok, head, prompts, latent, jacobi_iters, max_new_tokens, dev)
    return prompts, *generate(model, tok, prompts, max_new_tokens, dev)


@dataclass
class EvalConfig:
    """Settings of `python -m stage2_train.evaluate` (kava_common.cli)."""
    model: str = setting("", "folder or hub id of a causal LM with its tokenizer, or a stage-2 run "
                                 "or checkpoint folder (RUN, RUN/final, RUN/step-N: its student)")
    dataset: str = setting("synthetic", "gsm8k | synthetic | synthetic-hard | synthetic-varied | PATH")
    split: str = setting("test", "data set split")
    max_samples: int | None = setting(None, "first N problems only")
    batch_size: int = setting(16, "prompts per generate call")
    max_new_tokens: int = setting(256, "tokens generated per answer at most")
    seed: int = setting(0, "seed of the synthetic data sets")
    out: str | None = setting(None, "per-sample JSONL (default: MODEL/eval-SPLIT.jsonl for a local model)")
    overwrite: bool = setting(False, "replace an --out that evaluate did not write (never a model's, cache's or "
                              "run's own file)")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    latent: int | None = setting(None, "a latent student (stage 2 --latent): answer after M latent steps, beside a "
                                 "decode that writes its answer out (per-sample JSONL of that one in OUT with "
                                 "-written); default: a latent run's own M, else 0 (written out only)")
    jacobi_iters: int | None = setting(None, "--latent: parallel passes over the latents; 0: one after another "
                                       "(default: the run's own, else 3)")
    direct: bool = setting(False, "answer without a chain of thought: the prompt is followed by ' ####', so the "
                           "model gives its number at once (the accuracy of a reasoning model without its reasoning)")
    progress: bool = setting(True, "show a progress bar")

    def __post_init__(self):
        p = coerce_settings(self)
        if p:
            raise ValueError("invalid evaluate settings:\n  " + "\n  ".join(p))
        if (self.latent or 0) < 0 or (self.jacobi_iters or 0) < 0:
            p.append(f"--latent and --jacobi-iters must be >= 0, got {self.latent} and {self.jacobi_iters}")
        if not self.model:
            p.append("--model: give a folder or hub id")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if p:
            raise ValueError("invalid evaluate settings:\n  " + "\n  ".join(p))


def student_of(model: str) -> str:
    """The model a stage-2 run or checkpoint folder stands for: RUN -> RUN/final/student, RUN/final
    or RUN/step-N -> its student/ (where the latent head is read from beside); a model folder or a
    hub id as given."""
    p = Path(model)
    if not p.is_dir() or (p / "config.json").is_file():
        return model
    for sub in (p / "student", p / "final" / "student"):
        if (sub / "config.json").is_file():
            return str(sub)
    return model


def trained_latent(model: str) -> dict:
    """`latent` and `jacobi_iters` of the stage-2 run whose student `model` is (RUN/final/student,
    RUN/step-N/student: RUN/config.yaml), or {} for any other model."""
    from .config import saved_settings
    run = Path(model).parent.parent
    if Path(model).name != "student" or not (run / "config.yaml").is_file():
        return {}
    try:
        cfg = saved_settings(run)
    except KavaError as e:
        raise KavaError(f"{e}; give --latent and --jacobi-iters") from None
    return {k: int(cfg.get(k) or 0) for k in ("latent", "jacobi_iters") if k in cfg}


def passes(iters: int) -> str:
    return f"{iters} Jacobi pass{'' if iters == 1 else 'es'}" if iters else "one after another"


def with_run_latent(a: EvalConfig, trained: dict) -> tuple[EvalConfig, list[str]]:
    """--latent and --jacobi-iters not given: the run's own (a latent run answers as it trained),
    else 0 and 3; given otherwise than the run trained: said."""
    said = []
    run_latent, run_iters = trained.get("latent", 0), trained.get("jacobi_iters", 3)
    latent = a.latent if a.latent is not None else 0 if a.direct else run_latent
    iters = a.jacobi_iters if a.jacobi_iters is not None else run_iters
    if run_latent:
        how = f"{run_latent} latent steps, {passes(run_iters)}"
        if latent and (latent, iters) != (run_latent, run_iters):
            said.append(f"note: evaluating {latent} latent steps, {passes(iters)}; the run trained {how}")
        elif latent and a.latent is None:
            said.append(f"the run trained {how}: answering so (give --latent 0 for the written decode alone)")
    return dataclasses.replace(a, latent=latent, jacobi_iters=iters), said


def run(a: EvalConfig) -> None:
    model = student_of(a.model)
    if model != a.model:
        print(f"--model {a.model} is a stage-2 run or checkpoint: evaluating its student, {model}")
        a = dataclasses.replace(a, model=model)
    a, said = with_run_latent(a, trained_latent(a.model))
    for line in said:
        print(line)
    out = a.out or (str(Path(a.model) / f"eval-{a.split}.jsonl") if Path(a.model).is_dir() else None)
    r = evaluate(a.model, a.dataset, a.split, a.max_samples, a.batch_size, a.max_new_tokens, out,
                 a.seed, a.device, a.progress, overwrite=a.overwrite, latent=a.latent, jacobi_iters=a.jacobi_iters,
                 direct=a.direct)
    how = f" after {a.latent} latent steps" if a.latent else " without a chain of thought" if a.direct else ""
    print(f"exact match{how} {r.correct}/{r.n} = {r.accuracy:.4f} on {a.dataset} {a.split}, "
          f"{r.forward_passes:.1f} forward passes and {r.seconds * 1000:.0f} ms per problem"
          + (f"; {r.unscored} rows without a gold #### answer were not scored" if r.unscored else "")
          + (f"; per-sample results in {out}" if out else ""))
    if a.latent:                        # the same student writing its answer out, for comparison
        written = str(Path(out).with_name(Path(out).stem + "-written.jsonl")) if out else None
        w = evaluate(a.model, a.dataset, a.split, a.max_samples, a.batch_size, a.max_new_tokens, written,
                     a.seed, a.device, a.progress, overwrite=a.overwrite)
        print(f"exact match written out {w.correct}/{w.n} = {w.accuracy:.4f}, {w.forward_passes:.1f} forward passes "
              f"and {w.seconds * 1000:.0f} ms per problem" + (f"; per-sample results in {written}" if written else ""))


main = command(EvalConfig, run, prog="python -m stage2_train.evaluate", description=__doc__.split("\n\n")[1],
               interrupted="interrupted: no results written (an earlier --out file is kept as it was)")


if __name__ == "__main__":
    sys.exit(main())
