"""Projectors that map K or V of one geometry (heads, head_dim) into another.

All take (B, H_in, T, D_in) and return (B, H_out, T, D_out).
- linear: one Linear over the flattened heads (H_in*D_in -> H_out*D_out).
- head:   Linear D_in -> D_out on every head, then a mix of heads H_in -> H_out, started as
          group averaging (H_in a multiple of H_out) or copying (H_out a multiple of H_in).
- mlp:    LayerNorm, Linear, SiLU, Linear over the flattened heads (a bottleneck).
"""

from __future__ import annotations

import torch
from torch import nn

KINDS = ("linear", "head", "mlp")


class LinearProjector(nn.Module):
    def __init__(self, h_in, d_in, h_out, d_out):
        super().__init__()
        self.h_out, self.d_out = h_out, d_out
        self.proj = nn.Linear(h_in * d_in, h_out * d_out)

    def forward(self, x):                                       # (B, H_in, T, D_in)
        b, _, t, _ = x.shape
        y = self.proj(x.transpose(1, 2).reshape(b, t, -1))      # (B, T, H_out*D_out)
        return y.view(b, t, self.h_out, self.d_out).transpose(1, 2)


class HeadProjector(nn.Module):
    def __init__(self, h_in, d_in, h_out, d_out):
        super().__init__()
        self.dim = nn.Linear(d_in, d_out)
        self.mix = nn.Parameter(head_mix_init(h_in, h_out))    # (H_out, H_in)

    def forward(self, x):                                       # (B, H_in, T, D_in)
        y = self.dim(x)                                         # (B, H_in, T, D_out)
        return torch.einsum("oi,bitd->botd", self.mix.to(y.dtype), y)


class MLPProjector(nn.Module):
    def __init__(self, h_in, d_in, h_out, d_out, hidden: int | None = None):
        super().__init__()
        self.h_out, self.d_out = h_out, d_out
        n_in, n_out = h_in * d_in, h_out * d_out
        hidden = hidden or max(n_in, n_out) // 2
        self.net = nn.Sequential(nn.LayerNorm(n_in), nn.Linear(n_in, hidden), nn.SiLU(),
                                 nn.Linear(hidden, n_out))

    def forward(self, x):
        b, _, t, _ = x.shape
        y = self.net(x.transpose(1, 2).reshape(b, t, -1))
        return y.view(b, t, self.h_out, self.d_out).transpose(1, 2)


def head_mix_init(h_in: int, h_out: int) -> torch.Tensor:
    """(H_out, H_in): average each group of H_in/H_out heads, or copy each head H_out/H_in
    times; a uniform average when neither divides the other."""
    m = torch.zeros(h_out, h_in)
    if h_in % h_out == 0:
        g = h_in // h_out
        for o in range(h_out):
            m[o, o * g:(o + 1) * g] = 1.0 / g
    elif h_out % h_in == 0:
        g = h_out // h_in
        for o in range(h_out):
            m[o, o // g] = 1.0
    else:
        m.fill_(1.0 / h_in)
    return m


def make_projector(kind: str, h_in: int, d_in: int, h_out: int, d_out: int) -> nn.Module:
    cls = {"linear": LinearProjector, "head": HeadProjector, "mlp": MLPProjector}.get(kind)
    if cls is None:
        raise ValueError(f"projector {kind!r}: choose one of {KINDS}")
    return cls(h_in, d_in, h_out, d_out)


class KVProjector(nn.Module):
    """K and V projectors for every distilled student layer (or one pair shared by all)."""

    def __init__(self, kind: str, n_layers: int, h_in, d_in, h_out, d_out, shared: bool = False):
        super().__init__()
        n = 1 if shared else n_layers
        self.shared = shared
        self.k = nn.ModuleList(make_projector(kind, h_in, d_in, h_out, d_out) for _ in range(n))
        self.v = nn.ModuleList(make_projector(kind, h_in, d_in, h_out, d_out) for _ in range(n))

    def forward(self, i: int, k, v):
        j = 0 if self.shared else i
        return self.k[j](k), self.v[j](v)
