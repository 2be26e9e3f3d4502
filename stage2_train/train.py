"""Stage 2: train the student (and projectors) against cached teacher K/V.

Per step: a batch of samples from the caches -> teacher K/V aligned to the student's tokens
and mapped to student layers -> projected -> loss against the student's own K/V (captured with
hooks, post-RoPE) plus cross-entropy on the answer -> AdamW with separate learning rates.
Every `log_every` steps one metrics line (also in metrics.jsonl) with the held-out cosine
beside the shuffled-target cosine; checkpoints in step-NNNNNN/; final/ at the end.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from kava_common import KavaError, save_pretrained, software_versions
from kava_common.cache import open_cache
from kava_common.device import resolve_device
from kava_common.geometry import KVGeometry

from .align import parse_layer_map
from .config import TrainConfig
from .data import DistillData, check_caches, collate
from .losses import (answer_cross_entropy, answer_positions, chunked_answer_cross_entropy, kv_loss,
                     mean_cosine)
from .projector import KVProjector
from .student import StudentKV, load_student


@dataclass
class Progress:
    step: int = 0        # optimizer steps done
    epoch: int = 0
    micro: int = 0       # micro-batches of this epoch already used
    seed: int = 0


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at max_steps."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled micro-batches of one epoch; a function of (seed, epoch) alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)] or [order]


def epoch_loader(train_set, cfg: TrainConfig, prog: Progress, collate_fn):
    """Iterator over the rest of the current epoch's micro-batches (from prog.micro on),
    loaded by `num_workers` DataLoader workers that read the caches ahead of the step."""
    batches = epoch_batches(len(train_set), cfg.batch_size, cfg.seed, prog.epoch)[prog.micro:]
    return iter(torch.utils.data.DataLoader(
        train_set, batch_sampler=batches, collate_fn=collate_fn, num_workers=cfg.num_workers,
        prefetch_factor=2 if cfg.num_workers else None, persistent_workers=False))


class Distiller(torch.nn.Module):
    """Projectors (one KVProjector per teacher) and the optional learned fusion gate."""

    def __init__(self, cfg: TrainConfig, teachers: list[dict], s_geo: KVGeometry, n_student: int):
        super().__init__()
        self.cfg, self.teachers, self.s_geo = cfg, teachers, s_geo
        projs = []
        for t in teachers:
            n = len(t["distilled"])
            if cfg.direction == "teacher_to_student":
                dims = (t["heads"], t["head_dim"], s_geo.num_kv_heads, s_geo.head_dim)
            else:
                dims = (s_geo.num_kv_heads, s_geo.head_dim, t["heads"], t["head_dim"])
            projs.append(KVProjector(cfg.projector, n, *dims, shared=cfg.projector_shared))
        self.proj = torch.nn.ModuleList(projs)
        w = cfg.teacher_weights or [1.0] * len(teachers)
        self.register_buffer("fixed_w", torch.tensor(w, dtype=torch.float32))
        self.gate = torch.nn.Parameter(torch.zeros(len(teachers), n_student)) if cfg.gate == "learned" else None

    def weights(self, layer: int, present: list[int]) -> torch.Tensor:
        """Fusion weights of the teachers `present` at a student layer, summing to 1."""
        if self.gate is not None:
            return torch.softmax(self.gate[present, layer], dim=0)
        w = self.fixed_w[present]
        return w / w.sum()

    def forward(self, batch: dict, cap: StudentKV, device) -> tuple[torch.Tensor, list[dict]]:
        """K/V loss of a batch, and per (teacher, layer) the pairs compared (for metrics)."""
        cfg, pairs = self.cfg, []
        attn = batch["attention_mask"].to(device).bool()
        per_layer: dict[int, list] = {}
        for ti, (t, tb) in enumerate(zip(self.teachers, batch["teachers"])):
            k, v = tb["k"].to(device, torch.float32), tb["v"].to(device, torch.float32)  # (B, L, H, Tt, D)
            if tb["A"] is not None:
                A = tb["A"].to(device)                                               # (B, Ts, Tt)
                k = torch.einsum("bst,blhtd->blhsd", A, k)                           # (B, L, H, Ts, D)
                v = torch.einsum("bst,blhtd->blhsd", A, v)
            mask = tb["valid"].to(device) & attn                                     # (B, Ts)
            for pi, (s, row) in enumerate(t["distilled"]):
                tk = sum(w * k[:, ci] for ci, w in row)                              # (B, Ht, Ts, Dt)
                tv = sum(w * v[:, ci] for ci, w in row)
                sk, sv = cap.kv(s)                                                   # (B, Hs, Ts, Ds)
                sk, sv = sk.float(), sv.float()
                if cfg.direction == "teacher_to_student":
                    pk, pv = self.proj[ti](pi, tk, tv)
                    pair = {"teacher": ti, "layer": s, "k": (pk, sk), "v": (pv, sv), "mask": mask}
                else:
                    pk, pv = self.proj[ti](pi, sk, sv)
                    pair = {"teacher": ti, "layer": s, "k": (pk, tk), "v": (pv, tv), "mask": mask}
                pairs.append(pair)
                per_layer.setdefault(s, []).append(pair)
        lw = cfg.layer_weights
        total, norm = 0.0, 0.0
        for s, items in per_layer.items():
            w_layer = 1.0 if lw is None else float(lw[s])
            if w_layer == 0:
                continue
            tw = self.weights(s, [p["teacher"] for p in items])
            if cfg.fusion == "target" and len(items) > 1:
                mask = torch.stack([p["mask"] for p in items]).all(0)
                fk = sum(w * p["k"][0] for w, p in zip(tw, items))
                fv = sum(w * p["v"][0] for w, p in zip(tw, items))
                loss = self._kv(fk, items[0]["k"][1], fv, items[0]["v"][1], mask)
            else:
                loss = sum(w * self._kv(*p["k"], *p["v"], p["mask"]) for w, p in zip(tw, items))
            total = total + w_layer * loss
            norm += w_layer
        return total / max(norm, 1e-12), pairs

    def _kv(self, pk, tk, pv, tv, mask):
        c = self.cfg
        return (c.k_weight * kv_loss(c.loss, pk, tk, mask, c.alpha, c.beta)
                + c.v_weight * kv_loss(c.loss, pv, tv, mask, c.alpha, c.beta))


def train_step(model, cap, distiller, batch, cfg, device, autocast):
    """Forward of one micro-batch: (total loss with its graph, K/V part, CE part as floats)."""
    ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    ce_mask = batch["ce_mask"].to(device)
    pos = answer_positions(ce_mask) if cfg.ce_weight else ids.new_zeros(0)
    if cfg.ce_chunk and len(pos):   # final hidden states; the head runs chunk by chunk below
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        with cap, autocast():
            hidden = base.model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
            ce = chunked_answer_cross_entropy(base.get_output_embeddings(), hidden[:, pos], ids,
                                              ce_mask, pos, cfg.ce_chunk)
    else:
        with cap, autocast():       # logits only where the answer's cross-entropy needs them
            out = model(input_ids=ids, attention_mask=attn, use_cache=False,
                        logits_to_keep=pos if len(pos) else 1)
        ce = answer_cross_entropy(out.logits, ids, ce_mask, pos) if len(pos) \
            else out.logits.sum() * 0.0
    with autocast():
        kv, _ = distiller(batch, cap, device)
    loss = cfg.kv_weight * kv + cfg.ce_weight * ce
    return loss, float(kv.detach()) if torch.is_tensor(kv) else float(kv), float(ce.detach())


def longest_answer(teachers, max_length: int) -> int:
    """The most cross-entropy targets of any sample (reasoning and final answer, plus EOS), in
    the caches' teacher tokens; the student's tokenizer may count somewhat differently."""
    seg = np.concatenate([t["cache"].token_segments() for t in teachers])
    if not len(seg):
        return 1
    return int(min(max_length, (seg[:, 2, 1] - seg[:, 1, 0]).max() + 1))


def memory_estimate(cfg, teachers, dtype, device) -> str:
    """The estimate of memory.py for this run (all teachers' distilled layers together)."""
    from transformers import AutoConfig
    from .memory import Shape, describe, estimate
    kv_width = sum(len(t["distilled"]) * t["heads"] * t["head_dim"] for t in teachers)
    return describe(estimate(Shape.from_config(AutoConfig.from_pretrained(cfg.student)),
                             (1, 1, kv_width), cfg.batch_size, cfg.max_length,
                             answer_tokens=longest_answer(teachers, cfg.max_length),
                             precision="bf16" if dtype == torch.bfloat16 else "fp32",
                             optimizer=cfg.optimizer, lora_r=cfg.lora_r,
                             gradient_checkpointing=cfg.gradient_checkpointing,
                             cuda_context=0.5 * 1024 ** 3 if device.type == "cuda" else 0.0,
                             freeze="all" if cfg.freeze_student else
                             "embeddings" if cfg.freeze_embeddings else "none", ce_chunk=cfg.ce_chunk))


def setup(cfg: TrainConfig):
    """Open and check the caches, load the student, build the layer maps and projectors."""
    from transformers import AutoConfig
    caches = [open_cache(p) for p in cfg.caches]
    check_caches(caches, cfg.dataset, cfg.split)
    try:
        s_geo = KVGeometry.from_config(AutoConfig.from_pretrained(cfg.student))
    except OSError as e:
        raise KavaError(f"student {cfg.student!r}: no model config found (a local folder or a hub "
                        f"id reachable from here is needed): {e}") from e
    teachers = []
    for c in caches:
        m = c.manifest
        lmap = parse_layer_map(cfg.layer_map, s_geo.num_layers, m["num_layers"], m["layers"])
        used = sorted({ci for row in lmap for ci, _ in row})
        # re-open with only the layers the map uses; the map then indexes that subset
        remap = {ci: i for i, ci in enumerate(used)}
        teachers.append({"cache": open_cache(c.path, layers=[m["layers"][ci] for ci in used]),
                         "distilled": [(s, [(remap[ci], w) for ci, w in row]) for s, row in enumerate(lmap) if row],
                         "heads": m["num_kv_heads"], "head_dim": m["head_dim"],
                         "fingerprint": m["fingerprint"], "path": str(c.path)})
    if cfg.layer_weights is not None and len(cfg.layer_weights) != s_geo.num_layers:
        raise ValueError(f"layer_weights has {len(cfg.layer_weights)} entries; the student has "
                         f"{s_geo.num_layers} layers")
    return teachers, s_geo


def _precision(cfg, device):
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"
                                   and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def set_trainable(model, cfg) -> None:
    """Fix what the config keeps out of training (before the optimizer is made), and let a
    trainable embedding tied to the output head take sparse gradients (`sparse_tied_embedding`)."""
    if cfg.freeze_student:
        model.requires_grad_(False)
    if cfg.freeze_embeddings:       # a tied output head shares the weight, so it stays fixed too
        model.get_input_embeddings().requires_grad_(False)
    sparse_tied_embedding(model)


def sparse_tied_embedding(model) -> bool:
    """Make a trainable input embedding that shares its weight with the output head pass a
    sparse gradient (the rows of the batch's tokens only); returns whether it did.

    Dense, the embedding's gradient is a zero-filled vocab x hidden tensor that autograd then
    adds to the head's, out of place: for Qwen2.5-0.5B (151,936 x 896, 545 MB in fp32) that
    is 0.39 s of filling and 0.48 s of adding in a ~9 s CPU step, and two such transient
    tensors at the peak of a GPU step. Sparse, its rows are added into the head's dense
    gradient. The head is in every step's graph (the answer's cross-entropy, or a zero-weight
    term when there is none), so the parameter's gradient is dense as before: the optimizer,
    clipping and checkpoints see no difference. An untied embedding keeps dense gradients
    (a sparse one would reach the optimizer)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if (isinstance(emb, torch.nn.Embedding) and head is not None and head.weight is emb.weight
            and emb.weight.requires_grad):
        emb.sparse = True
        return True
    return False


def make_optimizer(cfg, model, distiller):
    groups = []
    s_params = [p for p in model.parameters() if p.requires_grad]
    if s_params:
        groups.append({"params": s_params, "lr": cfg.lr_student, "name": "student"})
    groups.append({"params": list(distiller.parameters()), "lr": cfg.lr_projector, "name": "projector"})
    if cfg.optimizer == "adamw8bit":
        from kava_common import import_bitsandbytes
        return import_bitsandbytes().optim.AdamW8bit(groups, weight_decay=cfg.weight_decay)
    # The fused kernel updates each tensor in one pass: on the CPU the AdamW step of a 0.5B
    # student took 0.5 s instead of 3.4 s (bench/bench_train.py --parts online).
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=fused or None)


# --- checkpoints ----------------------------------------------------------------------------

def latest_checkpoint(run: Path) -> Path | None:
    steps = sorted(p for p in run.glob("step-[0-9]*") if p.is_dir() and not p.name.endswith(".tmp"))
    return steps[-1] if steps else None


def save_checkpoint(run: Path, prog: Progress, model, tok, distiller, opt, sched, cfg, fps) -> Path:
    from safetensors.torch import save_file
    final = run / f"step-{prog.step:06d}"
    tmp = run / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_pretrained(model, tok, tmp / "student")
    save_file({k: v.contiguous() for k, v in distiller.state_dict().items()}, str(tmp / "projector.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"progress": asdict(prog), "fingerprints": fps,
                                                "config": cfg.to_dict()}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def load_checkpoint(path: Path, model, distiller, opt, sched) -> Progress:
    from safetensors.torch import load_file
    state = json.loads((path / "state.json").read_text())
    sdir = path / "student"
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, load_file(str(sdir / "adapter_model.safetensors")))
    else:
        weights = {}
        for f in sorted(sdir.glob("*.safetensors")):
            weights.update(load_file(str(f)))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise KavaError(f"{sdir}: checkpoint does not fit the student (missing {missing}, "
                            f"unexpected {unexpected})")
    distiller.load_state_dict(load_file(str(path / "projector.safetensors")))
    o = torch.load(path / "optimizer.pt", weights_only=False)
    opt.load_state_dict(o["optimizer"])
    sched.load_state_dict(o["scheduler"])
    r = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(r["torch"])
    np.random.set_state(r["numpy"])
    random.setstate(r["python"])
    if r["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(r["cuda"])
    return Progress(**state["progress"])


# --- metrics --------------------------------------------------------------------------------

class MetricsLog:
    """One JSON object per logged step in metrics.jsonl, and a line on stdout."""

    def __init__(self, path: Path, resume_step: int | None, echo):
        self.path, self.echo = path, echo
        if resume_step is not None and path.exists():     # drop lines past the checkpoint
            keep = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= resume_step]
            path.write_text("".join(l + "\n" for l in keep))
        elif resume_step is None and path.exists():
            path.unlink()

    def log_dict(self, metrics: dict, step: int) -> None:
        rec = {"step": step, **metrics}
        with open(self.path, "a", encoding="ascii") as f:
            f.write(json.dumps(rec) + "\n")
        self.echo("step {step:>6} | loss {loss:.4f} (kv {loss_kv:.4f}, ce {loss_ce:.4f}) | "
                  "held-out cos K {cos_k:.4f} V {cos_v:.4f} (shuffled {cos_k_shuffled:.4f} / "
                  "{cos_v_shuffled:.4f}) | lr {lr_student:.2e}/{lr_projector:.2e} | "
                  "grad {grad_norm:.3f} | {tokens_per_s:.0f} tok/s".format(**rec))


@torch.no_grad()
def evaluate(model, cap, distiller, loader, device, autocast) -> dict:
    """Held-out cosine of K and V (pred vs target of the loss) and the shuffled baseline."""
    was = model.training
    model.eval()
    distiller.eval()
    g = torch.Generator().manual_seed(1234)
    sums = {"cos_k": [], "cos_v": [], "cos_k_shuffled": [], "cos_v_shuffled": []}
    for batch in loader:
        with cap, autocast():
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  use_cache=False, logits_to_keep=1)
        _, pairs = distiller(batch, cap, device)
        for p in pairs:
            for key in ("k", "v"):
                pred, tgt = p[key]
                sums[f"cos_{key}"].append(mean_cosine(pred, tgt, p["mask"]))
                sums[f"cos_{key}_shuffled"].append(mean_cosine(pred, tgt, p["mask"], shuffle=g))
    model.train(was)
    distiller.train(was)
    return {k: float(np.nanmean(v)) if v else float("nan") for k, v in sums.items()}


# --- the loop -------------------------------------------------------------------------------

def main(cfg: TrainConfig, echo=print) -> Path:
    from tqdm.auto import tqdm
    if echo is print:
        echo = tqdm.write                       # log lines above the progress bar, not inside it
    run = Path(cfg.out)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    teachers, s_geo = setup(cfg)               # checks the caches before loading the student
    dtype = _precision(cfg, device)
    echo(f"{memory_estimate(cfg, teachers, dtype, device)} at batch {cfg.batch_size} x {cfg.max_length} tokens")
    model, tok = load_student(cfg.student, device, dtype, cfg.lora_r, cfg.lora_alpha,
                              cfg.gradient_checkpointing)
    set_trainable(model, cfg)
    model.train()
    distiller = Distiller(cfg, teachers, s_geo, s_geo.num_layers).to(device)
    cap = StudentKV(model, sorted({s for t in teachers for s, _ in t["distilled"]}), s_geo)

    data = DistillData([t["cache"] for t in teachers], tok, cfg.max_length, cfg.align)
    if len(data) <= cfg.eval_samples:
        raise ValueError(f"the caches share {len(data)} samples; need more than eval_samples "
                         f"({cfg.eval_samples}) so some are left to train on")
    n_train = len(data) - cfg.eval_samples
    train_set = torch.utils.data.Subset(data, range(n_train))
    eval_set = torch.utils.data.Subset(data, range(n_train, len(data)))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    collate_fn = partial(collate, pad_id=pad_id)
    eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=cfg.batch_size, collate_fn=collate_fn)

    probe = collate([data[0]], pad_id)
    worst = cap.check(model, probe["input_ids"].to(device), probe["attention_mask"].to(device))
    if worst > (1e-3 if dtype == torch.float32 else 5e-2):
        raise KavaError(f"student {cfg.student!r}: K/V captured by hooks differ from the model's "
                        f"cache by {worst:.2e}; this architecture's attention is not supported")

    opt = make_optimizer(cfg, model, distiller)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
    fps = [t["fingerprint"] for t in teachers]

    prog = Progress(seed=cfg.seed)
    resume_from = None
    if cfg.resume:
        resume_from = latest_checkpoint(run) if cfg.resume == "auto" else Path(cfg.resume)
        if cfg.resume != "auto" and not (resume_from / "state.json").is_file():
            raise KavaError(f"--resume {cfg.resume}: no checkpoint there (expected state.json)")
    if resume_from is not None:
        saved = json.loads((resume_from / "state.json").read_text())
        if saved["fingerprints"] != fps:
            raise KavaError(f"{resume_from} was trained on caches {saved['fingerprints']}, this run "
                            f"uses {fps}")
        prog = load_checkpoint(resume_from, model, distiller, opt, sched)
        echo(f"resumed from {resume_from} at step {prog.step}")
    run.mkdir(parents=True, exist_ok=True)
    import yaml
    (run / "config.yaml").write_text(yaml.safe_dump(dict(cfg.to_dict(), cache_fingerprints=fps, software=software_versions()), sort_keys=False))
    log = MetricsLog(run / "metrics.jsonl", prog.step if resume_from else None, echo)

    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == torch.bfloat16 \
        else (lambda: torch.autocast(device.type, enabled=False))
    stop = {"signal": None}
    old = {s: signal.signal(s, lambda num, frame: stop.update(signal=num))
           for s in (signal.SIGINT, signal.SIGTERM)}
    params = [p for g in opt.param_groups for p in g["params"]]
    bar = tqdm(total=cfg.max_steps, initial=prog.step, desc="stage2", disable=not cfg.progress,
               dynamic_ncols=True, ascii=True)
    t_last, tokens = time.perf_counter(), 0
    try:
        it = epoch_loader(train_set, cfg, prog, collate_fn)
        while prog.step < cfg.max_steps and stop["signal"] is None:
            parts = {"loss": 0.0, "loss_kv": 0.0, "loss_ce": 0.0}
            for _ in range(cfg.grad_accum):
                batch = next(it, None)
                if batch is None:                       # epoch done: the next one's order
                    prog.epoch, prog.micro = prog.epoch + 1, 0
                    it = epoch_loader(train_set, cfg, prog, collate_fn)
                    batch = next(it)
                prog.micro += 1
                loss, kv, ce = train_step(model, cap, distiller, batch, cfg, device, autocast)
                (loss / cfg.grad_accum).backward()
                parts["loss"] += loss.item() / cfg.grad_accum
                parts["loss_kv"] += float(kv) / cfg.grad_accum
                parts["loss_ce"] += float(ce) / cfg.grad_accum
                tokens += int(batch["attention_mask"].sum())
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            prog.step += 1
            bar.update(1)
            if prog.step % cfg.log_every == 0 or prog.step == cfg.max_steps:
                metrics = dict(parts, **evaluate(model, cap, distiller, eval_loader, device, autocast),
                               lr_student=opt.param_groups[0]["lr"] if len(opt.param_groups) > 1 else 0.0,
                               lr_projector=opt.param_groups[-1]["lr"], grad_norm=float(gn),
                               tokens_per_s=tokens / max(time.perf_counter() - t_last, 1e-9),
                               epoch=prog.epoch, **gpu_memory(device))
                log.log_dict(metrics, prog.step)
                bar.set_postfix_str(f"loss {parts['loss']:.3f} cosK {metrics['cos_k']:.3f} cosV {metrics['cos_v']:.3f}")
                t_last, tokens = time.perf_counter(), 0
            if cfg.save_every and prog.step % cfg.save_every == 0 and prog.step < cfg.max_steps:
                save_checkpoint(run, prog, model, tok, distiller, opt, sched, cfg, fps)
        if stop["signal"] is not None:
            path = save_checkpoint(run, prog, model, tok, distiller, opt, sched, cfg, fps)
            echo(f"stopped by signal {stop['signal']} at step {prog.step}; checkpoint {path}; "
                 f"resume with --resume auto")
            return run
    finally:
        bar.close()
        for s, h in old.items():
            signal.signal(s, h)
    save_checkpoint(run, prog, model, tok, distiller, opt, sched, cfg, fps)
    save_final(run, model, tok, distiller, teachers, s_geo, cfg)
    if device.type == "cuda":
        m = gpu_memory(device)
        echo(f"peak GPU memory: {m['gpu_peak_gb']:.2f} GB allocated by tensors, "
             f"{m['gpu_reserved_gb']:.2f} GB reserved by torch's caching allocator (the estimate "
             f"printed at the start also counts about 0.5 GB of CUDA context)")
    echo(f"done: {prog.step} steps; student {run / 'final' / 'student'}; metrics {run / 'metrics.jsonl'}")
    return run


def gpu_memory(device) -> dict:
    """Peak GPU memory so far (GB), for the metrics of a CUDA run; empty elsewhere."""
    if device.type != "cuda":
        return {}
    return {"gpu_peak_gb": torch.cuda.max_memory_allocated(device) / 1024 ** 3,
            "gpu_reserved_gb": torch.cuda.max_memory_reserved(device) / 1024 ** 3}


def save_final(run: Path, model, tok, distiller, teachers, s_geo, cfg) -> None:
    from safetensors.torch import save_file
    final = run / "final"
    tmp = run / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    student = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    save_pretrained(student, tok, tmp / "student")
    save_file({k: v.contiguous() for k, v in distiller.state_dict().items()}, str(tmp / "projector.safetensors"))
    (tmp / "projector.json").write_text(json.dumps({
        "kind": cfg.projector, "shared": cfg.projector_shared, "direction": cfg.direction,
        "fusion": cfg.fusion, "gate": cfg.gate,
        "student": {"num_kv_heads": s_geo.num_kv_heads, "head_dim": s_geo.head_dim},
        "teachers": [{"cache": t["path"], "fingerprint": t["fingerprint"], "num_kv_heads": t["heads"],
                      "head_dim": t["head_dim"], "layers": t["cache"].layers,
                      "distilled": t["distilled"]} for t in teachers]}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
