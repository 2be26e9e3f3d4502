"""Undoing a stored key's rotary position embedding (RoPE), from the RoPE settings a cache's
manifest records (`KVGeometry.rope`).

Stage 1 stores keys after RoPE (docs/cache.md). A key rotated at position p is x cos(p f) +
rotate_half(x) sin(p f), per frequency f of the pair (i, i + D/2), as Llama-style decoders in
transformers apply it; rotating by -p gives x back exactly (up to rounding). Supported: the
default RoPE and linear position scaling (positions divided by the factor). Other scalings (llama3,
yarn, dynamic NTK, ...) change the frequencies or the magnitudes by rules of their own and are
refused rather than undone approximately.
"""

from __future__ import annotations

import torch

SUPPORTED = ("default", "linear")


def rope_type(rope: dict) -> str:
    """The RoPE type of a manifest's rope settings (transformers 5 `rope_parameters`, or the
    4.x pair of rope_theta and rope_scaling)."""
    scaling = rope.get("rope_scaling") or {}
    return rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"


def inverse_frequencies(rope: dict, head_dim: int) -> torch.Tensor:
    """(head_dim / 2,) float64: the angle per position of each rotated pair."""
    kind = rope_type(rope)
    if kind not in SUPPORTED:
        raise ValueError(f"RoPE type {kind!r}: keys can be un-rotated for {SUPPORTED} only")
    theta = rope.get("rope_theta")
    if not theta:
        raise ValueError(f"the RoPE settings {rope} give no rope_theta")
    partial = rope.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1.0):
        raise ValueError(f"partial_rotary_factor {partial}: keys can be un-rotated for a full rotation only")
    inv = 1.0 / (float(theta) ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if kind == "linear":
        factor = rope.get("factor") or (rope.get("rope_scaling") or {}).get("factor")
        inv = inv / float(factor)
    return inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (-b, a) over the last axis's halves: the pair partner RoPE mixes in."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rotate(x: torch.Tensor, positions: torch.Tensor, rope: dict, sign: float = 1.0) -> torch.Tensor:
    """x (..., T, D) rotated as RoPE rotates it at `positions` (..., T) (sign -1: the rotation
    undone), computed in float64 and returned in float32."""
    d = x.shape[-1]
    angle = positions.to(torch.float64).unsqueeze(-1) * inverse_frequencies(rope, d)      # (..., T, D/2)
    angle = torch.cat([angle, angle], -1)
    cos, sin = angle.cos(), sign * angle.sin()
    x = x.to(torch.float64)
    return (x * cos + rotate_half(x) * sin).float()


def unrotate(k: torch.Tensor, positions: torch.Tensor, rope: dict) -> torch.Tensor:
    """Keys stored after RoPE, (..., T, D), at `positions` (..., T), back to before it (float32).
    A negative position (an empty R-KV slot) is taken as 0, which leaves its zeros as they are."""
    return rotate(k, positions.clamp(min=0), rope, sign=-1.0)
