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


def _masked_mean(v: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of per-item values v (B, H, T) over heads and the positions where mask (B, T) is
    true; 0 with a gradient path when none is. `weight` (B,): each item of sample b counts
    weight[b] times in the sum (the count divides as without it), so that per-sample teacher
    weights that sum to 1 over the teachers give each sample its usual share.

    Masked items are replaced by exact zeros (not multiplied, so junk there cannot turn into
    NaN) rather than gathered out: boolean indexing has a data-dependent shape, and on a GPU
    every such call waits for the device, several times per distilled layer and step.
    """
    keep = mask.bool()[:, None, :].expand_as(v)
    n = keep.sum().clamp(min=1)
    if weight is not None:
        v = v * weight.to(v.dtype)[:, None, None]
    return torch.where(keep, v, v.new_zeros(())).sum() / n


def cosine_loss(pred, target, mask, weight=None):
    """mean(1 - cos(pred, target)) over heads and unmasked positions."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=EPS)
    return _masked_mean(1 - cos, mask, weight)


def mercator_loss(pred, target, mask, alpha: float = 1.0, beta: float = 0.01, weight=None):
    """alpha * (1 - cos) + beta * (log|pred| - log|target|)^2: direction and scale separately."""
    p, t = pred.float(), target.float()
    cos = F.cosine_similarity(p, t, dim=-1, eps=EPS)
    lognorm = (torch.log(p.norm(dim=-1) + EPS) - torch.log(t.norm(dim=-1) + EPS)) ** 2
    return _masked_mean(alpha * (1 - cos) + beta * lognorm, mask, weight)


def mse_loss(pred, target, mask, weight=None):
    """Mean squared error over every element of the unmasked positions."""
    return _masked_mean(((pred.float() - target.float()) ** 2).mean(-1), mask, weight)


def l1_loss(pred, target, mask, weight=None):
    return _masked_mean((pred.float() - target.float()).abs().mean(-1), mask, weight)


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


def relation_loss(teacher, student, mask, heads: int = 1, weight=None):
    """MiniLMv2-style self-relation distillation of one layer's K (or V), with no projector.

    teacher (B, Ht, T, Dt) and student (B, Hs, T, Ds) on the same positions (aligned), mask
    (B, T). On each side the heads' vectors are concatenated per position and split into the
    same number of relation heads (any head count and head_dim, as long as both widths divide
    by `heads`); relations are softmax(X X^T / sqrt(d)) over the causal, unmasked keys; the
    loss is KL(teacher || student) summed over keys, averaged over unmasked queries and
    relation heads, in float32. 0 when every position is masked. The teacher side carries no
    gradient. `weight` (B,): per-sample weights, as in `_masked_mean`."""
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
    if weight is not None:
        kl = kl * weight.to(kl.dtype)[:, None, None]
    return torch.where(rows, kl, kl.new_zeros(())).sum() / (rows.sum().clamp(min=1))


def smooth_l1_loss(pred, target, mask, weight=None):
    """Huber's loss with beta 1 (torch's smooth_l1): squared below 1, absolute above, per element."""
    return _masked_mean(F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(-1), mask, weight)


LOSSES = {"mercator": mercator_loss, "cosine": cosine_loss, "mse": mse_loss, "l1": l1_loss,
          "smooth_l1": smooth_l1_loss, "relation": relation_loss}


def kv_loss(name: str, pred, target, mask, alpha: float = 1.0, beta: float = 0.01, weight=None):
    """One of the projected losses (`relation` compares unprojected K/V: see Distiller);
    `weight` (B,) weighs each sample (None: all alike)."""
    if name == "mercator":
        return mercator_loss(pred, target, mask, alpha, beta, weight)
    return LOSSES[name](pred, target, mask, weight)


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


def _position_mean(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of x (B, P) over the positions where mask (B, P) holds, sample b's counting weight[b]
    times (None: once); 0 with a gradient path when none does."""
    m = mask.bool()
    if weight is not None:
        x = x * weight.to(x.dtype)[:, None]
    return torch.where(m, x, x.new_zeros(())).sum() / m.sum().clamp(min=1)


def _teacher_top(topk_logprobs, keep, temperature: float):
    """The teacher's top-K probabilities (B, P, K), tempered as `topk_kd_loss` describes,
    entries outside `keep` zero, and the tail's mass (B, P, 1)."""
    t_lp = topk_logprobs.float()
    if keep is not None:
        t_lp = t_lp.masked_fill(~keep, float("-inf"))
    p_top = t_lp.exp()                                                        # (B, P, K)
    top_mass = p_top.sum(-1, keepdim=True).clamp(max=1.0)
    if temperature != 1.0:
        any_kept = torch.isfinite(t_lp).any(-1, keepdim=True)
        p_top = torch.where(any_kept, torch.softmax(torch.where(any_kept, t_lp, 0.0) / temperature, dim=-1),
                            0.0) * top_mass
    return p_top, (1.0 - top_mass).clamp(min=0.0)


def topk_kd_loss(student_logits, topk_ids, topk_logprobs, mask, temperature: float = 1.0, keep=None,
                 weight=None):
    """KL(teacher || student) of the next-token distribution, the teacher known by its top-K.

    student_logits (B, P, V); topk_ids (B, P, K) and topk_logprobs (B, P, K) the teacher's K
    most likely next tokens and their log-probabilities (temperature 1, as stage 1 stores
    them); mask (B, P). The distributions are compared over K + 1 outcomes: the K tokens and
    one tail bucket holding the rest of the mass on each side. With a temperature T the
    student's logits are divided by T and the teacher's top-K log-probs too, renormalised over
    the K so that the K keep their untempered total mass (the tail's own tempering is unknown);
    the loss is then multiplied by T^2, as in Hinton et al. `keep` (B, P, K): the entries that
    are tokens of the student's (the others count in neither distribution's top-K; stage 2 has
    renormalised the rest). `weight` (B,): per-sample weights. Mean over unmasked positions, in
    float32; 0 when every position is masked."""
    p_top, p_tail = _teacher_top(topk_logprobs, keep, temperature)
    s_lp = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    ids = topk_ids.long() if keep is None else torch.where(keep, topk_ids.long(), 0)
    q_lp = s_lp.gather(-1, ids)                                               # (B, P, K)
    q = q_lp.exp() if keep is None else torch.where(keep, q_lp.exp(), 0.0)
    q_tail = (1.0 - q.sum(-1, keepdim=True)).clamp(min=EPS)
    kl = (p_top * (torch.log(p_top.clamp(min=EPS)) - q_lp)).sum(-1) \
        + (p_tail * (torch.log(p_tail.clamp(min=EPS)) - torch.log(q_tail))).squeeze(-1)     # (B, P)
    return _position_mean(kl, mask, weight) * temperature ** 2


def uld_loss(student_logits, topk_logprobs, mask, temperature: float = 1.0, weight=None):
    """Universal logit distillation (Boizard et al. 2024, arXiv 2402.12030): the L1 distance
    between the teacher's and the student's next-token probabilities, each sorted from the
    most likely down, so that no token id is compared and the vocabularies need not match.

    student_logits (B, P, V); topk_logprobs (B, P, K) the teacher's top-K log-probabilities,
    sorted (as stage 1 stores them), at the student's positions; mask (B, P). The teacher is
    known by its K largest probabilities: ranks 1..K are compared one by one against the
    student's K largest, and the rest of each distribution as one tail mass, a lower bound of
    the full sorted distance. A temperature softens both sides as in `topk_kd_loss` (no T^2
    factor: the distance is between probabilities, not a KL). Mean over unmasked positions."""
    p_top, p_tail = _teacher_top(topk_logprobs, None, temperature)
    q = torch.softmax(student_logits.float() / temperature, dim=-1)
    q_top = q.topk(p_top.shape[-1], dim=-1).values                            # (B, P, K), sorted
    q_tail = (1.0 - q_top.sum(-1, keepdim=True)).clamp(min=0.0)
    dist = (q_top - p_top).abs().sum(-1) + (q_tail - p_tail).abs().squeeze(-1)  # (B, P)
    return _position_mean(dist, mask, weight)


CHUNK_DIVERGENCES = ("binary_kl", "abs")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def chunk_kd_loss(student_lp, teacher_lp, mask, divergence: str = "binary_kl", temperature: float = 100.0,
                  weight=None):
    """Chunk likelihood matching, after ALM (Minixhofer et al. 2025, arXiv 2503.20083).

    student_lp, teacher_lp (B, C): log-likelihoods of chunks of the text, each chunk a run of
    tokens that ends at the same character in both tokenizations (the sums of each side's
    per-token log-probabilities over its tokens of the chunk); mask (B, C). `binary_kl`: the
    chunk is an event of probability p = exp(lp / temperature) under each model, and the loss
    is the KL divergence of the teacher's Bernoulli(p_t) from the student's Bernoulli(p_s),
    the binarised f-divergence of the paper with KL as f (its gradient is that of the paper's
    binary cross-entropy; the paper's configuration uses temperature 100). `abs`: |lp_t - lp_s|,
    the plain difference. Mean over unmasked chunks, in float32; 0 when none is unmasked."""
    s, t = student_lp.float(), teacher_lp.detach().float()
    if divergence == "abs":
        d = (t - s).abs()
    elif divergence == "binary_kl":
        eps = 1e-6                  # keeps exp(lp / temperature) below 1, where log(1 - p) is finite
        lt = (t / temperature).clamp(max=0.0) - eps
        ls = (s / temperature).clamp(max=0.0) - eps
        d = lt.exp() * (lt - ls) + (-torch.expm1(lt)) * (_log1mexp(lt) - _log1mexp(ls))
    else:
        raise ValueError(f"chunk divergence {divergence!r}: choose one of {CHUNK_DIVERGENCES}")
    return _position_mean(d, mask, weight)
