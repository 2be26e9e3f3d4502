"""R-KV-style selection of a teacher's chain-of-thought K/V (KaVa, arXiv 2510.02312): per layer
and KV head, the M reasoning tokens whose K/V stand for the whole chain of thought.

Each reasoning token t of a KV head gets the score S = lambda * I + (1 - lambda) * R:
- I, importance: how much the answer attends to it. The answer's queries (every query head of
  the KV head's group) attend over the reasoning keys alone (softmax over them, scaled by
  1/sqrt(head_dim)); I is the mean over the answer's queries, then the max over the group's
  query heads.
- R, redundancy turned into novelty: a softmax over the reasoning tokens of minus each key's mean
  cosine similarity to the other reasoning keys, so a key unlike the others scores high.
The M best tokens are kept in time order; of tokens with equal scores, the earlier one. A chain of
thought with fewer than M tokens keeps them all and marks the empty slots (`mask` False, index
-1): never zeros passed off as keys. Positions outside `valid` (padding) are never selected and
take no part in R.

The functions work on one sample and one layer. The importance I comes with the selection, so that
a selection with another M or lambda can be made again from I and the keys alone, without the
teacher's queries.
"""

from __future__ import annotations

import math
import re

import torch


def importance(q_answer: torch.Tensor, k_reason: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """I (H, Tr): q_answer (Hq, Ta, D), the answer's queries of every query head; k_reason
    (H, Tr, D), the reasoning keys of the H KV heads (Hq a multiple of H, query head h attending
    through KV head h // (Hq / H), as grouped-query attention does); valid (Tr,) bool."""
    hq, ta, d = q_answer.shape
    h, tr, _ = k_reason.shape
    if hq % h:
        raise ValueError(f"{hq} query heads do not share {h} KV heads evenly")
    if ta == 0:                                  # no answer (cut by max_length): nothing attends
        return torch.zeros(h, tr, device=k_reason.device)
    group = hq // h
    k = k_reason.float().repeat_interleave(group, 0)                            # (Hq, Tr, D)
    logits = q_answer.float() @ k.transpose(1, 2) / math.sqrt(d)                 # (Hq, Ta, Tr)
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    attn = torch.softmax(logits, -1).nan_to_num(0.0).mean(1)                     # (Hq, Tr); none valid: 0
    return attn.view(h, group, tr).amax(1)


def redundancy(k_reason: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """R (H, Tr): per KV head, a softmax over the reasoning tokens of minus each key's mean
    cosine similarity to the other valid reasoning keys (0 outside `valid`)."""
    h, tr, _ = k_reason.shape
    valid = torch.ones(tr, dtype=torch.bool, device=k_reason.device) if valid is None else valid
    k = torch.nn.functional.normalize(k_reason.float(), dim=-1)
    cos = k @ k.transpose(1, 2)                                                  # (H, Tr, Tr)
    others = valid[None, :] & ~torch.eye(tr, dtype=torch.bool, device=k.device)  # (Tr, Tr): j != t, j valid
    n = others.sum(1).clamp(min=1)
    mean = (cos * others).sum(-1) / n                                            # (H, Tr)
    return torch.softmax((-mean).masked_fill(~valid, float("-inf")), -1).nan_to_num(0.0)


def select(scores: torch.Tensor, slots: int, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The `slots` best tokens per head of `scores` (H, Tr), in time order: (index (H, slots)
    long, -1 in an empty slot; mask (H, slots) bool). Ties go to the earlier token."""
    h, tr = scores.shape
    valid = torch.ones(tr, dtype=torch.bool, device=scores.device) if valid is None else valid
    s = scores.float().masked_fill(~valid, float("-inf"))
    order = torch.sort(-s, dim=-1, stable=True).indices[:, :slots]               # best first, earlier on ties
    n = min(slots, int(valid.sum()))
    kept = torch.sort(order[:, :n], dim=-1).values                               # time order
    index = torch.full((h, slots), -1, dtype=torch.long, device=scores.device)
    index[:, :n] = kept
    return index, index >= 0


def even_slots(heads: int, tr: int, slots: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`slots` evenly spaced reasoning tokens of `tr` (the first and the last among them), the
    same for every head; all of them and empty slots after when there are no more than `slots`."""
    n = min(tr, slots)
    kept = torch.arange(tr, device=device) if tr <= slots else \
        torch.linspace(0, tr - 1, slots, device=device).round().long()
    index = torch.full((heads, slots), -1, dtype=torch.long, device=device)
    index[:, :n] = kept
    return index, index >= 0


SELECTS = ("rkv", "even", "results")


def result_tokens(text: str, offsets, r0: int, r1: int) -> list[int]:
    """The reasoning tokens (indices from the chain of thought's first token `r0`; it ends before
    `r1`) that hold the first character of each calculator result, GSM8K's `<<48/2=24>>24`: the
    character right after each `>>`. `offsets` (T, 2): each token's character span."""
    spans = [(int(a), int(b)) for a, b in offsets[r0:r1]]
    if not spans:
        return []
    start, end = spans[0][0], spans[-1][1]
    found = []
    for m in re.finditer(">>", text[start:end]):
        c = start + m.end()                       # the result's first character
        t = next((i for i, (a, b) in enumerate(spans) if a <= c < b), None)
        if t is not None and t not in found:
            found.append(t)
    return found


def result_slots(heads: int, results: list[int], slots: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The calculator results' tokens as slots, in order and the same for every head: all of them
    and empty slots after when there are no more than `slots`, else `slots` of them evenly spaced
    (the first and the last among them)."""
    n = min(len(results), slots)
    got = torch.tensor(results, dtype=torch.long, device=device)
    if len(results) > slots:
        got = got[torch.linspace(0, len(results) - 1, slots, device=device).round().long()]
    index = torch.full((heads, slots), -1, dtype=torch.long, device=device)
    index[:, :n] = got[:n]
    return index, index >= 0


def rkv_select(q_answer: torch.Tensor, k_reason: torch.Tensor, v_reason: torch.Tensor, slots: int,
               lam: float = 0.1, valid: torch.Tensor | None = None, how: str = "rkv",
               results: list[int] | None = None) -> dict[str, torch.Tensor]:
    """One layer of one sample: the selected slots `k`, `v` (H, M, D; zeros in an empty slot,
    which `mask` marks), `index` (H, M) into the reasoning tokens (-1: empty), `mask` (H, M), and
    the importance `I` (H, Tr) that recompress needs to select again without the teacher."""
    return choose(importance(q_answer, k_reason, valid), k_reason, v_reason, slots, lam, valid, how, results)


def choose(imp: torch.Tensor, k_reason: torch.Tensor, v_reason: torch.Tensor, slots: int, lam: float,
           valid: torch.Tensor | None = None, how: str = "rkv",
           results: list[int] | None = None) -> dict[str, torch.Tensor]:
    """`rkv_select` from a given importance `imp` (H, Tr): what recompress does with the stored
    importance to select again with another M or lambda, without the teacher. `how` "even":
    evenly spaced tokens instead (the ablation of R-KV's choice); "results": the tokens of the
    chain of thought's calculator results (`results`, from `result_tokens`), one per step in
    order, a target a latent student can reach step by step. The importance is kept either way."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"--rkv-lambda must lie in [0, 1], got {lam}")
    if how == "even":
        index, mask = even_slots(imp.shape[0], imp.shape[1], slots, imp.device)
    elif how == "results":
        if results is None:
            raise ValueError("--rkv-select results needs the chain of thought's result tokens")
        index, mask = result_slots(imp.shape[0], results, slots, imp.device)
    elif how == "rkv":
        index, mask = select(lam * imp + (1 - lam) * redundancy(k_reason, valid), slots, valid)
    else:
        raise ValueError(f"--rkv-select {how!r}: choose {', '.join(SELECTS)}")
    return {"k": gather_slots(k_reason, index), "v": gather_slots(v_reason, index), "index": index,
            "mask": mask, "I": imp}


def stored_index(sel: dict[str, torch.Tensor], r0: int) -> torch.Tensor:
    """A selection's slots as the cache stores them (`rkv_index`): positions in the sample (the
    chain of thought starts at token `r0`), -1 for an empty slot, int32."""
    return torch.where(sel["mask"], sel["index"] + r0, -1).to(torch.int32)


def gather_slots(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (H, Tr, D) at `index` (H, M): (H, M, D), zeros where the index is -1."""
    got = torch.gather(x, 1, index.clamp(min=0)[..., None].expand(-1, -1, x.shape[-1]))
    return got * (index >= 0)[..., None].to(x.dtype)
