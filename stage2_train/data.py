"""Training data over one or more caches: teacher K/V plus the student's own tokenization.

Every cache must come from the same data set (same rows, same content hash) and the prompt
template this code formats with; samples are matched across caches by data-set row. The
student tokenizes the sample text stored in the cache, and each teacher's positions are aligned
to the student's (see align.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kava_common import all_finite
from kava_common.cache import KVCache
from kava_common.prompt import TEMPLATE_ID, token_spans
from kava_common.vocab import VocabMatch, vocab_match

from .align import linear_alignment, overlap_alignment, prefix_pairs, segment_alignment, shared_chunks


def check_caches(caches: list[KVCache], dataset: str | None = None, split: str | None = None) -> None:
    """Refuse caches that do not fit together or do not fit the run; name both sides."""
    problems = []
    for c in caches:
        m = c.meta
        if m.prompt_template != TEMPLATE_ID:
            problems.append(f"{c.path}: made with prompt template {m.prompt_template!r}, but "
                            f"stage 2 formats samples with {TEMPLATE_ID!r}")
        d = m.dataset
        if dataset is not None and d.name != dataset:
            problems.append(f"{c.path}: made from data set {d.name!r}, but the run asks for {dataset!r}")
        if split is not None and d.split != split:
            problems.append(f"{c.path}: made from split {d.split!r}, but the run asks for {split!r}")
    ref = caches[0].meta.dataset
    for c in caches[1:]:
        d = c.meta.dataset
        if (d.name, d.split, d.content_sha256) != (ref.name, ref.split, ref.content_sha256):
            problems.append(f"{c.path} was made from {d.name} / {d.split} ({d.rows} rows, "
                            f"hash {d.content_sha256[:12]}) but {caches[0].path} from {ref.name} / "
                            f"{ref.split} ({ref.rows} rows, hash {ref.content_sha256[:12]})")
    if problems:
        raise ValueError("the caches do not fit this run:\n  " + "\n  ".join(problems))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled micro-batches of one epoch; a function of (seed, epoch) alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)] or [order]



class Feed:
    """A run's training micro-batches: each epoch's order (`epoch_batches`), this process's share
    of it (`ranks.deal`), read ahead by `num_workers` DataLoader workers, and where the run
    stands in it (`prog.epoch`, `prog.micro`, which checkpoints keep)."""

    def __init__(self, train_set, collate_fn, cfg, ranks):
        self.train_set, self.collate, self.cfg, self.ranks = train_set, collate_fn, cfg, ranks
        self._it = None                         # the current epoch's loader
        self.epoch(0)                           # too few micro-batches for the ranks: refused now

    def epoch(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches of an epoch (all of them for a lone process)."""
        batches = epoch_batches(len(self.train_set), self.cfg.batch_size, self.cfg.seed, epoch)
        return self.ranks.deal(batches, len(self.train_set), self.cfg.batch_size)

    def loader(self, prog, batches: list[list[int]] | None = None, dataset=None):
        """Micro-batches read ahead of the step; by default the rest of the current epoch (from
        prog.micro on)."""
        cfg = self.cfg
        if batches is None:
            batches = self.epoch(prog.epoch)[prog.micro:]
        # a loader's own generator: creating its iterator then draws nothing from torch's global
        # RNG, whose state a checkpoint restores (dropout would differ after a resume otherwise)
        return iter(torch.utils.data.DataLoader(
            self.train_set if dataset is None else dataset, batch_sampler=batches, collate_fn=self.collate,
            num_workers=cfg.num_workers, prefetch_factor=2 if cfg.num_workers else None,
            persistent_workers=False, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + prog.epoch)))

    def take(self, prog):
        """The run's next `grad_accum` micro-batches, on into the next epoch when one ends;
        `prog` counts them, so a checkpoint knows where the data stands."""
        for _ in range(self.cfg.grad_accum):
            if self._it is None:
                self._it = self.loader(prog)
            batch = next(self._it, None)
            if batch is None:                   # epoch done: the next one's order
                prog.epoch, prog.micro = prog.epoch + 1, 0
                self._it = self.loader(prog)
                batch = next(self._it)
            prog.micro += 1
            yield batch


def split_data(cfg, teachers: list, tok, data=None) -> tuple:
    """The samples the caches share (or `data`), as (all, training, held-out): the last
    `eval_samples` are held out; refused when nothing would be left to train on."""
    if data is None:
        data = DistillData([t.cache for t in teachers], tok, cfg.max_length, cfg.align, cfg.kv_tokens,
                           [t.vocab for t in teachers], cfg.kd_method if cfg.kd_weight else None, cfg.kd_tokens)
    if len(data) <= cfg.eval_samples:
        raise ValueError(f"the caches share {len(data)} samples; need more than eval_samples "
                         f"({cfg.eval_samples}) so some are left to train on")
    n_train = len(data) - cfg.eval_samples
    return data, torch.utils.data.Subset(data, range(n_train)), torch.utils.data.Subset(data, range(n_train, len(data)))


@dataclass
class TeacherPlan:
    """What one teacher gives one sample, fixed once the sample is first read: the alignment of
    its K/V onto the student's positions, and what logit distillation and confidence weighting
    take from it."""
    A: torch.Tensor | None          # (Ts, Tt) sparse alignment, None: position for position
    valid: torch.Tensor             # (Ts,) bool: student positions with a K/V target
    kd_pos: torch.Tensor | None     # (Ts,) long: the teacher position whose next-token distribution
    #                                 each student position takes (-1: none); None: its own
    kd_ok: bool = True              # False: left out of logit distillation (its ids differ)
    chunk_of: torch.Tensor | None = None   # (Ts,) long: chunk of each student token (-1: none)
    chunk_lp: torch.Tensor | None = None   # (C,) float32: the teacher's log-likelihood of each chunk
    answer_lp: float | None = None  # the teacher's mean log-probability of the sample's answer tokens


class DistillData(torch.utils.data.Dataset):
    """Sample i: the student's input ids and answer mask, and per teacher its K/V of the
    selected layers with an alignment onto the student's positions, and what logit
    distillation (`kd_method`) needs of it there.

    `vocab`: per cache, how its teacher's vocabulary relates to the student's
    (kava_common.vocab; computed here when not given). Same or compatible vocabularies align
    position for position; a sample that a compatible pair tokenizes differently (a special
    token only the teacher has) is aligned by character overlap instead and left out of top-K
    distillation (`kd_skipped` counts it)."""

    def __init__(self, caches: list[KVCache], student_tok, max_length: int, align: str = "auto",
                 kv_tokens: str = "all", vocab: list[VocabMatch] | None = None, kd_method: str | None = None,
                 kd_tokens: str = "answer"):
        self.caches, self.tok, self.max_length, self.align = caches, student_tok, max_length, align
        self.kv_tokens, self.kd_method, self.kd_tokens = kv_tokens, kd_method, kd_tokens
        per_cache = [dict(zip(c.rows().tolist(), range(len(c)))) for c in caches]
        common = sorted(set(per_cache[0]).intersection(*per_cache[1:]))
        self.rows = common
        self.index = [tuple(m[r] for m in per_cache) for r in common]
        self.vocab = vocab if vocab is not None else [vocab_match(c, student_tok) for c in caches]
        self.teacher_rows = [c.meta.teacher_vocab_size for c in caches]
        self._plan: dict[int, tuple] = {}
        if align == "identity" and not all(v.identity for v in self.vocab):
            bad = [f"{c.path} ({v.reason})" for c, v in zip(caches, self.vocab) if not v.identity]
            raise ValueError(f"align 'identity' needs the student's vocabulary, but {bad} used another "
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
        ids, ce_mask, kv_mask, plans = self._plan[i]
        teachers, dropped, skipped = [], 0, 0
        for ti, (s, plan) in enumerate(zip(full, plans)):
            kv = {"kq": s["kq"]} if "kq" in s else {"k": s["k"], "v": s["v"]}
            t = {**kv, "A": None if plan.A is None else plan.A.to_dense(), "valid": plan.valid,
                 "answer_lp": plan.answer_lp}
            if self.kd_method == "chunk":
                t["chunk_of"], t["chunk_lp"] = plan.chunk_of, plan.chunk_lp
            elif self.kd_method in ("topk", "uld") and "topk_ids" in s:
                t.update(self._aligned_topk(s, plan, ti, len(ids), self.rows[i]))
                dropped += t.pop("dropped")
                skipped += not plan.kd_ok
            teachers.append(t)
        return {"input_ids": ids, "ce_mask": ce_mask, "kv_mask": kv_mask, "teachers": teachers,
                "row": self.rows[i], "kd_dropped": dropped, "kd_skipped": skipped}

    def _aligned_topk(self, s: dict, plan: TeacherPlan, ti: int, ts: int, row: int) -> dict:
        """The teacher's top-K on the student's positions: `topk_ids`, `topk_logprobs` (Ts, K),
        `kd_valid` (Ts,) and for top-K distillation `topk_keep` (Ts, K), the entries that are
        the student's tokens, the others' probability taken out and the rest renormalised to
        it (`dropped` counts them)."""
        ids, lps = s["topk_ids"], s["topk_logprobs"]                          # (Tt, K)
        tt, k = ids.shape
        vocab, rows = self.vocab[ti], self.teacher_rows[ti]
        if len(ids) and (int(ids.min()) < 0 or (rows is not None and int(ids.max()) >= rows)):
            raise ValueError(f"{self.caches[ti].path}: sample row {row} has top-K "
                             f"ids from {int(ids.min())} to {int(ids.max())}, outside the teacher's {rows or '?'} output "
                             "rows: the cache is damaged or not a kava cache (python -m kava_common.info CACHE --verify)")
        if not plan.kd_ok:
            z = torch.zeros((ts, k), dtype=torch.long)
            return {"topk_ids": z, "topk_logprobs": z.float(), "topk_keep": z.bool(),
                    "kd_valid": torch.zeros(ts, dtype=torch.bool), "dropped": 0}
        if plan.kd_pos is None:                                               # position for position
            src = torch.arange(ts)
            ok = src < tt
        else:
            src, ok = plan.kd_pos, (plan.kd_pos >= 0) & (plan.kd_pos < tt)
        src = torch.where(ok, src, 0).clamp(max=max(tt - 1, 0))
        ids, lps = ids[src], lps[src].float()                                 # (Ts, K)
        out = {"topk_ids": ids, "topk_logprobs": lps, "kd_valid": ok, "dropped": 0}
        if self.kd_method == "topk":
            keep = torch.from_numpy(vocab.keep(ids.numpy()))
            gone = (lps.exp() * ~keep).sum(-1).clamp(max=1.0)                 # (Ts,) mass dropped
            out["kd_valid"] = ok & (gone < 1 - 1e-6)
            out["topk_logprobs"] = torch.where(keep, lps - torch.log1p(-gone.clamp(max=1 - 1e-6))[:, None], 0.0)
            out["topk_keep"] = keep & out["kd_valid"][:, None]
            out["dropped"] = int((~keep & ok[:, None]).sum())
        return out

    def _prepare(self, i: int, samples: list[dict]):
        """The student's tokens and answer mask, and per teacher its plan (TeacherPlan); none
        of it changes between epochs, so it is computed once per sample."""
        ids, offs, ce_mask, kv_mask, s_tok_segments = self._encode(samples[0])
        plans = []
        for t, (s, vocab) in enumerate(zip(samples, self.vocab)):
            ts, tt = len(ids), len(s["input_ids"])
            mode = self.align if self.align != "auto" else ("identity" if vocab.identity else "overlap")
            kd_ok, kd_pos = True, None
            if mode == "identity":
                n = min(ts, tt)
                if torch.equal(ids[:n], s["input_ids"][:n]):
                    A, valid = None, torch.arange(ts) < tt
                elif vocab.kind == "compatible" and self.align == "auto":
                    # a token only one side has (a special token's text): this sample alone aligns by
                    # characters, and top-K ids no longer match the student's positions
                    A, valid = overlap_alignment(offs, s["char_offsets"])
                    kd_ok = False
                else:
                    raise ValueError(f"sample row {self.rows[i]}: the student's tokens differ from "
                                     f"those in {self.caches[t].path} although the tokenizers match")
            elif mode == "overlap":
                A, valid = overlap_alignment(offs, s["char_offsets"])
            elif mode == "linear":
                A, valid = linear_alignment(ts, tt)
            else:
                A, valid = segment_alignment(ts, tt, s_tok_segments,
                                             [s["token_segments"][n] for n in s["token_segments"]])
            if self.kd_method == "uld":
                kd_pos = prefix_pairs(offs, s["char_offsets"])
            plan = TeacherPlan(None if A is None else A.to_sparse(), valid, kd_pos, kd_ok,
                               answer_lp=answer_logprob(s))
            if self.kd_method == "chunk" and "token_logprobs" in s:
                plan.chunk_of, plan.chunk_lp = self._chunks(ids, offs, s, self.caches[t])
            plans.append(plan)
        return ids, ce_mask, kv_mask, plans

    def _chunks(self, ids: torch.Tensor, offs: torch.Tensor, s: dict, cache: KVCache):
        """The chunks of --kd-method chunk: per student token its chunk (Ts,) (-1: none), and
        per chunk the teacher's log-likelihood (C,). A chunk counts when every token of it, on
        either side, has a log-probability (not a sample's first token without a BOS before
        it) and, with kd_tokens answer, when it ends inside the answer; the EOS after an
        uncut sample is a chunk of its own on both sides."""
        s_chunk, t_chunk, ends = shared_chunks(offs, s["char_offsets"])
        n = len(ends)
        t_lp = s["token_logprobs"].float()                                    # position t: token t+1
        tok_lp = torch.cat([t_lp.new_zeros(1), t_lp[:-1]])                    # token i's, at i
        first = torch.zeros(n + 1, dtype=torch.bool)                          # chunks holding a first token
        if len(s_chunk) and s_chunk[0] >= 0:
            first[s_chunk[0]] = True
        if len(t_chunk) and t_chunk[0] >= 0:
            first[t_chunk[0]] = True
        lp = torch.zeros(n).index_add_(0, t_chunk.clamp(min=0), torch.where(t_chunk >= 0, tok_lp, 0.0))
        use = ~first[:n]
        if self.kd_tokens == "answer":
            use &= ends > s["char_segments"]["reasoning"][0]
        eos = self.tok.eos_token_id
        text_end = len(s["text"])
        eos_chunk = (eos is not None and cache.meta.tokenizer.eos_token_id is not None and not s["truncated"]
                     and int(ids[-1]) == eos and int(offs[-1, 0]) == int(offs[-1, 1]) == text_end)
        renumber = torch.full((n + 1,), -1, dtype=torch.long)
        renumber[:n][use] = torch.arange(int(use.sum()))
        chunk_of = renumber[s_chunk.clamp(min=0)].masked_fill(s_chunk < 0, -1)
        chunk_lp = lp[use]
        if eos_chunk:
            chunk_of[-1] = len(chunk_lp)
            chunk_lp = torch.cat([chunk_lp, t_lp[-1:]])
        return chunk_of, chunk_lp


def answer_logprob(sample: dict) -> float | None:
    """The teacher's mean log-probability of a sample's answer tokens (reasoning and final
    answer, in its own tokens), from the cache's token_logprobs; None without them or without
    an answer."""
    if "token_logprobs" not in sample:
        return None
    a0, a1 = sample["token_segments"]["reasoning"][0], sample["token_segments"]["answer"][1]
    a0 = max(a0, 1)                                         # token t's log-probability sits at t-1
    if a1 <= a0:
        return None
    return float(sample["token_logprobs"][a0 - 1:a1 - 1].double().mean())


def _pad_topk(items: list[dict], ts: int) -> dict:
    """The teachers' top-K next-token ids and log-probs on the student's positions (B, Ts, K),
    with `kd_valid` (B, Ts) and, for top-K distillation, `topk_keep` (B, Ts, K); zero past
    each sample's end."""
    if "topk_ids" not in items[0]:
        return {}
    k = items[0]["topk_ids"].shape[1]
    out = {"topk_ids": torch.zeros((len(items), ts, k), dtype=torch.long),
           "topk_logprobs": torch.zeros((len(items), ts, k), dtype=torch.float32),
           "kd_valid": torch.zeros((len(items), ts), dtype=torch.bool)}
    if "topk_keep" in items[0]:
        out["topk_keep"] = torch.zeros((len(items), ts, k), dtype=torch.bool)
    for i, it in enumerate(items):
        n = min(ts, len(it["topk_ids"]))
        for name in out:
            out[name][i, :n] = it[name][:n]
    return out


def _pad_chunks(items: list[dict], ts: int) -> dict:
    """--kd-method chunk: `chunk_of` (B, Ts) (-1 past each sample's end), `chunk_lp` and
    `chunk_mask` (B, C)."""
    if items[0].get("chunk_of") is None:
        return {}
    c = max(1, max(len(it["chunk_lp"]) for it in items))
    out = {"chunk_of": torch.full((len(items), ts), -1, dtype=torch.long),
           "chunk_lp": torch.zeros((len(items), c)), "chunk_mask": torch.zeros((len(items), c), dtype=torch.bool)}
    for i, it in enumerate(items):
        n, m = min(ts, len(it["chunk_of"])), len(it["chunk_lp"])
        out["chunk_of"][i, :n] = it["chunk_of"][:n]
        out["chunk_lp"][i, :m], out["chunk_mask"][i, :m] = it["chunk_lp"], True
    return out


def _answer_lps(items: list[dict]) -> dict:
    """Each sample's `answer_lp` (B,) float32 (confidence weighting), when every sample has one."""
    if any(it.get("answer_lp") is None for it in items):
        return {}
    return {"answer_lp": torch.tensor([it["answer_lp"] for it in items], dtype=torch.float32)}


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
        teachers.append({**kv, "A": A, "valid": valid & attn.bool(), **_pad_topk(items, ts),
                         **_pad_chunks(items, ts), **_answer_lps(items)})
    return {"input_ids": ids, "attention_mask": attn, "ce_mask": ce, "kv_mask": kvm, "teachers": teachers,
            "rows": torch.tensor([b["row"] for b in batch]),
            "kd_dropped": sum(b.get("kd_dropped", 0) for b in batch),
            "kd_skipped": sum(b.get("kd_skipped", 0) for b in batch)}


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
