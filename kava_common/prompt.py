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


def extract_final_answer(text: str) -> str | None:
    """The text after the last `####`, stripped of spaces and thousands commas; None if absent."""
    mark = text.rfind(FINAL_MARK)
    if mark < 0:
        return None
    line = text[mark + len(FINAL_MARK):].strip().splitlines()
    return line[0].strip().replace(",", "") if line else ""
