"""Projectors that map K or V of one geometry (heads, head_dim) into another.

All take (B, H_in, T, D_in) and return (B, H_out, T, D_out).
- linear: one Linear over the flattened heads (H_in*D_in -> H_out*D_out).
- head:   Linear D_in -> D_out on every head, then a mix of heads H_in -> H_out, started as
          group averaging (H_in a multiple of H_out) or copying (H_out a multiple of H_in).
- mlp:    LayerNorm, Linear, SiLU, Linear over the flattened heads (a bottleneck).
- bottleneck: every layer at once (the original research code's "Elastic Bottleneck"): per
          token the K (or V) of all layers concatenated, LayerNorm, Linear, SiLU, Dropout,
          Linear, split into the other side's layers and heads. Takes (B, L_in, H_in, T, D_in)
          and returns (B, L_out, H_out, T, D_out); no layer map applies.
- identity: no weights, K/V compared as they are; both sides of the same heads and head_dim
          (a student distilled from its own teacher mode, as KaVa's latent student is), so that
          the loss moves the student's K/V rather than a projector fitted to them.
"""

from __future__ import annotations

import torch
from torch import nn

KINDS = ("linear", "head", "mlp", "bottleneck", "identity")


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


class IdentityProjector(nn.Module):
    def __init__(self, h_in, d_in, h_out, d_out):
        super().__init__()
        if (h_in, d_in) != (h_out, d_out):
            raise ValueError(f"projector identity needs the same KV heads and head_dim on both sides, got "
                             f"{h_in} x {d_in} -> {h_out} x {d_out}: choose linear, head or mlp")

    def forward(self, x):
        return x


class BottleneckProjector(nn.Module):
    """All layers into all layers. For Qwen2.5-1.5B -> 0.5B (28 x 2 x 128 = 7,168 -> 24 x 2 x 64
    = 3,072) with the default hidden width 2 x 7,168 it has 146,832,384 parameters; the original
    reported 146,849,792 (17,408 more, as if its LayerNorm sat on the hidden width and one more
    3,072-vector were learned), while its code normalised the input, as this does."""

    def __init__(self, l_in, h_in, d_in, l_out, h_out, d_out, hidden: int = 0, dropout: float = 0.1):
        super().__init__()
        self.out_shape = (l_out, h_out, d_out)
        n_in, n_out = l_in * h_in * d_in, l_out * h_out * d_out
        hidden = hidden or 2 * n_in
        self.net = nn.Sequential(nn.LayerNorm(n_in), nn.Linear(n_in, hidden), nn.SiLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_out))

    def forward(self, x):                                       # (B, L_in, H_in, T, D_in)
        b, _, _, t, _ = x.shape
        y = self.net(x.permute(0, 3, 1, 2, 4).reshape(b, t, -1))  # (B, T, L_out*H_out*D_out)
        return y.view(b, t, *self.out_shape).permute(0, 2, 3, 1, 4)


def bottleneck_params(n_in: int, n_out: int, hidden: int = 0) -> int:
    """Parameters of one BottleneckProjector from n_in to n_out values per token."""
    hidden = hidden or 2 * n_in
    return 2 * n_in + n_in * hidden + hidden + hidden * n_out + n_out


class BottleneckKV(nn.Module):
    """One bottleneck for K and one for V (or one for both, `shared`), over all layers."""

    def __init__(self, dims_in: tuple[int, int, int], dims_out: tuple[int, int, int], hidden: int = 0,
                 dropout: float = 0.1, shared: bool = False):
        super().__init__()
        self.k = BottleneckProjector(*dims_in, *dims_out, hidden=hidden, dropout=dropout)
        self.v = self.k if shared else BottleneckProjector(*dims_in, *dims_out, hidden=hidden, dropout=dropout)

    def forward(self, k, v):
        return self.k(k), self.v(v)


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
    cls = {"linear": LinearProjector, "head": HeadProjector, "mlp": MLPProjector,
           "identity": IdentityProjector}.get(kind)
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
