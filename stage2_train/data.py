"""Training data over one or more caches: teacher K/V plus the student's own tokenization.

Every cache must come from the same data set (same rows, same content hash) and the prompt
template this code formats with; samples are matched across caches by data-set row. The
student tokenizes the sample text stored in the cache, and each teacher's positions are aligned
to the student's (see align.py).
"""

from __future__ import annotations

import numpy as np
import torch

from kava_common import all_finite
from kava_common.cache import KVCache
from kava_common.data import tokenizer_identity
from kava_common.prompt import TEMPLATE_ID, token_spans

from .align import linear_alignment, overlap_alignment, segment_alignment


def check_caches(caches: list[KVCache], dataset: str | None = None, split: str | None = None) -> None:
    """Refuse caches that do not fit together or do not fit the run; name both sides."""
    problems = []
    for c in caches:
        m = c.manifest
        if m["prompt_template"] != TEMPLATE_ID:
            problems.append(f"{c.path}: made with prompt template {m['prompt_template']!r}, but "
                            f"stage 2 formats samples with {TEMPLATE_ID!r}")
        d = m["dataset"]
        if dataset is not None and d["name"] != dataset:
            problems.append(f"{c.path}: made from data set {d['name']!r}, but the run asks for {dataset!r}")
        if split is not None and d["split"] != split:
            problems.append(f"{c.path}: made from split {d['split']!r}, but the run asks for {split!r}")
    ref = caches[0].manifest["dataset"]
    for c in caches[1:]:
        d = c.manifest["dataset"]
        if (d["name"], d["split"], d["content_sha256"]) != (ref["name"], ref["split"], ref["content_sha256"]):
            problems.append(f"{c.path} was made from {d['name']} / {d['split']} ({d['rows']} rows, "
                            f"hash {d['content_sha256'][:12]}) but {caches[0].path} from {ref['name']} / "
                            f"{ref['split']} ({ref['rows']} rows, hash {ref['content_sha256'][:12]})")
    if problems:
        raise ValueError("the caches do not fit this run:\n  " + "\n  ".join(problems))


def cache_rows(cache: KVCache) -> np.ndarray:
    """Data-set row of every sample of a cache, read from the shards' small metadata."""
    return np.concatenate([s.small("rows") for s in cache._shards]) if len(cache) else np.zeros(0, np.int64)


class DistillData(torch.utils.data.Dataset):
    """Sample i: the student's input ids and answer mask, and per teacher its K/V of the
    selected layers with an alignment onto the student's positions."""

    def __init__(self, caches: list[KVCache], student_tok, max_length: int, align: str = "auto",
                 kv_tokens: str = "all"):
        self.caches, self.tok, self.max_length, self.align = caches, student_tok, max_length, align
        self.kv_tokens = kv_tokens
        per_cache = [dict(zip(cache_rows(c).tolist(), range(len(c)))) for c in caches]
        common = sorted(set(per_cache[0]).intersection(*per_cache[1:]))
        self.rows = common
        self.index = [tuple(m[r] for m in per_cache) for r in common]
        sha = tokenizer_identity(student_tok)["sha256"]
        self.same_tokenizer = [c.manifest["tokenizer"]["sha256"] == sha for c in caches]
        self._plan: dict[int, tuple] = {}
        if align == "identity" and not all(self.same_tokenizer):
            bad = [str(c.path) for c, same in zip(caches, self.same_tokenizer) if not same]
            raise ValueError(f"align 'identity' needs the student's tokenizer, but {bad} used another "
                             "(use align auto, overlap, linear or segment)")

    def __len__(self) -> int:
        return len(self.index)

    def _encode(self, sample: dict):
        """Student tokens of the sample text plus EOS: ids (Ts,), offsets (Ts, 2), answer mask
        (Ts,), K/V mask (Ts,), segment token spans."""
        enc = self.tok(sample["text"], return_offsets_mapping=True, add_special_tokens=True)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        eos = self.tok.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            # the student learns to stop after the answer: EOS is a CE target, not a K/V one
            ids, offs = ids + [eos], offs + [(len(sample["text"]), len(sample["text"]))]
        ids = torch.tensor(ids[:self.max_length], dtype=torch.long)
        offs = torch.tensor(offs[:self.max_length], dtype=torch.long).reshape(-1, 2)
        ans_start = sample["char_segments"]["reasoning"][0]
        ce_mask = (offs[:, 1] > offs[:, 0]) & (offs[:, 1] > ans_start)
        if eos is not None and len(ids) and ids[-1] == eos and len(sample["text"]) > ans_start:
            ce_mask[-1] = True
        if self.kv_tokens == "reasoning":   # tokens with a character inside the reasoning span
            r0, r1 = sample["char_segments"]["reasoning"]
            kv_mask = (offs[:, 1] > r0) & (offs[:, 0] < r1) & (offs[:, 1] > offs[:, 0])
        else:
            kv_mask = torch.ones(len(ids), dtype=torch.bool)
        return ids, offs, ce_mask, kv_mask, _token_segments(sample["char_segments"], offs)

    def __getitem__(self, i: int) -> dict:
        idx = self.index[i]
        if i not in self._plan:    # first visit: the full samples; later only their K/V
            full = [c[j] for c, j in zip(self.caches, idx)]
            self._plan[i] = self._prepare(i, full)
        else:
            full = [c.kv(j) for c, j in zip(self.caches, idx)]
        ids, ce_mask, kv_mask, aligns = self._plan[i]
        teachers = []
        for s, (A, valid) in zip(full, aligns):
            kv = {"kq": s["kq"]} if "kq" in s else {"k": s["k"], "v": s["v"]}
            t = {**kv, "A": None if A is None else A.to_dense(), "valid": valid}
            if "topk_ids" in s:
                t["topk_ids"], t["topk_logprobs"] = s["topk_ids"], s["topk_logprobs"]
            teachers.append(t)
        return {"input_ids": ids, "ce_mask": ce_mask, "kv_mask": kv_mask, "teachers": teachers,
                "row": self.rows[i]}

    def _prepare(self, i: int, samples: list[dict]):
        """The student's tokens and answer mask, and per teacher its alignment (sparse) and mask;
        none of it changes between epochs, so it is computed once per sample."""
        ids, offs, ce_mask, kv_mask, s_tok_segments = self._encode(samples[0])
        aligns = []
        for t, (s, same) in enumerate(zip(samples, self.same_tokenizer)):
            ts, tt = len(ids), len(s["input_ids"])
            mode = self.align if self.align != "auto" else ("identity" if same else "overlap")
            if mode == "identity":
                n = min(ts, tt)
                if not torch.equal(ids[:n], s["input_ids"][:n]):
                    raise ValueError(f"sample row {self.rows[i]}: the student's tokens differ from "
                                     f"those in {self.caches[t].path} although the tokenizers match")
                A, valid = None, torch.arange(ts) < tt
            elif mode == "overlap":
                A, valid = overlap_alignment(offs, s["char_offsets"])
            elif mode == "linear":
                A, valid = linear_alignment(ts, tt)
            else:
                A, valid = segment_alignment(ts, tt, s_tok_segments,
                                             [s["token_segments"][n] for n in s["token_segments"]])
            aligns.append((None if A is None else A.to_sparse(), valid))
        return ids, ce_mask, kv_mask, aligns


def _pad_topk(items: list[dict], ts: int) -> dict:
    """The teachers' top-K next-token ids and log-probs on the student's positions (same
    tokenizer: position for position), (B, Ts, K), zero past each teacher sample's end."""
    if "topk_ids" not in items[0]:
        return {}
    k = items[0]["topk_ids"].shape[1]
    ids = torch.zeros((len(items), ts, k), dtype=torch.long)
    lps = torch.zeros((len(items), ts, k), dtype=torch.float32)
    for i, it in enumerate(items):
        n = min(ts, len(it["topk_ids"]))
        ids[i, :n], lps[i, :n] = it["topk_ids"][:n], it["topk_logprobs"][:n]
    return {"topk_ids": ids, "topk_logprobs": lps}


def _token_segments(char_segments: dict, offs: torch.Tensor) -> list[tuple[int, int]]:
    return token_spans(list(char_segments.values()), offs.numpy())


def finite_kv(t: dict) -> bool:
    """A teacher's K/V are finite: the tensors, or the groups of packed codes."""
    if "kq" in t:
        return all(all_finite(t["kq"][n]) for n in ("k_scale", "k_low", "v_scale", "v_low") if n in t["kq"])
    return all_finite(t["k"]) and all_finite(t["v"])


def finite_teacher_kv(sample: dict) -> bool:
    return all(finite_kv(t) for t in sample["teachers"])


def collate(batch: list[dict], pad_id: int) -> dict:
    """Pad a list of samples into a batch.

    input_ids, attention_mask, ce_mask, kv_mask (B, Ts); per teacher: k, v (B, L, H, Tt, D) zero-padded
    (from a cache opened packed: kq, its codes and groups (B, L, Tt or groups, H, ...) zero-padded),
    A (B, Ts, Tt) or None when every sample is identity-aligned, valid (B, Ts). A sample whose
    teacher K/V hold NaN or Inf never reaches the step: it is left out and its row listed in
    `bad_rows` (a batch of bad samples only has `empty` set). The padded batch is checked as a
    whole (padding is zeros); only a batch that fails is checked sample by sample.
    """
    out = _pad(batch, pad_id)
    if all(finite_kv(t) for t in out["teachers"]):
        return dict(out, bad_rows=[])
    bad_rows = [b["row"] for b in batch if not finite_teacher_kv(b)]
    batch = [b for b in batch if b["row"] not in bad_rows]
    if not batch:
        return {"empty": True, "bad_rows": bad_rows}
    return dict(_pad(batch, pad_id), bad_rows=bad_rows)


def _pad(batch: list[dict], pad_id: int) -> dict:
    B = len(batch)
    ts = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((B, ts), pad_id, dtype=torch.long)
    attn = torch.zeros((B, ts), dtype=torch.long)
    ce = torch.zeros((B, ts), dtype=torch.bool)
    kvm = torch.zeros((B, ts), dtype=torch.bool)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n], attn[i, :n], ce[i, :n], kvm[i, :n] = b["input_ids"], 1, b["ce_mask"], b["kv_mask"]
    teachers = []
    for t in range(len(batch[0]["teachers"])):
        items = [b["teachers"][t] for b in batch]
        lengths = [it["kq"]["k_codes"].shape[1] if "kq" in it else it["k"].shape[2] for it in items]
        tt = max(lengths)
        valid = torch.zeros((B, ts), dtype=torch.bool)
        identity = all(it["A"] is None for it in items)
        A = None if identity else torch.zeros((B, ts, tt))
        for i, (it, n) in enumerate(zip(items, lengths)):
            valid[i, :len(it["valid"])] = it["valid"]
            if not identity:
                a = it["A"] if it["A"] is not None else torch.eye(len(it["valid"]), n)
                A[i, :a.shape[0], :a.shape[1]] = a
        width = ts if identity else tt          # identity: the teacher's positions are the student's
        kv = _pad_packed(items, width) if "kq" in items[0] else _pad_kv(items, width)
        teachers.append({**kv, "A": A, "valid": valid & attn.bool(), **_pad_topk(items, ts)})
    return {"input_ids": ids, "attention_mask": attn, "ce_mask": ce, "kv_mask": kvm, "teachers": teachers,
            "rows": torch.tensor([b["row"] for b in batch])}


def _pad_kv(items: list[dict], width: int) -> dict:
    """Teacher K and V (B, L, H, width, D), zero past each sample's end, cut at `width`."""
    L, H, _, D = items[0]["k"].shape
    k = torch.zeros((len(items), L, H, width, D), dtype=items[0]["k"].dtype)
    v = torch.zeros_like(k)
    for i, it in enumerate(items):
        n = min(width, it["k"].shape[2])
        k[i, :, :, :n], v[i, :, :, :n] = it["k"][:, :, :n], it["v"][:, :, :n]
    return {"k": k, "v": v}


def _pad_packed(items: list[dict], width: int) -> dict:
    """Packed teacher K/V (quant.PACKED names, (B, L, rows, H, ...)): token rows cut or padded
    to `width`, key groups padded to the most any sample has (a sample's groups start at its
    first token, as the batch's rows do), and `lengths` (B,), each sample's token rows."""
    out = {}
    for name, ref in items[0]["kq"].items():
        rows = max(it["kq"][name].shape[1] for it in items) if name in ("k_scale", "k_low") else width
        x = torch.zeros((len(items), ref.shape[0], rows, *ref.shape[2:]), dtype=ref.dtype)
        for i, it in enumerate(items):
            n = min(rows, it["kq"][name].shape[1])
            x[i, :, :n] = it["kq"][name][:, :n]
        out[name] = x
    # a short sample's last key group holds real scales: its padding would read back as `low`
    out["lengths"] = torch.tensor([min(width, it["kq"]["k_codes"].shape[1]) for it in items])
    return {"kq": out}
