"""K/V distillation losses: stateless, masked, computed in float32.

Every loss compares a prediction and a target shaped (B, H, T, D) over the positions where
`mask` (B, T) is true, treating each head's D-vector at each position as one item, and returns
a scalar; 0 (with a gradient path) when every position is masked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-8


def _items(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) and (B, T) -> (N, H, D) float32 of the unmasked positions (metrics)."""
    return x.transpose(1, 2)[mask.bool()].float()


def _masked_mean(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-item values v (B, H, T) over heads and the positions where mask (B, T) is
    true; 0 with a gradient path when none is.

    Masked items are replaced by exact zeros (not multiplied, so junk there cannot turn into
    NaN) rather than gathered out: boolean indexing has a data-dependent shape, and on a GPU
    every such call waits for the device, several times per distilled layer and step.
    """
    keep = mask.bool()[:, None, :].expand_as(v)
    n = keep.sum().clamp(min=1)
    return torch.where(keep, v, v.new_zeros(())).sum() / n


def cosine_loss(pred, target, mask):
    """mean(1 - cos(pred, target)) over heads and unmasked positions."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=EPS)
    return _masked_mean(1 - cos, mask)


def mercator_loss(pred, target, mask, alpha: float = 1.0, beta: float = 0.01):
    """alpha * (1 - cos) + beta * (log|pred| - log|target|)^2: direction and scale separately."""
    p, t = pred.float(), target.float()
    cos = F.cosine_similarity(p, t, dim=-1, eps=EPS)
    lognorm = (torch.log(p.norm(dim=-1) + EPS) - torch.log(t.norm(dim=-1) + EPS)) ** 2
    return _masked_mean(alpha * (1 - cos) + beta * lognorm, mask)


def mse_loss(pred, target, mask):
    """Mean squared error over every element of the unmasked positions."""
    return _masked_mean(((pred.float() - target.float()) ** 2).mean(-1), mask)


def l1_loss(pred, target, mask):
    return _masked_mean((pred.float() - target.float()).abs().mean(-1), mask)


def _relation_logp(x: torch.Tensor, heads: int, allowed: torch.Tensor) -> torch.Tensor:
    """log softmax(X X^T / sqrt(d)) per relation head: x (B, H, T, D) with its heads
    concatenated per position (B, T, H*D) and split into `heads` relation heads of width
    d = H*D / heads; `allowed` (B, 1, T, T) the keys each query may see. -> (B, heads, T, T),
    0 where not allowed."""
    b, h, t, d = x.shape
    if (h * d) % heads:
        raise ValueError(f"{h} heads x head_dim {d} = {h * d} values per position do not split into "
                         f"{heads} relation heads")
    x = x.float().transpose(1, 2).reshape(b, t, heads, h * d // heads).transpose(1, 2)   # (B, R, T, dr)
    scores = x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1])                           # (B, R, T, T)
    logp = torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return logp.masked_fill(~allowed, 0.0)


def relation_loss(teacher, student, mask, heads: int = 1):
    """MiniLMv2-style self-relation distillation of one layer's K (or V), with no projector.

    teacher (B, Ht, T, Dt) and student (B, Hs, T, Ds) on the same positions (aligned), mask
    (B, T). On each side the heads' vectors are concatenated per position and split into the
    same number of relation heads (any head count and head_dim, as long as both widths divide
    by `heads`); relations are softmax(X X^T / sqrt(d)) over the causal, unmasked keys; the
    loss is KL(teacher || student) summed over keys, averaged over unmasked queries and
    relation heads, in float32. 0 when every position is masked. The teacher side carries no
    gradient."""
    m = mask.bool()
    t = m.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=m.device).tril()
    # every query keeps itself as a key, so that no row is empty (masked rows do not count)
    allowed = (causal & (m[:, None, :] | torch.eye(t, dtype=torch.bool, device=m.device)))[:, None]  # (B,1,T,T)
    with torch.no_grad():
        lt = _relation_logp(teacher.detach(), heads, allowed)
    ls = _relation_logp(student, heads, allowed)
    kl = (lt.exp().masked_fill(~allowed, 0.0) * (lt - ls)).sum(-1)                     # (B, R, T)
    rows = m[:, None, :].expand_as(kl)
    return torch.where(rows, kl, kl.new_zeros(())).sum() / (rows.sum().clamp(min=1))


LOSSES = {"mercator": mercator_loss, "cosine": cosine_loss, "mse": mse_loss, "l1": l1_loss,
          "relation": relation_loss}


def kv_loss(name: str, pred, target, mask, alpha: float = 1.0, beta: float = 0.01):
    """One of the projected losses (`relation` compares unprojected K/V: see Distiller)."""
    if name == "mercator":
        return mercator_loss(pred, target, mask, alpha, beta)
    return LOSSES[name](pred, target, mask)


@torch.no_grad()
def mean_cosine(pred, target, mask, shuffle: torch.Generator | None = None) -> float:
    """Mean cosine over heads and unmasked positions; with `shuffle`, targets are paired with
    predictions at randomly permuted positions (the collapse baseline)."""
    p, t = _items(pred, mask), _items(target, mask)
    if not len(p):
        return float("nan")
    if shuffle is not None:
        t = t[torch.randperm(len(t), generator=shuffle)]
    return F.cosine_similarity(p, t, dim=-1, eps=EPS).mean().item()


def answer_positions(loss_mask) -> torch.Tensor:
    """(P,) positions p of the batch whose next token p+1 is a cross-entropy target in some row.

    A model run with `logits_to_keep=answer_positions(mask)` computes logits there alone:
    with a 151,936-token vocabulary the logits of every position are the largest activation
    of a small student, and the question (often a third or more of the text) needs none.
    """
    return loss_mask[:, 1:].bool().any(0).nonzero().flatten()


def answer_cross_entropy(logits, input_ids, loss_mask, positions=None):
    """Next-token cross-entropy on positions whose target token has loss_mask true.

    input_ids, loss_mask (B, T), loss_mask marking the *target* tokens. logits (B, T, V) for
    every position, or (B, P, V) for `positions` only (see answer_positions).
    """
    if positions is None:
        logits, positions = logits[:, :-1], torch.arange(input_ids.shape[1] - 1, device=input_ids.device)
    m, tgt = _answer_targets(input_ids, loss_mask, positions)
    if not m.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[m].float(), tgt[m])


def _answer_targets(input_ids, loss_mask, positions):
    """(B, P) mask of the positions whose next token is a target, and those next tokens."""
    return loss_mask[:, positions + 1].bool(), input_ids[:, positions + 1]


def chunked_answer_cross_entropy(head, hidden, input_ids, loss_mask, positions, chunk: int):
    """`answer_cross_entropy` of head(hidden) computed `chunk` target tokens at a time.

    hidden (B, P, H) holds the final hidden states at `positions`. Each chunk's logits
    (chunk x vocabulary) live only inside a checkpointed function and are recomputed in the
    backward, so the peak holds one chunk's logits instead of every answer position's: with a
    151,936-token vocabulary that is ~1.4 GB less for two 512-token answers, for one more
    forward of the output head.
    """
    from torch.utils.checkpoint import checkpoint
    m, tgt = _answer_targets(input_ids, loss_mask, positions)
    if not m.any():
        return hidden.sum() * 0.0
    h, tgt = hidden[m], tgt[m]                                        # (N, H), (N,)
    ce_sum = lambda hc, tc: F.cross_entropy(head(hc).float(), tc, reduction="sum")
    total = sum(checkpoint(ce_sum, h[i:i + chunk], tgt[i:i + chunk], use_reentrant=False)
                for i in range(0, len(h), chunk))
    return total / len(h)


def topk_kd_loss(student_logits, topk_ids, topk_logprobs, mask, temperature: float = 1.0):
    """KL(teacher || student) of the next-token distribution, the teacher known by its top-K.

    student_logits (B, P, V); topk_ids (B, P, K) and topk_logprobs (B, P, K) the teacher's K
    most likely next tokens and their log-probabilities (temperature 1, as stage 1 stores
    them); mask (B, P). The distributions are compared over K + 1 outcomes: the K tokens and
    one tail bucket holding the rest of the mass on each side. With a temperature T the
    student's logits are divided by T and the teacher's top-K log-probs too, renormalised over
    the K so that the K keep their untempered total mass (the tail's own tempering is unknown);
    the loss is then multiplied by T^2, as in Hinton et al. Mean over unmasked positions, in
    float32; 0 when every position is masked."""
    t_lp = topk_logprobs.float()
    p_top = t_lp.exp()                                                        # (B, P, K)
    top_mass = p_top.sum(-1, keepdim=True).clamp(max=1.0)
    if temperature != 1.0:
        p_top = torch.softmax(t_lp / temperature, dim=-1) * top_mass
    p_tail = (1.0 - top_mass).clamp(min=0.0)                                  # (B, P, 1)
    s_lp = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    q_lp = s_lp.gather(-1, topk_ids.long())                                   # (B, P, K)
    q_tail = (1.0 - q_lp.exp().sum(-1, keepdim=True)).clamp(min=EPS)
    kl = (p_top * (torch.log(p_top.clamp(min=EPS)) - q_lp)).sum(-1) \
        + (p_tail * (torch.log(p_tail.clamp(min=EPS)) - torch.log(q_tail))).squeeze(-1)     # (B, P)
    m = mask.bool()
    n = m.sum().clamp(min=1)
    return torch.where(m, kl, kl.new_zeros(())).sum() / n * temperature ** 2
