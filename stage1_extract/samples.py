"""Stage 1's samples: rows formatted with the shared prompt template and tokenized, split into
shards, and batched for the teacher."""

from __future__ import annotations

import torch

from kava_common.cache import CacheSample
from kava_common.data import Rows
from kava_common.prompt import encode_with_offsets, format_sample, token_spans_batch


def prepare_samples(rows: Rows, tok, max_length: int) -> tuple[list[CacheSample], list[dict], dict]:
    """Format and tokenize every row; returns samples, skipped rows (with reasons), counts."""
    samples, skipped = [], []
    texts, kept = [], []
    no_final = 0
    for i, (q, a) in enumerate(zip(rows.questions, rows.answers)):
        if not q.strip():
            skipped.append({"row": i, "reason": "empty question"})
            continue
        f = format_sample(q, a)
        no_final += not f.has_final
        texts.append(f.text)
        kept.append((i, f))
    encoded = [(ids[:max_length], offs[:max_length], len(ids) > max_length)
               for ids, offs in encode_with_offsets(tok, texts)]
    spans = token_spans_batch([f.char_spans for _, f in kept], [offs for _, offs, _ in encoded]).tolist()
    for (i, f), (ids, offs, cut), tspans in zip(kept, encoded, spans):
        samples.append(CacheSample(i, f.text, ids, offs, [tuple(t) for t in tspans], f.char_spans, cut))
    stats = {"rows_without_final_answer": no_final,
             "truncated_samples": sum(s.truncated for s in samples)}
    return samples, skipped, stats


def plan_shards(samples: list[CacheSample], bytes_per_token: int, shard_bytes: float) -> list[list[int]]:
    """Split samples, in order, into shards of about `shard_bytes`; deterministic, so a resumed
    run finds the same shard boundaries."""
    shards, cur, size = [], [], 0
    for j, s in enumerate(samples):
        cur.append(j)
        size += len(s.ids) * bytes_per_token
        if size >= shard_bytes:
            shards.append(cur)
            cur, size = [], 0
    if cur:
        shards.append(cur)
    return shards


def length_sorted_batches(samples: list[CacheSample], members: list[int], batch_size: int) -> list[list[int]]:
    """Batches of shard-local positions, longest first, so a batch pads little."""
    order = sorted(range(len(members)), key=lambda p: -len(samples[members[p]].ids))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(seqs: list[list[int]], pad_id: int, padding_side: str = "right"):
    """Pad token lists into (B, T) ids, mask and position ids; real tokens sit at positions
    0..len-1 whatever the padding side (post-RoPE keys depend on position)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)     # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)           # (B, T)
    for b, s in enumerate(seqs):
        sl = slice(0, len(s)) if padding_side == "right" else slice(width - len(s), width)
        ids[b, sl] = torch.as_tensor(s, dtype=torch.long)
        mask[b, sl] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)                            # (B, T)
    return ids, mask, pos


