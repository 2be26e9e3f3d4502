"""The distiller: projectors and fusion over the teachers' K/V, the loss of one micro-batch,
and the held-out cosines beside their shuffled baseline."""

from __future__ import annotations

import numpy as np
import torch

from kava_common.cache.quant import dequantize_batch
from kava_common.geometry import KVGeometry

from .config import TrainConfig
from .losses import (answer_cross_entropy, answer_positions, chunked_answer_cross_entropy, kv_loss,
                     mean_cosine, relation_loss, topk_kd_loss)
from .projector import BottleneckKV, KVProjector
from .student import StudentKV


class Distiller(torch.nn.Module):
    """Projectors (one KVProjector per teacher) and the optional learned fusion gate."""

    def __init__(self, cfg: TrainConfig, teachers: list[dict], s_geo: KVGeometry, n_student: int):
        super().__init__()
        self.cfg, self.teachers, self.s_geo = cfg, teachers, s_geo
        projs = []
        for t in teachers:
            n = len(t["distilled"])
            if cfg.projector == "bottleneck":
                theirs = (len(t["cache"].layers), t["heads"], t["head_dim"])
                ours = (n, s_geo.num_kv_heads, s_geo.head_dim)
                dims = (theirs, ours) if cfg.direction == "teacher_to_student" else (ours, theirs)
                projs.append(BottleneckKV(*dims, cfg.bottleneck_hidden, cfg.bottleneck_dropout, cfg.projector_shared))
                continue
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
        attn = batch["attention_mask"].to(device).bool() & batch["kv_mask"].to(device)
        per_layer: dict[int, list] = {}
        for ti, (t, tb) in enumerate(zip(self.teachers, batch["teachers"])):
            if "kq" in tb:       # codes and groups moved, dequantized here (kv_dequant device)
                k, v = dequantize_batch({n: x.to(device) for n, x in tb["kq"].items()}, t["kv_quant"])
            else:
                k, v = tb["k"].to(device, torch.float32), tb["v"].to(device, torch.float32)  # (B, L, H, Tt, D)
            if tb["A"] is not None:
                A = tb["A"].to(device)                                               # (B, Ts, Tt)
                k = torch.einsum("bst,blhtd->blhsd", A, k)                           # (B, L, H, Ts, D)
                v = torch.einsum("bst,blhtd->blhsd", A, v)
            mask = tb["valid"].to(device) & attn                                     # (B, Ts)
            make = self._bottleneck_pairs if cfg.projector == "bottleneck" else self._layer_pairs
            for pair in make(ti, t, k, v, cap, mask):
                pairs.append(pair)
                per_layer.setdefault(pair["layer"], []).append(pair)
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
                loss = sum(w * (self._kv(*p["k"], *p["v"], p["mask"]) + self._relation(p))
                           for w, p in zip(tw, items))
            total = total + w_layer * loss
            norm += w_layer
        return total / max(norm, 1e-12), pairs

    def _layer_pairs(self, ti: int, t: dict, k, v, cap, mask):
        """Per distilled student layer s: its K/V against the teacher's mapped layers, one
        side projected."""
        for pi, (s, row) in enumerate(t["distilled"]):
            tk = sum(w * k[:, ci] for ci, w in row)                                  # (B, Ht, Ts, Dt)
            tv = sum(w * v[:, ci] for ci, w in row)
            sk, sv = cap.kv(s)                                                       # (B, Hs, Ts, Ds)
            sk, sv = sk.float(), sv.float()
            if self.cfg.direction == "teacher_to_student":
                pk, pv = self.proj[ti](pi, tk, tv)
                pair = {"teacher": ti, "layer": s, "k": (pk, sk), "v": (pv, sv), "mask": mask}
            else:
                pk, pv = self.proj[ti](pi, sk, sv)
                pair = {"teacher": ti, "layer": s, "k": (pk, tk), "v": (pv, tv), "mask": mask}
            pair["raw"] = (tk, tv, sk, sv)      # unprojected, for the relation loss
            yield pair

    def _bottleneck_pairs(self, ti: int, t: dict, k, v, cap, mask):
        """All layers through one bottleneck: per student layer (teacher_to_student) or per
        teacher layer (student_to_teacher, `layer` then numbers the teacher's stored layers)."""
        kvs = [cap.kv(s) for s, _ in t["distilled"]]
        sk = torch.stack([a.float() for a, _ in kvs], 1)                             # (B, Ls, Hs, Ts, Ds)
        sv = torch.stack([b.float() for _, b in kvs], 1)
        if self.cfg.direction == "teacher_to_student":
            pk, pv = self.proj[ti](k, v)                                             # (B, Ls, Hs, Ts, Ds)
            for i, (s, _) in enumerate(t["distilled"]):
                yield {"teacher": ti, "layer": s, "k": (pk[:, i], sk[:, i]), "v": (pv[:, i], sv[:, i]), "mask": mask}
        else:
            pk, pv = self.proj[ti](sk, sv)                                           # (B, Lt, Ht, Ts, Dt)
            for c in range(k.shape[1]):
                yield {"teacher": ti, "layer": c, "k": (pk[:, c], k[:, c]), "v": (pv[:, c], v[:, c]), "mask": mask}

    def _kv(self, pk, tk, pv, tv, mask):
        c = self.cfg
        if c.loss == "relation":          # compares the K/V themselves: see _relation
            return 0.0
        return (c.k_weight * kv_loss(c.loss, pk, tk, mask, c.alpha, c.beta)
                + c.v_weight * kv_loss(c.loss, pv, tv, mask, c.alpha, c.beta))

    def relation_heads(self, ti: int) -> int:
        """Relation heads of teacher `ti`'s pairs: the setting, or the smaller KV head count."""
        return self.cfg.relation_heads or min(self.teachers[ti]["heads"], self.s_geo.num_kv_heads)

    def _relation(self, pair: dict):
        """The relation loss of a pair (teacher and student K/V, no projector): all of the K/V
        loss with `loss relation`, `relation_weight` times it beside another loss."""
        c = self.cfg
        w = 1.0 if c.loss == "relation" else c.relation_weight
        if not w:
            return 0.0
        tk, tv, sk, sv = pair["raw"]
        r = self.relation_heads(pair["teacher"])
        return w * (c.k_weight * relation_loss(tk, sk, pair["mask"], r)
                    + c.v_weight * relation_loss(tv, sv, pair["mask"], r))


def logit_kd(logits, batch, pos, kd_mask, distiller, cfg, device):
    """KL from each teacher's cached top-K next-token distribution to the student's, at the
    positions `pos` (where `logits` (B, P, V) were computed) whose next token is marked in
    `kd_mask` (B, T), averaged over teachers with their fixed weights."""
    target = kd_mask[:, pos + 1]                                                   # (B, P)
    total = 0.0
    w = distiller.fixed_w / distiller.fixed_w.sum()
    for wi, tb in zip(w, batch["teachers"]):
        mask = target & tb["valid"].to(device)[:, pos]
        total = total + wi * topk_kd_loss(logits, tb["topk_ids"].to(device)[:, pos],
                                          tb["topk_logprobs"].to(device)[:, pos], mask, cfg.kd_temperature)
    return total


def train_step(model, cap, distiller, batch, cfg, device, autocast):
    """Forward of one micro-batch: (total loss with its graph, then its K/V, cross-entropy and
    logit-distillation parts as floats)."""
    ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    ce_mask = batch["ce_mask"].to(device) if cfg.ce_tokens == "answer" else attn.bool()
    kd_mask = batch["ce_mask"].to(device) if cfg.kd_tokens == "answer" else attn.bool()
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
        kd = logit_kd(out.logits, batch, pos, kd_mask, distiller, cfg, device) if cfg.kd_weight and len(pos) else 0.0
    kv = 0.0                        # kv_weight 0 (a baseline): not computed, logged as 0
    if cfg.kv_weight:
        with autocast():
            kv, _ = distiller(batch, cap, device)
    loss = cfg.kv_weight * kv + cfg.ce_weight * ce + cfg.kd_weight * kd
    return loss, _float(kv), float(ce.detach()), _float(kd)


def _float(x) -> float:
    return float(x.detach()) if torch.is_tensor(x) else float(x)


@torch.no_grad()
def evaluate(model, cap, distiller, loader, device, autocast) -> dict:
    """Held-out cosine of K and V (pred vs target of the loss) and the shuffled baseline."""
    was = model.training
    model.eval()
    distiller.eval()
    g = torch.Generator().manual_seed(1234)
    sums = {"cos_k": [], "cos_v": [], "cos_k_shuffled": [], "cos_v_shuffled": []}
    for batch in loader:
        if batch.get("empty"):                  # every sample left out (non-finite teacher K/V)
            continue
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
    return {k: _nanmean(v) for k, v in sums.items()}


def _nanmean(values: list[float]) -> float:
    """The mean of the finite values (NaN when there are none, without numpy's warning)."""
    finite = [x for x in values if np.isfinite(x)]
    return float(np.mean(finite)) if finite else float("nan")


