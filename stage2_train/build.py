"""What a stage-2 run is made of: teachers from the caches with their layer maps, the
student's trainable parameters, the optimizer and learning-rate schedule, the memory estimate."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from kava_common import KavaError
from kava_common.cache import KVCache, KVQuant, open_cache
from kava_common.data import load_fast_tokenizer
from kava_common.geometry import KVGeometry
from kava_common.vocab import describe as describe_vocab
from kava_common.vocab import VocabMatch, vocab_match

from .align import parse_layer_map
from .config import TrainConfig
from .data import check_caches


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at max_steps."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))



def longest_answer(teachers, max_length: int) -> int:
    """The most cross-entropy targets of any sample (reasoning and final answer, plus EOS), in
    the caches' teacher tokens; the student's tokenizer may count somewhat differently."""
    seg = np.concatenate([t.cache.token_segments() for t in teachers])
    if not len(seg):
        return 1
    return int(min(max_length, (seg[:, 2, 1] - seg[:, 1, 0]).max() + 1))


def every_token_logits(cfg) -> bool:
    """Whether the step asks for logits at every position: cross-entropy or logit distillation
    on every token."""
    return (bool(cfg.ce_weight) and cfg.ce_tokens == "all") or (bool(cfg.kd_weight) and cfg.kd_tokens == "all")


def latent_tokens(cfg, teacher):
    """memory.Latent for a latent run on `teacher`'s cache: the longest question (and bot),
    suffix (eot, answer, EOS) and written sequence (only with its cross-entropy) of any sample,
    and the most positions a batch's written cross-entropy can read (from the shortest question's
    end to the longest sequence's), in the cache's teacher tokens (the student's tokenizer may
    count somewhat differently)."""
    from .memory import Latent
    seg = teacher.cache.token_segments()
    if not len(seg):
        return Latent(1 + 1, cfg.latent, 2, 0, cfg.jacobi_iters)
    written = int(seg[:, 2, 1].max()) + 1 if cfg.latent_cot_weight else 0
    return Latent(int(seg[:, 1, 0].max()) + 1, cfg.latent, int((seg[:, 2, 1] - seg[:, 1, 1]).max()) + 2,
                  written, cfg.jacobi_iters, written - int(seg[:, 1, 0].min()) if written else None)


def memory_estimate(cfg, teachers, dtype, device, world: int = 1) -> str:
    """The estimate of memory.py for this run (all teachers' distilled layers together) on one
    of `world` ranks, and the batch and token counts it assumed."""
    from transformers import AutoConfig
    from .memory import Shape, describe, estimate
    from .projector import bottleneck_params
    s_cfg = AutoConfig.from_pretrained(cfg.student)
    student = Shape.from_config(s_cfg)
    read = [len(t.cache.layers) if cfg.projector == "bottleneck" else len(t.distilled) for t in teachers]
    kv_width = sum(n * t.heads * t.head_dim for n, t in zip(read, teachers))
    proj = 0 if cfg.projector == "identity" else None
    if cfg.projector == "bottleneck":
        s_width = student.layers * student.kv_heads * student.head_dim
        proj = sum((1 if cfg.projector_shared else 2) * bottleneck_params(
            *((n * t.heads * t.head_dim, s_width) if cfg.direction == "teacher_to_student"
              else (s_width, n * t.heads * t.head_dim)), cfg.bottleneck_hidden)
            for n, t in zip(read, teachers))
    latent = latent_tokens(cfg, teachers[0]) if cfg.latent else None
    at = f"at batch {cfg.batch_size} x {latent.seq if latent else cfg.max_length} tokens"
    if latent:
        at += (f" ({latent.question} question, {latent.steps} latent, {latent.suffix} answer; the latents' "
               f"forwards {latent.pass_tokens(cfg.gradient_checkpointing)} tokens"
               + (f", the written chain of thought {latent.written}" if latent.written else "") + ")")
    return describe(estimate(student, (1, 1, kv_width), cfg.batch_size, cfg.max_length, projector_params=proj,
                             latent=latent,
                             answer_tokens=cfg.max_length if every_token_logits(cfg) else
                             longest_answer(teachers, cfg.max_length), kd=bool(cfg.kd_weight),
                             precision="bf16" if dtype == torch.bfloat16 else "fp32",
                             optimizer=cfg.optimizer, lora_r=cfg.lora_r,
                             gradient_checkpointing=cfg.gradient_checkpointing,
                             cuda_context=0.5 * 1024 ** 3 if device.type == "cuda" else 0.0,
                             freeze="all" if cfg.freeze_student else
                             "embeddings" if cfg.freeze_embeddings else "none", ce_chunk=cfg.ce_chunk,
                             dense_tied_embedding=world > 1 and bool(getattr(s_cfg, "tie_word_embeddings", False)))) \
        + " " + at


def verify_caches(caches, echo) -> None:
    """Hash every shard of every cache against its manifest before anything trains on it."""
    t0, nbytes = time.perf_counter(), sum(c.verify() for c in caches)
    echo(f"verified {sum(len(c.meta.shards) for c in caches)} shards ({nbytes / 1e9:.2f} GB) "
         f"against their checksums in {time.perf_counter() - t0:.1f} s")


@dataclass(frozen=True)
class Teacher:
    """One teacher of a run, fixed once its cache is opened: the cache (only the layers the layer
    map uses), how its K/V reach the student (`distilled`: per student layer, the (index into
    those layers, weight) pairs it mixes), its geometry and how its vocabulary meets the student's."""
    cache: KVCache
    kv_quant: KVQuant | None        # set when the K/V come packed, to dequantize on the device
    distilled: list[tuple[int, list[tuple[int, float]]]]   # (student layer, [(cache layer, weight)])
    heads: int                      # KV heads
    head_dim: int
    fingerprint: str
    path: str
    vocab: VocabMatch


def open_teachers(cfg: TrainConfig, echo=print) -> tuple[list[Teacher], KVGeometry]:
    """Open and check the caches, load the student, build the layer maps and projectors."""
    from transformers import AutoConfig
    caches = [open_cache(p, verify=True) for p in cfg.caches]
    verify_caches(caches, echo)
    check_caches(caches, cfg.dataset, cfg.split)
    try:
        s_config = AutoConfig.from_pretrained(cfg.student)
    except OSError as e:
        raise KavaError(f"student {cfg.student!r}: no model config found (a local folder or a hub "
                        f"id reachable from here is needed): {e}") from e
    s_geo = KVGeometry.from_config(s_config)
    s_tok = load_fast_tokenizer(cfg.student, "student")
    s_rows = s_config.get_text_config().vocab_size
    teachers = []
    for c in caches:
        m = c.meta
        if cfg.projector == "bottleneck":       # every stored teacher layer into every student layer
            lmap = [[(ci, 1.0) for ci in range(len(m.layers))] for _ in range(s_geo.num_layers)]
        else:
            lmap = parse_layer_map(cfg.layer_map, s_geo.num_layers, m.num_layers, m.layers)
        used = sorted({ci for row in lmap for ci, _ in row})
        # re-open with only the layers the map uses; the map then indexes that subset
        remap = {ci: i for i, ci in enumerate(used)}
        cache = open_cache(c.path, layers=[m.layers[ci] for ci in used], verify=True,
                           packed=cfg.kv_dequant == "device")
        teachers.append(Teacher(
            cache=cache, kv_quant=cache.kv_quant if cache.packed else None,
            distilled=[(s, [(remap[ci], w) for ci, w in row]) for s, row in enumerate(lmap) if row],
            heads=m.num_kv_heads, head_dim=m.head_dim, fingerprint=m.fingerprint, path=str(c.path),
            vocab=vocab_match(c, s_tok, s_rows)))
        echo(f"{c.path}: {describe_vocab(teachers[-1].vocab)}")
    if cfg.layer_weights is not None and len(cfg.layer_weights) != s_geo.num_layers:
        raise ValueError(f"layer_weights has {len(cfg.layer_weights)} entries; the student has "
                         f"{s_geo.num_layers} layers")
    check_logit_caches(cfg, teachers)
    if cfg.loss == "relation" or cfg.relation_weight:
        for t in teachers:
            r = cfg.relation_heads or min(t.heads, s_geo.num_kv_heads)
            widths = {"teacher": t.heads * t.head_dim, "student": s_geo.num_kv_heads * s_geo.head_dim}
            bad = [f"{side} {w}" for side, w in widths.items() if w % r]
            if bad:
                raise ValueError(f"relation_heads {r}: the K/V widths per position ({', '.join(bad)} for "
                                 f"{t.path}) must divide by it")
    return teachers, s_geo


def check_logit_caches(cfg: TrainConfig, teachers: list[Teacher]) -> None:
    """What each cache must hold for the run's logit distillation (--kd-weight, --kd-method)
    and confidence weighting: top-K logits (topk, uld), the actual tokens' log-probabilities
    (chunk, confidence), and for topk a vocabulary the same as the student's or compatible
    with it (the teacher's token ids must be the student's)."""
    for t in teachers:
        m, v = t.cache.meta, t.vocab
        again = "; run stage 1 again with --logits-topk K"
        if cfg.kd_weight and cfg.kd_method in ("topk", "uld") and not m.logits_topk:
            raise ValueError(f"--kd-weight: {t.path} was made without --logits-topk{again} to distil the "
                             "teacher's logits")
        if cfg.kd_weight and cfg.kd_method == "chunk" and not m.token_logprobs:
            raise ValueError(f"--kd-method chunk: {t.path} holds no token_logprobs (made without "
                             f"--logits-topk, or by an older kava){again}")
        if cfg.kd_weight and cfg.kd_method == "topk" and not v.identity:
            raise ValueError(f"--kd-method topk: the teacher of {t.path} has another vocabulary than the "
                             f"student ({v.reason}), so its top-K ids name other tokens; use --kd-method uld "
                             "or chunk for logit distillation across vocabularies")
        if cfg.teacher_weighting == "confidence" and not m.token_logprobs:
            raise ValueError(f"--teacher-weighting confidence: {t.path} holds no token_logprobs (made "
                             f"without --logits-topk, or by an older kava){again}")


def precision_dtype(cfg, device) -> torch.dtype:
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"
                                   and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def set_trainable(model, cfg, sparse_tied: bool = True) -> None:
    """Fix what the config keeps out of training (before the optimizer is made), and let a
    trainable embedding tied to the output head take sparse gradients (`sparse_tied_embedding`)
    unless `sparse_tied` is False."""
    if cfg.freeze_student:
        model.requires_grad_(False)
    if cfg.freeze_embeddings:       # a tied output head shares the weight, so it stays fixed too
        model.get_input_embeddings().requires_grad_(False)
    if sparse_tied:
        sparse_tied_embedding(model)


def sparse_tied_embedding(model) -> bool:
    """Make a trainable input embedding that shares its weight with the output head pass a
    sparse gradient (the rows of the batch's tokens only); returns whether it did.

    Dense, the embedding's gradient is a zero-filled vocab x hidden tensor that autograd then
    adds to the head's, out of place: for Qwen2.5-0.5B (151,936 x 896, 545 MB in fp32) a tenth
    of a CPU step goes to filling and adding it (docs/benchmarks.md), and two such transient
    tensors sit at the peak of a GPU step. Sparse, its rows are added into the head's dense
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
    # The fused kernel updates each tensor in one pass, several times faster than the
    # per-tensor loop on a CPU (docs/benchmarks.md).
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=fused or None)


def apply_optimizer_settings(opt, sched, cfg: TrainConfig) -> None:
    """After a checkpoint's optimizer and scheduler state are loaded, this run's learning rates
    and weight decay apply (the state holds the checkpoint's)."""
    base = {"student": cfg.lr_student, "projector": cfg.lr_projector}
    sched.base_lrs = [base[g["name"]] for g in opt.param_groups]
    factor = lr_factor(sched.last_epoch, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    for g, lr in zip(opt.param_groups, sched.base_lrs):
        g["lr"], g["weight_decay"] = lr * factor, cfg.weight_decay
