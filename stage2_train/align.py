"""Alignment between teacher and student: which layers, and which token positions.

Layer map: for every student layer, a list of (index into the cache's stored layers, weight);
an empty list means the layer is not distilled.

Token alignment: a matrix A (Ts, Tt) whose row j says how student position j is built from
teacher positions (rows sum to 1), and a mask (Ts,) of student positions that have a target.
The aligned teacher tensor is A @ teacher along time.
"""

from __future__ import annotations

import math

import torch

LayerMap = list[list[tuple[int, float]]]
ALIGN_MODES = ("auto", "identity", "overlap", "linear", "segment")


def proportional_layer_map(n_student: int, n_teacher: int, stored: list[int]) -> LayerMap:
    """Student layer s takes the stored teacher layer nearest to s * (Lt-1) / (Ls-1)."""
    out = []
    for s in range(n_student):
        want = s * (n_teacher - 1) / (n_student - 1) if n_student > 1 else n_teacher - 1
        best = min(range(len(stored)), key=lambda i: (abs(stored[i] - want), stored[i]))
        out.append([(best, 1.0)])
    return out


def parse_layer_map(spec, n_student: int, n_teacher: int, stored: list[int]) -> LayerMap:
    """`spec` is "proportional" or one entry per student layer: a teacher layer, null (not
    distilled), or a mapping {teacher layer: weight}. Teacher layers are the teacher's own
    numbering and must be stored in the cache."""
    if spec in (None, "proportional"):
        return proportional_layer_map(n_student, n_teacher, stored)
    if not isinstance(spec, (list, tuple)) or len(spec) != n_student:
        raise ValueError(f"layer_map: give one entry per student layer ({n_student}), got {spec!r}")
    out = []
    for s, entry in enumerate(spec):
        if entry is None:
            out.append([])
            continue
        pairs = entry.items() if isinstance(entry, dict) else [(entry, 1.0)]
        row = []
        for t, w in pairs:
            t = int(t)
            if t not in stored:
                raise ValueError(f"layer_map: student layer {s} wants teacher layer {t}, which the "
                                 f"cache does not store (it holds {stored})")
            row.append((stored.index(t), float(w)))
        out.append(row)
    return out


def _overlap(s_off, t_off):
    a = torch.as_tensor(s_off, dtype=torch.long).reshape(-1, 2)
    b = torch.as_tensor(t_off, dtype=torch.long).reshape(-1, 2)
    ok_s = (a[:, 1] > a[:, 0])[:, None]
    ok_t = (b[:, 1] > b[:, 0])[None, :]
    hit = (a[:, None, 0] < b[None, :, 1]) & (b[None, :, 0] < a[:, None, 1]) & ok_s & ok_t
    return hit.float()


def overlap_alignment(student_offsets, teacher_offsets):
    """Each student token takes the mean of the teacher tokens whose character spans overlap
    its own. Tokens with empty spans (BOS and other specials) match nothing."""
    hit = _overlap(student_offsets, teacher_offsets)                # (Ts, Tt)
    n = hit.sum(1, keepdim=True)
    return hit / n.clamp(min=1), n[:, 0] > 0


def linear_alignment(ts: int, tt: int, s0: int = 0, t0: int = 0, A=None):
    """Resample tt teacher positions onto ts student positions linearly (indices clamped).
    Writes into A (rows s0.., columns t0..) when given; returns (A, valid)."""
    A = torch.zeros(ts, tt) if A is None else A
    valid = torch.zeros(A.shape[0], dtype=torch.bool)
    if ts == 0 or tt == 0:
        return A, valid
    for j in range(ts):
        x = j * (tt - 1) / (ts - 1) if ts > 1 else (tt - 1) / 2
        i0 = min(int(math.floor(x)), tt - 1)
        i1 = min(i0 + 1, tt - 1)
        f = x - i0
        A[s0 + j, t0 + i0] += 1 - f
        A[s0 + j, t0 + i1] += f
        valid[s0 + j] = True
    return A, valid


def segment_alignment(ts: int, tt: int, s_segments, t_segments):
    """Linear resampling inside each segment (question, reasoning, answer) separately;
    positions outside every segment get no target."""
    A = torch.zeros(ts, tt)
    valid = torch.zeros(ts, dtype=torch.bool)
    for (a0, a1), (b0, b1) in zip(s_segments, t_segments):
        a1, b1 = min(a1, ts), min(b1, tt)
        if a1 > a0 and b1 > b0:
            _, v = linear_alignment(a1 - a0, b1 - b0, a0, b0, A)
            valid |= v
    return A, valid


# --- next-token positions and chunks across tokenizers (logit distillation) ---------------------

def prefix_ends(offsets) -> torch.Tensor:
    """(T,) long: how much of the text a model has read at each position, as the character
    where the position's token ends; 0 for a special token before any text (BOS), -1 for one
    after the text (EOS), and -1 for a token whose end the next token shares (the first bytes
    of a character that byte-level BPE splits over several tokens: the prefix is complete at
    the last of them only)."""
    off = torch.as_tensor(offsets, dtype=torch.long).reshape(-1, 2)
    a, b = off[:, 0], off[:, 1]
    real = b > a
    n = len(off)
    first = int(real.nonzero()[0]) if real.any() else n
    pos = torch.arange(n)
    ends = torch.where(real, b, torch.where(pos < first, torch.zeros_like(b), torch.full_like(b, -1)))
    repeated = torch.zeros(n, dtype=torch.bool)
    repeated[:-1] = (ends[:-1] == ends[1:]) & (ends[:-1] >= 0)
    return ends.masked_fill(repeated, -1)


def prefix_pairs(student_offsets, teacher_offsets) -> torch.Tensor:
    """(Ts,) long: for each student position, the teacher position that has read exactly the
    same text (both tokenizations end there at the same character), -1 where none has. At such
    a pair both models predict the text that follows the same prefix: their next-token
    distributions are comparable without comparing token ids (--kd-method uld)."""
    s, t = prefix_ends(student_offsets), prefix_ends(teacher_offsets)
    where = {int(e): i for i, e in enumerate(t.tolist()) if e >= 0}
    return torch.tensor([where.get(int(e), -1) if e >= 0 else -1 for e in s.tolist()], dtype=torch.long)


def shared_chunks(student_offsets, teacher_offsets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunks of the text that both tokenizations cut alike: the boundaries are the characters
    where a token of each side ends, and chunk c holds every token (of either side) that ends
    after boundary c-1 and at or before boundary c. Returns the chunk of each student token
    (Ts,) and of each teacher token (Tt,), -1 for tokens in none (special tokens, the tail after
    the last shared boundary), and the boundaries (C,): the character where each chunk ends. The
    log-likelihood of a chunk's text is then the sum of its tokens' log-probabilities on either
    side (--kd-method chunk)."""
    def ends(offsets):
        off = torch.as_tensor(offsets, dtype=torch.long).reshape(-1, 2)
        return torch.where(off[:, 1] > off[:, 0], off[:, 1], torch.full_like(off[:, 1], -1))
    s, t = ends(student_offsets), ends(teacher_offsets)
    bounds = torch.tensor(sorted(set(s[s >= 0].tolist()) & set(t[t >= 0].tolist())), dtype=torch.long)
    if not len(bounds):
        return torch.full_like(s, -1), torch.full_like(t, -1), bounds

    def chunk(e):
        c = torch.searchsorted(bounds, e.clamp(min=0))       # the first boundary at or after the end
        return torch.where((e >= 0) & (e <= bounds[-1]), c, torch.full_like(c, -1))
    return chunk(s), chunk(t), bounds
