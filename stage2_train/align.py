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
