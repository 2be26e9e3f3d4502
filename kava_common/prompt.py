"""The one prompt template shared by stage 1, stage 2 and evaluation.

A sample is rendered as

    Question: <question>
    Answer: <reasoning> #### <final answer>

and carries three segments, as half-open [start, end) spans in characters of the rendered text
and, once tokenized, in tokens: question, reasoning, final answer.

Edge cases (documented in the README):
- a row without `####`: its whole answer is reasoning; the final-answer span is empty (end, end).
- a row with an empty answer: reasoning and final answer are empty spans at the end of the text.
- a row with an empty question: not a sample; callers skip it and record why.
- non-ASCII text is kept as is; character spans count Python code points.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

TEMPLATE_ID = "kava-qa-v1"
SEGMENTS = ("question", "reasoning", "answer")
FINAL_MARK = "####"
_Q_PREFIX = "Question: "
_A_PREFIX = "\nAnswer:"


def format_prompt(question: str) -> str:
    """The text a model sees before it answers (used for generation)."""
    return f"{_Q_PREFIX}{question.strip()}{_A_PREFIX}"


@dataclass(frozen=True)
class Formatted:
    text: str
    char_spans: tuple[tuple[int, int], ...]  # one (start, end) per SEGMENTS entry
    has_final: bool


def format_sample(question: str, answer: str) -> Formatted:
    """Render question + answer with the template and return the text with its segment spans."""
    q = question.strip()
    a = answer.strip()
    prompt = format_prompt(q)
    q_span = (len(_Q_PREFIX), len(_Q_PREFIX) + len(q))
    if not a:
        end = len(prompt)
        return Formatted(prompt, (q_span, (end, end), (end, end)), False)
    text = f"{prompt} {a}"
    a0 = len(prompt) + 1
    mark = a.rfind(FINAL_MARK)
    if mark < 0:
        return Formatted(text, (q_span, (a0, len(text)), (len(text), len(text))), False)
    reasoning = a[:mark].rstrip()
    final = a[mark + len(FINAL_MARK):]
    final_start = a0 + mark + len(FINAL_MARK) + (len(final) - len(final.lstrip()))
    return Formatted(text, (q_span, (a0, a0 + len(reasoning)), (final_start, len(text))), True)


def token_spans(char_spans, offsets) -> list[tuple[int, int]]:
    """Map character spans to token spans: a token belongs to every span its characters overlap.

    `offsets` is the tokenizer's offset mapping, one (start, end) per token, as a (T, 2) array
    or a list of pairs; tokens with an empty offset (special tokens such as BOS) belong to no
    span. An empty span maps to an empty token span placed at the first token that starts at
    or after it.
    """
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    a, b = off[:, 0], off[:, 1]
    real = b > a
    out = []
    for s, e in char_spans:
        inside = np.flatnonzero(real & (a < e) & (b > s))
        if len(inside):
            out.append((int(inside[0]), int(inside[-1]) + 1))
        else:
            after = np.flatnonzero(real & (b > s))
            at = int(after[0]) if len(after) else len(off)
            out.append((at, at))
    return out


def token_spans_batch(char_spans: list, offsets: list) -> np.ndarray:
    """`token_spans` for many samples at once: (n, S, 2) int64, row j equal to
    `token_spans(char_spans[j], offsets[j])`. `char_spans[j]` holds S (start, end) pairs and
    `offsets[j]` is sample j's (T_j, 2) offset mapping. One set of numpy operations over all
    tokens instead of a Python loop per sample (faster: docs/benchmarks.md, figures behind the code).
    """
    n = len(offsets)
    if n == 0:
        return np.zeros((0, 0, 2), dtype=np.int64)
    spans = np.asarray(char_spans, dtype=np.int64).reshape(n, -1, 2)            # (n, S, 2)
    lens = np.array([len(o) for o in offsets], dtype=np.int64)
    off = np.concatenate([np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in offsets])
    a, b = off[:, 0], off[:, 1]
    sid = np.repeat(np.arange(n), lens)                # sample of each token
    first_tok = np.cumsum(lens) - lens                 # its first token in `off`
    real = b > a
    out = np.empty((n, spans.shape[1], 2), dtype=np.int64)
    samples = np.arange(n)

    def first_last(mask):
        """Per sample: local index of its first and last token in `mask`, and whether any."""
        idx = np.flatnonzero(mask)
        owner = sid[idx]
        lo = np.searchsorted(owner, samples, side="left")
        hi = np.searchsorted(owner, samples, side="right")
        found = hi > lo
        safe_lo, safe_hi = np.minimum(lo, max(len(idx) - 1, 0)), np.maximum(hi - 1, 0)
        pick = idx if len(idx) else np.zeros(1, np.int64)
        return pick[safe_lo] - first_tok, pick[safe_hi] - first_tok, found

    for k in range(spans.shape[1]):
        s, e = spans[:, k, 0][sid], spans[:, k, 1][sid]
        first, last, found = first_last(real & (a < e) & (b > s))
        after, _, any_after = first_last(real & (b > s))
        at = np.where(any_after, after, lens)          # empty: at the first token after it
        out[:, k, 0] = np.where(found, first, at)
        out[:, k, 1] = np.where(found, last + 1, at)
    return out


def encode_with_offsets(tok, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per text: token ids (T,) int64 and character offsets (T, 2) int32, with the tokenizer's
    special tokens and no truncation or padding -- what `tok(texts, return_offsets_mapping=True)`
    gives, at about half its cost on a large batch.

    transformers' call first sets the fast tokenizer's Rust backend up (truncation and padding
    off, its special-token handling) and then turns every encoding into Python lists of
    everything (mask, type ids, offsets), which costs more than the tokenizing itself
    (docs/benchmarks.md, figures behind the code). Here transformers' call tokenizes the first
    text only, which also sets the backend up, the backend encodes the batch, and the first
    text's result is compared with transformers'; on any difference the whole batch goes
    through transformers' call instead.
    """
    if not texts:
        return []
    ref = tok(texts[:1], return_offsets_mapping=True, add_special_tokens=True)
    ref_ids, ref_offs = ref["input_ids"][0], [tuple(o) for o in ref["offset_mapping"][0]]
    backend = getattr(tok, "backend_tokenizer", None)
    encs = backend.encode_batch(texts, add_special_tokens=True) if backend is not None else None
    if encs is None or encs[0].ids != ref_ids or encs[0].offsets != ref_offs:
        enc = tok(texts, return_offsets_mapping=True, add_special_tokens=True)
        return [(np.asarray(i, dtype=np.int64), np.asarray(o, dtype=np.int32).reshape(-1, 2))
                for i, o in zip(enc["input_ids"], enc["offset_mapping"])]
    return [(np.asarray(e.ids, dtype=np.int64),
             np.fromiter(itertools.chain.from_iterable(e.offsets), dtype=np.int32,
                         count=2 * len(e)).reshape(-1, 2)) for e in encs]


def extract_final_answer(text: str) -> str | None:
    """The text after the last `####`, stripped of spaces and thousands commas; None if absent."""
    mark = text.rfind(FINAL_MARK)
    if mark < 0:
        return None
    line = text[mark + len(FINAL_MARK):].strip().splitlines()
    return line[0].strip().replace(",", "") if line else ""
