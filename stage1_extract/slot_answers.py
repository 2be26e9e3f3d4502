"""python -m stage1_extract.slot_answers CACHE [--slots 4,8,16] [--select rkv,even] [--samples 1000]

How much of the teacher's answer its chain of thought's slots keep. For each of a cache's first
samples, the teacher that wrote it reads the answer (teacher-forced) with its chain of thought's
K/V in one of these forms, the question's K/V always whole:

- `full`: every reasoning token's K/V, as stage 1 saw them (the check of this tool: the same
  predictions as the teacher over the whole text);
- `rkv M` / `even M`: only M slots per layer and KV head, chosen as stage 1 and recompress choose
  them (R-KV's score with the cache's lambda, or evenly spaced), from the stored importance and
  keys: the compressed cache a latent student's K/V are taught to be;
- `none`: no chain of thought at all.

The tokens between the chain of thought and the answer (`\\n#### `) and the answer keep their
positions in the sample, so a slot's key, stored after RoPE, sits where it was. Reported per
form: the share of answers whose every token is the teacher's top prediction (the answer greedy
decoding would write, EOS aside), the share of answer tokens, and the mean negative log-likelihood
per answer token. A perfect imitation of the slots gives a latent student at most what its form
gives the teacher; what `none` gives is what the slots add nothing to.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from kava_common import KavaError
from kava_common.cli import command, setting
from kava_common.rkv import SELECTS, choose, result_tokens

from .config import CPU_4BIT_KERNELS


@dataclass
class SlotAnswersArgs:
    """Settings of `python -m stage1_extract.slot_answers` (kava_common.cli)."""
    cache: str = setting("", "a cache folder stage 1 wrote with float K/V of every teacher layer", positional=True)
    teacher: str | None = setting(None, "the teacher's hub id or folder (default: the one the manifest names); "
                                        "its weights must be the ones that wrote the cache")
    samples: int = setting(1000, "the cache's first N samples")
    slots: list[int] = setting(lambda: [8], "slots per layer and KV head to try, e.g. 4,8,16")
    select: list[str] = setting(lambda: ["rkv", "even"], "how slots are chosen: rkv (R-KV's score), even (evenly "
                                                        "spaced), results (the calculator results' tokens)")
    rkv_lambda: float | None = setting(None, "R-KV's weight of importance against redundancy (default: the cache's)")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    cpu_4bit_kernel: str | None = setting(None, "bitsandbytes 4-bit path on a CPU: auto, packed or plain (default: "
                                                "the one the cache was written on, plain where this CPU lacks it)",
                                            choices=CPU_4BIT_KERNELS)
    progress: bool = setting(True, "show a progress bar")

    def __post_init__(self):
        bad = [f"--slots {m}: must be at least 1" for m in self.slots if m < 1]
        bad += [f"--select {s!r}: choose {', '.join(SELECTS)}" for s in self.select if s not in SELECTS]
        if self.samples < 1:
            bad.append(f"--samples {self.samples}: must be at least 1")
        if bad:
            raise ValueError("; ".join(bad))


def forms(a: SlotAnswersArgs) -> list[tuple[str, str | None, int]]:
    """(name, select, slots) of each form: full, each select x slots, none."""
    return ([("full", None, 0)] + [(f"{s} {m}", s, m) for s in a.select for m in a.slots] + [("none", None, 0)])


def past_kv(k: torch.Tensor, v: torch.Tensor, r0: int, r1: int, imp: torch.Tensor | None, select: str | None,
            slots: int, lam: float, full: bool, results: list[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) (1, H, T, D) the answer reads: the tokens before the chain of
    thought (question and prompt, [0, r0)), then every reasoning token (`full`), M slots per KV
    head (`select`), or none. k, v (L, H, T, D); imp (L, H, T) the stored importance; `results`
    the calculator results' tokens (`kava_common.rkv.result_tokens`) for select `results`."""
    if full:
        return with_question(k, v, r0, {layer: (k[layer, :, r0:r1], v[layer, :, r0:r1]) for layer in range(len(k))})
    if select is None or r1 <= r0:
        return with_question(k, v, r0, None)
    middle = {}
    for layer in range(k.shape[0]):
        kr, vr = k[layer, :, r0:r1].float(), v[layer, :, r0:r1].float()
        i_r = imp[layer, :, r0:r1] if imp is not None else torch.zeros(kr.shape[:2])
        sel = choose(i_r, kr, vr, slots, lam, how=select, results=results)
        n = int(sel["mask"][0].sum())       # the same for every head: the filled slots
        middle[layer] = (sel["k"][:, :n], sel["v"][:, :n])
    return with_question(k, v, r0, middle)


def with_question(k: torch.Tensor, v: torch.Tensor, r0: int, middle: dict | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) (1, H, T, D): the sample's K/V before its chain of thought
    ([0, r0) of k, v (L, H, T, D)), then `middle` {layer: (K, V) (H, n, D)} in the cache's dtype
    in place of the chain of thought (None: nothing)."""
    out = []
    for layer in range(k.shape[0]):
        ks, vs = [k[layer, :, :r0]], [v[layer, :, :r0]]
        if middle is not None:
            ks.append(middle[layer][0].to(k.dtype))
            vs.append(middle[layer][1].to(v.dtype))
        out.append((torch.cat(ks, 1)[None], torch.cat(vs, 1)[None]))
    return out


@torch.no_grad()
def answer_scores(model, ids: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]], r1: int, a0: int,
                  a1: int) -> tuple[bool, int, float]:
    """The teacher reads tokens [r1, a1) (between the chain of thought and the answer, then the
    answer) at their positions in the sample after `past`: (every answer token its top
    prediction, how many are, summed negative log-likelihood of the answer tokens)."""
    from transformers import DynamicCache
    dev, dtype = model.device, model.dtype
    cache = DynamicCache(ddp_cache_data=[(pk.to(dev, dtype), pv.to(dev, dtype)) for pk, pv in past],
                         config=model.config)
    new = ids[r1:a1][None].to(dev)
    seen = past[0][0].shape[2] + new.shape[1]
    out = model(input_ids=new, attention_mask=torch.ones(1, seen, dtype=torch.long, device=dev),
                position_ids=torch.arange(r1, a1, device=dev)[None], cache=cache, use_cache=False)
    logits = out.logits[0, a0 - 1 - r1:a1 - 1 - r1]                  # the predictions of tokens a0 .. a1-1
    return answer_score(logits, ids[a0:a1].to(dev))


def answer_score(logits: torch.Tensor, target: torch.Tensor) -> tuple[bool, int, float]:
    """(every answer token the top prediction, how many are, summed negative log-likelihood) of
    the answer tokens `target` (n,) from the logits that predict them (n, vocab)."""
    logits = logits.float()
    right = int((logits.argmax(-1) == target).sum())
    return right == len(target), right, float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))


def has_packed_kernel() -> bool:
    from kava_common import import_bitsandbytes
    return bool(import_bitsandbytes().functional.has_avx512bf16())


def check_teacher(name: str, manifest) -> None:
    """Refuse a teacher whose weights are not the ones that wrote the cache."""
    from transformers import AutoConfig
    from .teacher import weights_identity
    want = manifest.raw["teacher"].get("weights")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:        # a relative folder from elsewhere, a hub id offline, ...
        raise KavaError(f"teacher {name!r} could not be loaded ({str(e).strip().splitlines()[0][:200]}); "
                        "give its folder or hub id with --teacher") from None
    got = weights_identity(name, config)
    if want and got != want:
        raise KavaError(f"teacher {name!r} ({got}) is not the one that wrote the cache ({want}); "
                        "give it with --teacher")


def cache_teacher(m, teacher: str | None, device: torch.device, cpu_4bit_kernel: str | None = None, echo=print):
    """The teacher that wrote the cache of manifest `m`, loaded as stage 1 ran it (4-bit on the
    CPU path the cache was written on, plain where this CPU lacks it, said): (model, the
    quantization as loaded). `teacher` names it where the manifest's name does not reach it."""
    from .teacher import load_teacher
    name = teacher or m.raw["teacher"]["name"]
    check_teacher(name, m)
    quant = {k: v for k, v in m.raw["teacher"]["quantization"].items() if k not in ("cpu_plain_modules",)}
    written_on = quant.pop("cpu_kernel", None)
    kernel = cpu_4bit_kernel or written_on or "auto"
    if device.type == "cpu" and quant["method"] == "bitsandbytes" and cpu_4bit_kernel is None \
            and kernel == "packed" and not has_packed_kernel():
        kernel = "plain"
        echo("the cache was written on bitsandbytes' packed 4-bit CPU path, which this CPU (no AVX512-BF16) "
             "lacks: the teacher runs on the plain path (the same weights; bf16 rounding differs)")
    model = load_teacher(name, quant, device, m.raw["teacher"].get("revision"),
                         cpu_4bit_kernel=kernel if device.type == "cpu" else "auto")
    return model, quant


def slot_answers(a: SlotAnswersArgs, echo=print) -> dict:
    """{"forms": {form: {"exact", "tokens", "nll", "slots"}}} over the samples read, beside
    "samples", "skipped" (sample: why), "lambda" and "cpu_kernel" (the 4-bit CPU path taken;
    None for a teacher that is not 4-bit or not on a CPU)."""
    from tqdm.auto import tqdm
    from kava_common.cache import open_cache
    from kava_common.device import resolve_device
    c = open_cache(a.cache)
    m = c.meta
    if m.raw["identity"].get("kv_quant"):
        raise KavaError(f"{a.cache}: its K/V are quantized ({m.raw['identity']['kv_quant']}); this needs the "
                        "float K/V stage 1 wrote")
    if list(m.layers) != list(range(m.num_layers)):
        raise KavaError(f"{a.cache}: holds teacher layers {list(m.layers)} of {m.num_layers}; the teacher's "
                        "answer needs the K/V of every layer")
    if "rkv" in a.select and not m.rkv_slots:
        raise KavaError(f"{a.cache}: made without --rkv-slots, so it holds no importance to choose R-KV slots by; "
                        "--select even needs none")
    lam = a.rkv_lambda if a.rkv_lambda is not None else (m.rkv_lambda if m.rkv_slots else 0.1)
    model, quant = cache_teacher(m, a.teacher, resolve_device(a.device), a.cpu_4bit_kernel, echo)
    fs = forms(a)
    sums = {f: {"exact": 0, "right": 0, "tokens": 0, "nll": 0.0, "slots": 0} for f, _, _ in fs}
    skipped, n = {}, min(a.samples, len(c))
    for i in tqdm(range(n), desc="samples", disable=not a.progress, dynamic_ncols=True):
        s = c[i]
        (r0, r1), (a0, a1) = s["token_segments"]["reasoning"], s["token_segments"]["answer"]
        if a1 <= a0:
            skipped[i] = "no answer tokens (cut by max_length)"
            continue
        if a0 <= r1:
            skipped[i] = "no token between the chain of thought and the answer"
            continue
        if not (torch.isfinite(s["k"]).all() and torch.isfinite(s["v"]).all()):
            skipped[i] = "its K/V hold NaN or Inf"
            continue
        imp = c.rkv(i)["importance"] if m.rkv_slots else None
        results = result_tokens(s["text"], s["char_offsets"], r0, r1) if "results" in a.select else None
        for f, select, slots in fs:
            past = past_kv(s["k"], s["v"], r0, r1, imp, select, slots, lam, full=f == "full", results=results)
            exact, right, nll = answer_scores(model, s["input_ids"], past, r1, a0, a1)
            t = sums[f]
            t["exact"] += exact
            t["right"] += right
            t["tokens"] += a1 - a0
            t["nll"] += nll
            t["slots"] += past[0][0].shape[2] - r0
    read = n - len(skipped)
    if read == 0:
        raise KavaError(f"{a.cache}: none of the first {n} samples has an answer to score ({skipped[0]})")
    return {"samples": read, "skipped": skipped, "lambda": lam, "cpu_kernel": quant.get("cpu_kernel"),
            "forms": {f: {"exact": t["exact"] / read, "tokens": t["right"] / t["tokens"], "nll": t["nll"] / t["tokens"],
                          "slots": t["slots"] / read} for f, t in sums.items()}}


def report(res: dict, echo=print) -> None:
    path = f"; the teacher in 4-bit on bitsandbytes' {res['cpu_kernel']} CPU path" if res["cpu_kernel"] else ""
    echo(f"{res['samples']} samples (R-KV lambda {res['lambda']}{path}); the teacher reads its answer after the question "
         "and its chain of thought's K/V in each form:")
    echo("| form | reasoning K/V per layer and head | answers right | answer tokens right | NLL per answer token |")
    echo("|---|---|---|---|---|")
    for f, r in res["forms"].items():
        echo(f"| {f} | {r['slots']:.1f} | {r['exact']:.3f} | {r['tokens']:.3f} | {r['nll']:.3f} |")
    if res["skipped"]:
        first = next(iter(res["skipped"].items()))
        echo(f"skipped {len(res['skipped'])} sample(s), e.g. sample {first[0]}: {first[1]}")


def _work(a: SlotAnswersArgs) -> int:
    report(slot_answers(a))
    return 0


main = command(SlotAnswersArgs, _work, prog="python -m stage1_extract.slot_answers",
               description="How much of the teacher's answer its chain of thought's K/V slots keep.")

if __name__ == "__main__":
    sys.exit(main())
