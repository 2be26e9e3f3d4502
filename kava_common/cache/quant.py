"""Quantized K/V for the cache: int8 or int4 codes in groups, as KIVI does (Liu et al. 2024,
"KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache").

Keys have a few outlier channels, large at every token; values do not. So keys are quantized
per channel (a group is `group` consecutive tokens of one channel of one head, within one
sample) and values per token (a group is `group` consecutive channels of one token's values,
its KV heads side by side: v_span "token"; caches written with v_span "head" keep each group
inside one head, which at a small head_dim stores a group per 32 or 64 values). Each group
stores float16 `scale` and `low`; a value x becomes the code
round((x - low) / scale) in [0, 2^bits - 1], and reads back as code * scale + low. `low` is
rounded down and `scale` up to float16, so every value of the group stays on the code range
and the error of each value is at most scale / 2 (plus float32 rounding): the bound the tests
check. int4 codes are packed two per byte along head_dim (even channel in the low nibble).

Symmetric values (v_symmetric) store no `low`: a value group's codes are centred on
h = 2^(bits - 1), scale = max|x| / (h - 1) rounded up, code = round(x / scale) + h, and the
value reads back as code * scale - h * scale, error again at most scale / 2. Half the value
groups' bytes for a step about twice as wide; values, unlike keys, have no channel far from
zero, so at int8 the cosines stay as they were, while int4 values lose a little
(docs/benchmarks.md).

Shapes for one sample of T tokens (H heads, D = head_dim, G = group):
    K: codes (T, H, D * bits / 8) uint8; scale, low (ceil(T / G), H, D) float16
    V: codes (T, H, D * bits / 8) uint8; scale, low (T, 1, H * D / G) float16, G = min(group, H * D)
       (v_span "head": (T, H, D / G), G = min(group, D)); G must divide the channels it groups;
       no low when v_symmetric
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_QUANT = ("none", "int8", "int4")
# the per-layer tensors of K/V in a shard, `{prefix}.{layer}` (the codes in k./v. when quantized)
KV_TENSORS = ("k", "v", "k_scale", "k_low", "v_scale", "v_low")


V_SPANS = ("token", "head")


@dataclass(frozen=True)
class KVQuant:
    bits: int           # 8 or 4
    group: int          # tokens per K group, channels per V group
    v_span: str = "token"   # a V group spans a token's KV heads ("token") or stays in one ("head")
    v_symmetric: bool = False   # V groups store a scale only, codes centred on 2^(bits - 1)

    @classmethod
    def parse(cls, name: str, group: int, v_span: str = "token", v_symmetric: bool = False) -> "KVQuant | None":
        if name == "none":
            return None
        if name not in KV_QUANT:
            raise ValueError(f"kv quantization {name!r}: choose one of {KV_QUANT}")
        if v_span not in V_SPANS:
            raise ValueError(f"value group span {v_span!r}: choose one of {V_SPANS}")
        return cls(int(name[3:]), group, v_span, v_symmetric)

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def half(self) -> int:
        """The code of zero in a symmetric group."""
        return 1 << (self.bits - 1)

    def v_channels(self, heads: int, head_dim: int) -> int:
        """The channels of one token that V groups divide: all KV heads', or one head's."""
        return heads * head_dim if self.v_span == "token" else head_dim

    def v_group(self, heads: int, head_dim: int) -> int:
        """Channels per V group: `group`, or all the channels it divides when fewer."""
        return min(self.group, self.v_channels(heads, head_dim))

    def check_geometry(self, heads: int, head_dim: int) -> None:
        """Refuse a group that does not divide the value channels it groups."""
        n, g = self.v_channels(heads, head_dim), self.v_group(heads, head_dim)
        if n % g:
            raise ValueError(f"{'KV heads x head_dim' if self.v_span == 'token' else 'head_dim'} {n} is not "
                             f"a multiple of the V quantization group {g}; choose a --kv-quant-group that "
                             "divides it")

    def describe(self) -> dict:
        d = {"scheme": "kivi", "bits": self.bits, "group": self.group,
             "k": "per channel, groups of `group` tokens within a sample",
             "v": "per token, groups of `group` channels (all of head_dim when smaller)",
             "scale_dtype": "float16"}
        if self.v_span == "token":    # caches written before v_span keep their description
            d.update(v="per token, groups of `group` channels over the token's KV heads (all of "
                       "them when fewer)", v_span="token")
        if self.v_symmetric:
            d.update(v_symmetric=True)
        return d

    @classmethod
    def from_manifest(cls, d: dict | None) -> "KVQuant | None":
        """The scheme a manifest's `kv_quant` records (no `v_span`: groups inside one head)."""
        return cls(d["bits"], d["group"], d.get("v_span", "head"), d.get("v_symmetric", False)) if d else None


def _down(x: torch.Tensor) -> torch.Tensor:
    """float16 of x rounded towards minus infinity."""
    h = x.to(torch.float16)
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -torch.inf)), h)


def _up(x: torch.Tensor) -> torch.Tensor:
    """float16 of x rounded towards plus infinity."""
    h = x.to(torch.float16)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, torch.inf)), h)


def _grouped(x: torch.Tensor, q: KVQuant, symmetric: bool = False):
    """Codes (same shape as x, uint8), scale and low (x.shape[:-1] + (groups,); low None when
    `symmetric`) of x grouped along its last dimension in groups of q.group; a short last group
    takes what is left."""
    n = x.shape[-1]
    g = q.group
    pad = -n % g
    xp = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1) if pad else x   # edge copies: same min/max
    xg = xp.reshape(*x.shape[:-1], -1, g)
    if symmetric:
        scale = _up(xg.abs().amax(-1) / (q.half - 1))
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = (torch.round(xg / scale.float()[..., None]) + q.half).clamp_(0, q.levels)
        return codes.to(torch.uint8).reshape(*x.shape[:-1], -1)[..., :n], scale, None
    low = _down(xg.amin(-1))
    span = xg.amax(-1) - low.float()
    scale = _up(span / q.levels)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))     # a constant group: any scale is exact
    codes = torch.round((xg - low.float()[..., None]) / scale.float()[..., None]).clamp_(0, q.levels)
    return codes.to(torch.uint8).reshape(*x.shape[:-1], -1)[..., :n], scale, low


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes
    lo, hi = codes[..., 0::2], codes[..., 1::2]
    return lo | (hi << 4)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    out = torch.stack([packed & 0x0F, packed >> 4], dim=-1)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_k(k: torch.Tensor, q: KVQuant) -> dict[str, torch.Tensor]:
    """Keys (T, H, D) of one sample, per channel in groups of q.group tokens."""
    x = k.float().permute(1, 2, 0)                                     # (H, D, T): tokens last
    codes, scale, low = _grouped(x, q)
    return {"codes": pack(codes.permute(2, 0, 1).contiguous(), q.bits),
            "scale": scale.permute(2, 0, 1).contiguous(), "low": low.permute(2, 0, 1).contiguous()}


def dequantize_k(codes, scale, low, q: KVQuant, dtype=torch.float32) -> torch.Tensor:
    """Keys (T, H, D) back from quantize_k's tensors (scale, low: (groups, H, D))."""
    c = unpack(codes, q.bits).float()                                  # (T, H, D)
    group = torch.arange(c.shape[0]) // q.group                        # each token's key group
    return (c * scale[group].float() + low[group].float()).to(dtype)


def quantize_v(v: torch.Tensor, q: KVQuant) -> dict[str, torch.Tensor]:
    """Values (T, H, D) of one sample, per token in groups of q.v_group(H, D) channels."""
    t, h, d = v.shape
    q.check_geometry(h, d)
    x = v.float().reshape(t, -1, q.v_channels(h, d))                   # (T, 1 or H, channels)
    codes, scale, low = _grouped(x, KVQuant(q.bits, q.v_group(h, d)), q.v_symmetric)
    out = {"codes": pack(codes.view(t, h, d), q.bits), "scale": scale}
    return out if low is None else dict(out, low=low)


def v_low(scale: torch.Tensor, low: torch.Tensor | None, q: KVQuant) -> torch.Tensor:
    """The value groups' `low` in float32: stored, or -2^(bits - 1) x scale when symmetric."""
    return low.float() if low is not None else scale.float() * -q.half


def dequantize_v(codes, scale, low, q: KVQuant, dtype=torch.float32) -> torch.Tensor:
    """Values (T, H, D) back from quantize_v's tensors (scale, low: (T, 1 or H, groups); low
    None when symmetric)."""
    c = unpack(codes, q.bits).float()
    t, h, d = c.shape
    c = c.view(t, *scale.shape[1:], -1)                                # (T, 1 or H, groups, G)
    return (c * scale.float()[..., None] + v_low(scale, low, q)[..., None]).view(t, h, d).to(dtype)


def stored_bytes_per_token(q: KVQuant | None, heads: int, head_dim: int, layers: int,
                           fp_bytes: int = 2, tokens_per_sample: float = 256.0) -> float:
    """Bytes per token of K and V over all layers: codes plus the groups' scale and low (scale
    only for symmetric values; K's token groups amortised over `tokens_per_sample`: a sample's
    last group is short)."""
    if q is None:
        return 2 * layers * heads * head_dim * fp_bytes
    codes = 2 * heads * head_dim * q.bits / 8
    k_groups = heads * head_dim * (-(-tokens_per_sample // q.group)) / tokens_per_sample
    v_groups = heads * head_dim / q.v_group(heads, head_dim)
    return layers * (codes + 4 * k_groups + (2 if q.v_symmetric else 4) * v_groups)


def quantize_shard(tensors: dict[str, torch.Tensor], layers: list[int], q: KVQuant) -> tuple[dict, dict]:
    """A shard's tensors with each layer's float K and V (N, H, D) replaced by their codes
    (`k.{l}`, `v.{l}`) and groups (`k_scale.{l}`, `k_low.{l}`, `v_scale.{l}`, `v_low.{l}` unless
    symmetric), and
    `k_group_offsets` (n+1,): sample j's key groups are rows [off[j], off[j+1]) of k_scale;
    with the shard's report (`shard_report`) for its manifest entry."""
    off = tensors["sample_offsets"].tolist()
    spans = list(zip(off[:-1], off[1:]))
    out = {name: t for name, t in tensors.items() if not name.startswith(("k.", "v."))}
    out["k_group_offsets"] = torch.tensor([0] + [-(-(b - a) // q.group) for a, b in spans]).cumsum(0)
    for l in layers:
        k = tensors[f"k.{l}"]
        _, h, d = k.shape
        parts = [quantize_k(k[a:b], q) for a, b in spans]
        empty = {"codes": torch.zeros(0, h, d * q.bits // 8, dtype=torch.uint8),
                 "scale": torch.zeros(0, h, d, dtype=torch.float16), "low": torch.zeros(0, h, d, dtype=torch.float16)}
        for part in ("codes", "scale", "low"):
            name = "k." if part == "codes" else f"k_{part}."
            out[name + str(l)] = torch.cat([p[part] for p in parts]) if parts else empty[part]
        v = quantize_v(tensors[f"v.{l}"], q)
        out[f"v.{l}"], out[f"v_scale.{l}"] = v["codes"], v["scale"]
        if "low" in v:
            out[f"v_low.{l}"] = v["low"]
    return out, shard_report(tensors, out, layers, q)


def read_layer(read, layer: int, tokens: tuple[int, int], groups: tuple[int, int], q: KVQuant,
               dtype=torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V (T, H, D) of one sample and layer of a quantized shard, dequantized into `dtype`.
    `read(name, start, stop)` reads rows of a shard tensor; `tokens` is the sample's token
    rows, `groups` its rows of the key groups (k_group_offsets)."""
    p = read_packed(read, layer, tokens, groups, q)
    return (dequantize_k(p["k_codes"], p["k_scale"], p["k_low"], q, dtype),
            dequantize_v(p["v_codes"], p["v_scale"], p.get("v_low"), q, dtype))


# the packed tensors of one sample's layer as `read_packed` returns them (no v_low when values
# are symmetric), and their batched (padded) forms that `dequantize_batch` turns into K and V
# on the device
PACKED = ("k_codes", "k_scale", "k_low", "v_codes", "v_scale", "v_low")


def read_packed(read, layer: int, tokens: tuple[int, int], groups: tuple[int, int],
                q: KVQuant) -> dict[str, torch.Tensor]:
    """One sample's layer of a quantized shard as stored: codes (T, H, D * bits / 8), key
    groups (ceil(T / G), H, D), value groups (T, H, D / G); see `read_layer` for the arguments."""
    (a, b), (ga, gb) = tokens, groups
    out = {"k_codes": read(f"k.{layer}", a, b), "k_scale": read(f"k_scale.{layer}", ga, gb),
           "k_low": read(f"k_low.{layer}", ga, gb), "v_codes": read(f"v.{layer}", a, b),
           "v_scale": read(f"v_scale.{layer}", a, b)}
    if not q.v_symmetric:
        out["v_low"] = read(f"v_low.{layer}", a, b)
    return out


def dequantize_batch(packed: dict[str, torch.Tensor], q: KVQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V (B, L, H, T, D) float32, contiguous, from batched packed tensors (B, L, T or groups, H, ...),
    wherever they are (on the GPU: only codes and groups crossed from the host), and `lengths`
    (B,): each sample's tokens, zeros after them. Each value is code * scale + low in float32,
    as `dequantize_k` / `dequantize_v` compute it."""
    kc = unpack(packed["k_codes"], q.bits)                             # (B, L, T, H, D) uint8
    b, l, t, h, d = kc.shape
    groups = -(-t // q.group)
    scale, low = packed["k_scale"].float(), packed["k_low"].float()   # (B, L, groups stored, H, D)
    if scale.shape[2] < groups:     # rows past every sample's end (zeroed below) may need more
        more = (0, 0, 0, 0, 0, groups - scale.shape[2])
        scale, low = torch.nn.functional.pad(scale, more), torch.nn.functional.pad(low, more)
    kc = torch.nn.functional.pad(kc, (0, 0, 0, 0, 0, groups * q.group - t)).view(b, l, groups, q.group, h, d)
    # one pass per tensor: broadcast each group's scale and low over its tokens
    k = torch.addcmul(low[:, :, :groups, None], kc.float(), scale[:, :, :groups, None]).view(b, l, -1, h, d)[:, :, :t]
    vc = unpack(packed["v_codes"], q.bits).view(b, l, t, *packed["v_scale"].shape[3:], -1)
    v = torch.addcmul(v_low(packed["v_scale"], packed.get("v_low"), q)[..., None], vc.float(),
                      packed["v_scale"].float()[..., None])
    # values' groups are per token, zero past a sample's end already; a key group can straddle it
    inside = torch.arange(t, device=kc.device) < packed["lengths"].to(kc.device)[:, None]
    k = k * inside[:, None, :, None, None].float()
    # contiguous as a float cache's batch is: the loss's ops on transposed views cost more than
    # the copy (docs/benchmarks.md)
    return k.transpose(2, 3).contiguous(), v.view(b, l, t, h, d).transpose(2, 3).contiguous()


def shard_report(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], layers: list[int],
                 q: KVQuant) -> dict:
    """What quantizing a shard cost and saved: the bytes of its K/V tensors (codes and groups)
    and the mean cosine of dequantized to original K and V vectors, over every layer of the
    shard's first and last sample (a sample of its tokens, cheap to take while writing)."""
    kv_bytes = sum(t.numel() * t.element_size() for name, t in after.items()
                   if name.split(".")[0] in KV_TENSORS)
    off, goff = after["sample_offsets"].tolist(), after["k_group_offsets"].tolist()
    read = lambda name, a, b: after[name][a:b]
    cos = {"k": [], "v": []}
    n = len(off) - 1
    for j in sorted({0, n - 1}) if n else []:
        for l in layers:
            k, v = read_layer(read, l, (off[j], off[j + 1]), (goff[j], goff[j + 1]), q, torch.float32)
            for name, got in (("k", k), ("v", v)):
                ref = before[f"{name}.{l}"][off[j]:off[j + 1]].float()
                cos[name].append(torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean().item())
    return {"kv_bytes": kv_bytes, "k_cosine": sum(cos["k"]) / max(len(cos["k"]), 1),
            "v_cosine": sum(cos["v"]) / max(len(cos["v"]), 1)}
