"""The distiller: projectors and fusion over the teachers' K/V, the loss of one micro-batch,
and the held-out cosines beside their shuffled baseline."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from kava_common import KavaError
from kava_common.cache.quant import dequantize_batch
from kava_common.geometry import KVGeometry

from .config import TrainConfig
from .losses import (answer_cross_entropy, answer_positions, chunk_kd_loss, chunked_answer_cross_entropy,
                     kv_loss, mean_cosine, relation_loss, topk_kd_loss, uld_loss)
from .projector import BottleneckKV, KVProjector
from .student import StudentKV


class Pair(NamedTuple):
    """What one teacher and one layer compare in a micro-batch: (projected, target) K and V,
    (B, H, Ts, D) each, on the positions `mask` (B, Ts) keeps; `raw` (teacher K, teacher V,
    student K, student V) unprojected, for the relation loss."""
    teacher: int
    layer: int             # the student's layer (the teacher's stored layer for a bottleneck into its space)
    k: tuple
    v: tuple
    mask: torch.Tensor
    raw: tuple | None = None


def teacher_kv(tb: dict, quant, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher batch's K and V as float32 (B, L, H, Tt, D) on `device`, whether the loader gave
    them dense (`k`, `v`) or packed (`kq`: int8/int4 codes and groups, dequantized here on the
    device: --kv-dequant device)."""
    if "kq" in tb:
        return dequantize_batch({n: x.to(device) for n, x in tb["kq"].items()}, quant)
    return tb["k"].to(device, torch.float32), tb["v"].to(device, torch.float32)


class Distiller(torch.nn.Module):
    """Projectors (one KVProjector per teacher) and the optional learned fusion gate."""

    def __init__(self, cfg: TrainConfig, teachers: list, s_geo: KVGeometry, n_student: int):
        super().__init__()
        self.cfg, self.teachers, self.s_geo = cfg, teachers, s_geo
        projs = []
        for t in teachers:
            n = len(t.distilled)
            if cfg.projector == "bottleneck":
                theirs = (len(t.cache.layers), t.heads, t.head_dim)
                ours = (n, s_geo.num_kv_heads, s_geo.head_dim)
                dims = (theirs, ours) if cfg.direction == "teacher_to_student" else (ours, theirs)
                projs.append(BottleneckKV(*dims, cfg.bottleneck_hidden, cfg.bottleneck_dropout, cfg.projector_shared))
                continue
            if cfg.direction == "teacher_to_student":
                dims = (t.heads, t.head_dim, s_geo.num_kv_heads, s_geo.head_dim)
            else:
                dims = (s_geo.num_kv_heads, s_geo.head_dim, t.heads, t.head_dim)
            try:
                projs.append(KVProjector(cfg.projector, n, *dims, shared=cfg.projector_shared))
            except ValueError as e:              # identity across geometries: name the cache
                raise KavaError(f"{t.cache.path}: {e}") from None
        self.proj = torch.nn.ModuleList(projs)
        w = cfg.teacher_weights or [1.0] * len(teachers)
        self.register_buffer("fixed_w", torch.tensor(w, dtype=torch.float32))
        self.gate = torch.nn.Parameter(torch.zeros(len(teachers), n_student)) if cfg.gate == "learned" else None

    def weights(self, layer: int, present: list[int], sample_w: torch.Tensor | None = None) -> torch.Tensor:
        """Fusion weights of the teachers `present` at a student layer, summing to 1: one per
        teacher, or with `sample_w` (teachers, B) one per teacher and sample."""
        if sample_w is not None:
            w = sample_w[present]
            return w / w.sum(0, keepdim=True)
        if self.gate is not None:
            return torch.softmax(self.gate[present, layer], dim=0)
        w = self.fixed_w[present]
        return w / w.sum()

    def sample_weights(self, batch: dict, device) -> torch.Tensor | None:
        """teacher_weighting confidence: (teachers, B) weights summing to 1 over the teachers,
        a softmax of each teacher's mean log-probability of the sample's answer over the
        confidence temperature, with the fixed weights as a prior (log-added); None with fixed
        weights."""
        if self.cfg.teacher_weighting != "confidence":
            return None
        lp = torch.stack([tb["answer_lp"] for tb in batch["teachers"]]).to(device)          # (n, B)
        prior = torch.log(self.fixed_w / self.fixed_w.sum())[:, None]
        return torch.softmax(prior + lp / self.cfg.confidence_temperature, dim=0)

    def mean_weights(self, sample_w: torch.Tensor | None) -> list[float]:
        """The weight of each teacher, summing to 1, as logged: the mean over the samples of the
        confidence weights, the learned gate's mean over the distilled student layers, or the
        fixed weights."""
        if sample_w is not None:
            w = sample_w.mean(1)
        elif self.gate is not None:
            layers = sorted({s for t in self.teachers for s, _ in t.distilled})
            w = torch.softmax(self.gate[:, layers], dim=0).mean(1)
        else:
            w = self.fixed_w / self.fixed_w.sum()
        return [float(x) for x in w.detach()]

    def forward(self, batch: dict, cap: StudentKV, device,
                sample_w: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Pair]]:
        """K/V loss of a batch, and per (teacher, layer) the pairs compared (for metrics).
        `sample_w` (teachers, B): per-sample teacher weights (`sample_weights`)."""
        cfg, pairs = self.cfg, []
        attn = batch["attention_mask"].to(device).bool() & batch["kv_mask"].to(device)
        per_layer: dict[int, list] = {}
        for ti, (t, tb) in enumerate(zip(self.teachers, batch["teachers"])):
            k, v = teacher_kv(tb, t.kv_quant, device)                              # (B, L, H, Tt, D)
            if tb["A"] is not None:
                A = tb["A"].to(device)                                               # (B, Ts, Tt)
                k = torch.einsum("bst,blhtd->blhsd", A, k)                           # (B, L, H, Ts, D)
                v = torch.einsum("bst,blhtd->blhsd", A, v)
            mask = tb["valid"].to(device) & attn                                     # (B, Ts)
            make = self._bottleneck_pairs if cfg.projector == "bottleneck" else self._layer_pairs
            for pair in make(ti, t, k, v, cap, mask):
                pairs.append(pair)
                per_layer.setdefault(pair.layer, []).append(pair)
        lw = cfg.layer_weights
        total, norm = 0.0, 0.0
        for s, items in per_layer.items():
            w_layer = 1.0 if lw is None else float(lw[s])
            if w_layer == 0:
                continue
            tw = self.weights(s, [p.teacher for p in items], sample_w)
            if cfg.fusion == "target" and len(items) > 1:
                mask = torch.stack([p.mask for p in items]).all(0)
                fk = sum(w * p.k[0] for w, p in zip(tw, items))
                fv = sum(w * p.v[0] for w, p in zip(tw, items))
                loss = self._kv(fk, items[0].k[1], fv, items[0].v[1], mask)
            elif sample_w is not None:          # per-sample weights, inside each loss's mean
                loss = sum(self._kv(*p.k, *p.v, p.mask, w) + self._relation(p, w) for w, p in zip(tw, items))
            else:
                loss = sum(w * (self._kv(*p.k, *p.v, p.mask) + self._relation(p))
                           for w, p in zip(tw, items))
            total = total + w_layer * loss
            norm += w_layer
        return total / max(norm, 1e-12), pairs

    def _layer_pairs(self, ti: int, t: dict, k, v, cap, mask):
        """Per distilled student layer s: its K/V against the teacher's mapped layers, one
        side projected."""
        for pi, (s, row) in enumerate(t.distilled):
            tk = sum(w * k[:, ci] for ci, w in row)                                  # (B, Ht, Ts, Dt)
            tv = sum(w * v[:, ci] for ci, w in row)
            sk, sv = cap.kv(s)                                                       # (B, Hs, Ts, Ds)
            sk, sv = sk.float(), sv.float()
            if self.cfg.direction == "teacher_to_student":
                pk, pv = self.proj[ti](pi, tk, tv)
                yield Pair(ti, s, (pk, sk), (pv, sv), mask, (tk, tv, sk, sv))
            else:
                pk, pv = self.proj[ti](pi, sk, sv)
                yield Pair(ti, s, (pk, tk), (pv, tv), mask, (tk, tv, sk, sv))

    def _bottleneck_pairs(self, ti: int, t: dict, k, v, cap, mask):
        """All layers through one bottleneck: per student layer (teacher_to_student) or per
        teacher layer (student_to_teacher, `layer` then numbers the teacher's stored layers)."""
        kvs = [cap.kv(s) for s, _ in t.distilled]
        sk = torch.stack([a.float() for a, _ in kvs], 1)                             # (B, Ls, Hs, Ts, Ds)
        sv = torch.stack([b.float() for _, b in kvs], 1)
        if self.cfg.direction == "teacher_to_student":
            pk, pv = self.proj[ti](k, v)                                             # (B, Ls, Hs, Ts, Ds)
            for i, (s, _) in enumerate(t.distilled):
                yield Pair(ti, s, (pk[:, i], sk[:, i]), (pv[:, i], sv[:, i]), mask)
        else:
            pk, pv = self.proj[ti](sk, sv)                                           # (B, Lt, Ht, Ts, Dt)
            for c in range(k.shape[1]):
                yield Pair(ti, c, (pk[:, c], k[:, c]), (pv[:, c], v[:, c]), mask)

    def _kv(self, pk, tk, pv, tv, mask, weight=None):
        c = self.cfg
        if c.loss == "relation":          # compares the K/V themselves: see _relation
            return 0.0
        return (c.k_weight * kv_loss(c.loss, pk, tk, mask, c.alpha, c.beta, weight)
                + c.v_weight * kv_loss(c.loss, pv, tv, mask, c.alpha, c.beta, weight))

    def relation_heads(self, ti: int) -> int:
        """Relation heads of teacher `ti`'s pairs: the setting, or the smaller KV head count."""
        return self.cfg.relation_heads or min(self.teachers[ti].heads, self.s_geo.num_kv_heads)

    def _relation(self, pair: Pair, weight=None):
        """The relation loss of a pair (teacher and student K/V, no projector): all of the K/V
        loss with `loss relation`, `relation_weight` times it beside another loss."""
        c = self.cfg
        w = 1.0 if c.loss == "relation" else c.relation_weight
        if not w:
            return 0.0
        tk, tv, sk, sv = pair.raw
        r = self.relation_heads(pair.teacher)
        return w * (c.k_weight * relation_loss(tk, sk, pair.mask, r, weight)
                    + c.v_weight * relation_loss(tv, sv, pair.mask, r, weight))


def logit_kd(logits, batch, pos, kd_mask, distiller, cfg, device, sample_w=None):
    """Logit distillation at the positions `pos` (where `logits` (B, P, V) were computed) by
    `cfg.kd_method`, summed over the teachers with their fixed weights, or with `sample_w`
    (teachers, B) per sample. topk, uld: at the positions whose next token is marked in
    `kd_mask` (B, T) and where the teacher has a distribution (`kd_valid`); chunk: over the
    chunks the batch marks (stage2_train.data)."""
    total = 0.0
    w = distiller.fixed_w / distiller.fixed_w.sum()
    for ti, tb in enumerate(batch["teachers"]):
        sw = None if sample_w is None else sample_w[ti]
        if cfg.kd_method == "chunk":
            loss = chunk_logit_kd(logits, batch["input_ids"].to(device), pos, tb, cfg, device, sw)
        else:
            mask = kd_mask[:, pos + 1] & tb["kd_valid"].to(device)[:, pos]                 # (B, P)
            lps = tb["topk_logprobs"].to(device)[:, pos]
            if cfg.kd_method == "uld":
                loss = uld_loss(logits, lps, mask, cfg.kd_temperature, sw)
            else:
                loss = topk_kd_loss(logits, tb["topk_ids"].to(device)[:, pos], lps, mask, cfg.kd_temperature,
                                    tb["topk_keep"].to(device)[:, pos], sw)
        total = total + (loss if sw is not None else w[ti] * loss)
    return total


def chunk_logit_kd(logits, ids, pos, tb, cfg, device, weight=None):
    """--kd-method chunk for one teacher: the student's log-likelihood of each chunk (the sum
    of its log-probabilities of the chunk's tokens, each at the position before it) against
    the teacher's cached one."""
    b, p, _ = logits.shape
    chunk = tb["chunk_of"].to(device)[:, pos + 1]                                  # (B, P): chunk of each next token
    tok_lp = -F.cross_entropy(logits.float().reshape(b * p, -1), ids[:, pos + 1].reshape(-1),
                              reduction="none").view(b, p)                         # (B, P)
    t_lp = tb["chunk_lp"].to(device)                                               # (B, C)
    s_lp = torch.zeros_like(t_lp).scatter_add(1, chunk.clamp(min=0), torch.where(chunk >= 0, tok_lp, 0.0))
    return chunk_kd_loss(s_lp, t_lp, tb["chunk_mask"].to(device), cfg.kd_chunk_divergence,
                         cfg.kd_chunk_temperature, weight)


def train_step(model, cap, distiller, batch, cfg, device, autocast):
    """Forward of one micro-batch: the total loss with its graph, and its parts as floats
    (loss_kv, loss_ce, loss_kd; with several teachers teacher_weights, one per teacher)."""
    ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    ce_mask = batch["ce_mask"].to(device) if cfg.ce_tokens == "answer" else attn.bool()
    if cfg.kd_weight and cfg.kd_method == "chunk":     # the tokens of the chunks the batch marks
        kd_mask = torch.stack([tb["chunk_of"] >= 0 for tb in batch["teachers"]]).any(0).to(device)
    else:
        kd_mask = batch["ce_mask"].to(device) if cfg.kd_tokens == "answer" else attn.bool()
    sample_w = distiller.sample_weights(batch, device)
    wanted = (ce_mask if cfg.ce_weight else torch.zeros_like(ce_mask)) | (kd_mask if cfg.kd_weight else False)
    pos = answer_positions(wanted) if cfg.ce_weight or cfg.kd_weight else ids.new_zeros(0)
    kd = 0.0                        # logit distillation needs whole logits: not with ce_chunk (config)
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
        kd = logit_kd(out.logits, batch, pos, kd_mask, distiller, cfg, device, sample_w) \
            if cfg.kd_weight and len(pos) else 0.0
    kv = 0.0                        # kv_weight 0 (a baseline): not computed, logged as 0
    if cfg.kv_weight:
        with autocast():
            kv, _ = distiller(batch, cap, device, sample_w)
    loss = cfg.kv_weight * kv + cfg.ce_weight * ce + cfg.kd_weight * kd
    parts = {"loss_kv": _float(kv), "loss_ce": float(ce.detach()), "loss_kd": _float(kd)}
    if len(distiller.teachers) > 1:
        parts["teacher_weights"] = distiller.mean_weights(sample_w)
    return loss, parts


def _float(x) -> float:
    return float(x.detach()) if torch.is_tensor(x) else float(x)


@torch.no_grad()
def evaluate(model, cap, distiller, loader, device, autocast) -> dict:
    """Held-out cosine of K and V (pred vs target of the loss) and the shuffled baseline, and
    `bad_eval_samples`: held-out samples left out for non-finite teacher K/V, as training
    leaves them out (their rows in `bad_eval_rows`)."""
    was = model.training
    model.eval()
    distiller.eval()
    g = torch.Generator().manual_seed(1234)
    sums = {"cos_k": [], "cos_v": [], "cos_k_shuffled": [], "cos_v_shuffled": []}
    bad = []
    for batch in loader:
        bad += batch["bad_rows"]
        if batch.get("empty"):                  # every sample left out (non-finite teacher K/V)
            continue
        with cap, autocast():
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  use_cache=False, logits_to_keep=1)
        _, pairs = distiller(batch, cap, device)
        for p in pairs:
            for key, (pred, tgt) in (("k", p.k), ("v", p.v)):
                sums[f"cos_{key}"].append(mean_cosine(pred, tgt, p.mask))
                sums[f"cos_{key}_shuffled"].append(mean_cosine(pred, tgt, p.mask, shuffle=g))
    model.train(was)
    distiller.train(was)
    return {**{k: _nanmean(v) for k, v in sums.items()}, "bad_eval_samples": len(bad), "bad_eval_rows": sorted(bad)}


def _nanmean(values: list[float]) -> float:
    """The mean of the finite values (NaN when there are none, without numpy's warning)."""
    finite = [x for x in values if np.isfinite(x)]
    return float(np.mean(finite)) if finite else float("nan")


