"""Whether a cache's teacher and a student share their vocabulary where it matters.

Three cases decide what stage 2 may do with a cache:

- same: the tokenizers are identical (the same full definition). Token ids mean the same
  tokens; K/V align position for position and the cached top-K ids are the student's.
- compatible: the tokenizers differ, but every token string that both have has the same id in
  both, and the student turns the cache's texts into the cache's ids (Qwen2 and Qwen2.5: one
  BPE, Qwen2.5 adds special tokens; or an embedding padded to more rows). Identity alignment and
  top-K logit distillation apply; top-K ids that are not one of the student's tokens (the
  teacher's extra tokens, its padding rows) are dropped and the rest renormalised.
- different: anything else (Qwen2 and Llama). K/V align by character overlap; logit
  distillation needs a method that compares no ids (stage 2 --kd-method uld or chunk).

The teacher's tokenizer comes from the cache's `tokenizer/` folder (stage 1 saves it there), or
for a cache without one, from the name its manifest records; either way it must hash to the
manifest's tokenizer hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import KavaError

TOKENIZER_DIR = "tokenizer"
KINDS = ("same", "compatible", "different")


@dataclass(frozen=True)
class VocabMatch:
    kind: str                       # one of KINDS
    reason: str                     # one line: what differs, or why the pair is not compatible
    shared: np.ndarray | None       # (n,) bool: id i names the same token for both and is a row of
    #                                 the student's output (None when `different`)

    @property
    def identity(self) -> bool:
        """Token ids mean the same for teacher and student (same or compatible)."""
        return self.kind != "different"

    def keep(self, ids: np.ndarray) -> np.ndarray:
        """Which of the teacher's token `ids` (any shape) are tokens of the student's."""
        ids = np.asarray(ids)
        inside = (ids >= 0) & (ids < len(self.shared))
        return inside & self.shared[np.where(inside, ids, 0)]


def _by_id(vocab: dict[str, int], n: int) -> np.ndarray:
    """Token strings indexed by id (None where an id names no token)."""
    out = np.full(n, None, dtype=object)
    for s, i in vocab.items():
        if 0 <= i < n:
            out[i] = s
    return out


def compare_vocabularies(teacher_tok, student_tok, student_rows: int | None = None) -> VocabMatch:
    """How two tokenizers' vocabularies relate, from the tokenizers alone (the texts are
    checked by `check_texts`). `student_rows`: the rows of the student's output layer (its
    config's vocab_size); ids from there on are never the student's tokens."""
    from .data import tokenizer_identity
    rows = len(student_tok) if student_rows is None else student_rows
    if tokenizer_identity(teacher_tok)["sha256"] == tokenizer_identity(student_tok)["sha256"]:
        shared = np.arange(max(len(student_tok), rows)) < min(len(student_tok), rows)
        return VocabMatch("same", "the same tokenizer", shared)
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    clash = [s for s, i in tv.items() if s in sv and sv[s] != i]
    if clash:
        s = min(clash, key=lambda x: tv[x])
        return VocabMatch("different", f"token {s!r} is id {tv[s]} in the teacher's vocabulary and "
                          f"{sv[s]} in the student's ({len(clash)} of {len(tv)} tokens have other ids)", None)
    n = max(max(tv.values(), default=-1), max(sv.values(), default=-1), rows - 1) + 1
    t_by, s_by = _by_id(tv, n), _by_id(sv, n)
    shared = np.array([a is not None and a == b for a, b in zip(t_by, s_by)], dtype=bool)
    shared[rows:] = False
    if not shared.any():
        return VocabMatch("different", "the vocabularies share no token at the same id", None)
    only_t = sum(1 for s in tv if s not in sv)
    only_s = sum(1 for s in sv if s not in tv)
    return VocabMatch("compatible", f"{int(shared.sum())} tokens with the same ids; {only_t} teacher tokens the "
                      f"student lacks, {only_s} student tokens the teacher lacks", shared)


def check_texts(match: VocabMatch, student_tok, samples) -> VocabMatch:
    """`match`, checked on `samples` ((row, text, cached ids), the teacher's ids as the cache
    holds them; a sample cut at max_length is compared on its length): `different`, naming the
    first such row, when the student tokenizes more than half of them into other ids (another
    BOS, normalizer or pre-tokenizer); a few such samples (a special token only one side has,
    in their text) leave the pair compatible, and stage 2 aligns those samples by characters."""
    if match.kind != "compatible":
        return match
    odd = []
    for row, text, ids in samples:
        mine = student_tok(text, add_special_tokens=True)["input_ids"][:len(ids)]
        ids = [int(x) for x in ids]
        if mine != ids:
            at = next((i for i, (a, b) in enumerate(zip(mine, ids)) if a != b), min(len(mine), len(ids)))
            odd.append(f"sample row {row} (first at token {at}: {mine[at:at + 3]} against {ids[at:at + 3]})")
    if 2 * len(odd) > len(samples):
        return VocabMatch("different", f"the student tokenizes {len(odd)} of {len(samples)} samples into other ids "
                          f"than the teacher, {odd[0]}", None)
    if odd:
        return VocabMatch("compatible", f"{match.reason}; {len(odd)} of {len(samples)} samples checked tokenized "
                          f"otherwise, {odd[0]}", match.shared)
    return match


def teacher_tokenizer(cache):
    """The tokenizer a cache was made with: its `tokenizer/` folder, else the name in its
    manifest; refused unless it hashes to the manifest's tokenizer hash."""
    from .data import load_fast_tokenizer, tokenizer_identity
    m = cache.meta
    folder = Path(cache.path) / TOKENIZER_DIR
    where = folder if folder.is_dir() else m.tokenizer.name
    try:
        tok = load_fast_tokenizer(str(where), f"the tokenizer of {cache.path}")
    except KavaError as e:
        raise KavaError(f"{cache.path}: the cache holds no {TOKENIZER_DIR}/ folder and its teacher's tokenizer "
                        f"{where!r} cannot be loaded here ({e}); it is needed to compare vocabularies "
                        "with the student") from None
    if tokenizer_identity(tok)["sha256"] != m.tokenizer.sha256:
        raise KavaError(f"{cache.path}: the tokenizer at {where} is not the one the cache was made with "
                        "(its hash differs from the manifest's)")
    return tok


def vocab_match(cache, student_tok, student_rows: int | None = None, samples: int = 32) -> VocabMatch:
    """`compare_vocabularies` of a cache's teacher and a student, then `check_texts` on the
    cache's first `samples` samples. The teacher's tokenizer is loaded only when the two
    differ."""
    from .data import tokenizer_identity
    if cache.meta.tokenizer.sha256 == tokenizer_identity(student_tok)["sha256"]:
        return compare_vocabularies(student_tok, student_tok, student_rows)
    match = compare_vocabularies(teacher_tokenizer(cache), student_tok, student_rows)
    if match.kind == "compatible":
        first = [cache[i] for i in range(min(samples, len(cache)))]
        match = check_texts(match, student_tok, [(s["row"], s["text"], s["input_ids"].tolist()) for s in first])
    return match


def describe(match: VocabMatch) -> str:
    """What stage 2 does with a cache whose vocabulary relates so to the student's."""
    if match.kind == "same":
        return "same tokenizer: identity alignment, logit distillation with --kd-method topk"
    if match.kind == "compatible":
        return (f"compatible vocabularies ({match.reason}): identity alignment, logit distillation with "
                "--kd-method topk (top-K ids the student lacks are dropped and counted)")
    return (f"different vocabularies ({match.reason}): character-overlap alignment, logit distillation with "
            "--kd-method uld or chunk")


def save_teacher_tokenizer(tok, cache_dir: Path) -> Path:
    """Save the teacher's tokenizer (or copy a cache's `tokenizer/` folder, given as a Path)
    into `cache_dir/tokenizer/`, through a temporary folder and a rename, unless a folder is
    there already; stage 2 reads it from there to compare the vocabularies without the teacher."""
    import os
    import shutil
    from . import no_hf_progress_bars
    from .cache.write import _alive
    dest = Path(cache_dir) / TOKENIZER_DIR
    for old in Path(cache_dir).glob(f"{TOKENIZER_DIR}.tmp-*"):   # left by a killed process
        pid = old.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    if dest.is_dir():
        return dest
    tmp = Path(cache_dir) / f"{TOKENIZER_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(tok, Path):
        shutil.copytree(tok, tmp)
    else:
        with no_hf_progress_bars():
            tok.save_pretrained(tmp)
    try:
        tmp.rename(dest)
    except OSError:                 # another process of the same cache renamed its copy first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
