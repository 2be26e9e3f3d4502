"""kava_common.cache.quant: KIVI-style int8/int4 K/V, checked by hand and against its bound."""

import pytest
import torch

from kava_common.cache.quant import (KVQuant, dequantize_k, dequantize_v, pack, quantize_k, quantize_v,
                                     stored_bytes_per_token, unpack)


def with_outlier_channel(t=37, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, d, generator=g)
    x[:, 1, 3] = 40 + torch.randn(t, generator=g)          # one channel large at every token, as keys have
    return x


def test_int4_by_hand():
    q = KVQuant(4, 4)
    v = torch.tensor([[[0.0, 1.0, 2.0, 3.0]], [[-1.5, -1.5, -1.5, -1.5]]])      # (T 2, H 1, D 4)
    got = quantize_v(v, q)
    # token 0: low 0, scale 3/15 = 0.2 (float16 rounded up: 0.2000732421875), codes round(x / scale)
    scale0 = torch.tensor(0.2, dtype=torch.float16)
    scale0 = scale0 if scale0.float() >= 0.2 else torch.nextafter(scale0, torch.tensor(1.0, dtype=torch.float16))
    assert got["low"][0, 0, 0] == 0 and got["scale"][0, 0, 0] == scale0
    codes = torch.round(torch.tensor([0.0, 1.0, 2.0, 3.0]) / scale0.float())
    assert codes.tolist() == [0, 5, 10, 15]
    assert got["codes"][0, 0].tolist() == [0 | 5 << 4, 10 | 15 << 4]       # two codes a byte, even in the low nibble
    # token 1 is constant: code 0 and low -1.5 give it back exactly
    assert got["codes"][1, 0].tolist() == [0, 0] and got["low"][1, 0, 0] == -1.5
    back = dequantize_v(got["codes"], got["scale"], got["low"], q)
    assert torch.equal(back[1], v[1]) and (back[0] - v[0]).abs().max() <= scale0.float() / 2


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [4, 16])
def test_error_within_half_a_step_per_group_with_an_outlier_channel(bits, group):
    q = KVQuant(bits, group)
    x = with_outlier_channel()
    k = quantize_k(x, q)
    assert k["codes"].dtype == torch.uint8 and k["codes"].shape == (37, 2, 8 * bits // 8)
    assert k["scale"].shape == (-(-37 // group), 2, 8) and k["scale"].dtype == torch.float16
    back = dequantize_k(k["codes"], k["scale"], k["low"], q)
    step = k["scale"].float().repeat_interleave(group, 0)[:37]          # each value's own group scale
    assert ((back - x).abs() <= step / 2 + 1e-5 * x.abs().clamp(min=1)).all()
    # per channel, the outlier's offset of 40 costs the other channels nothing: their steps stay
    # those of a unit normal (range ~6), not of a range of ~45
    normal = torch.ones(2, 8, dtype=torch.bool)
    normal[1, 3] = False
    assert k["scale"][:, normal].float().max() < 8 / q.levels
    for span, shape in (("head", (37, 2, 8 // min(group, 8))), ("token", (37, 1, 16 // group))):
        qv = KVQuant(bits, group, span)
        v = quantize_v(x, qv)
        assert v["scale"].shape == shape, span
        back = dequantize_v(v["codes"], v["scale"], v["low"], qv)
        step = v["scale"].float().repeat_interleave(16 // shape[1] // shape[2], -1).view(37, 2, 8)  # per value
        assert ((back - x).abs() <= step / 2 + 1e-5 * x.abs().clamp(min=1)).all(), span


def test_a_value_group_spans_the_kv_heads_of_a_token_by_hand():
    """v_span token, group 4 over 2 heads x head_dim 2: one group per token, its range over both
    heads; v_span head: a group per head, each with its own range."""
    v = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])                         # (T 1, H 2, D 2)
    got = quantize_v(v, KVQuant(8, 4, "token"))
    step = torch.tensor(3 / 255, dtype=torch.float16)                     # range 3 in 255 steps, up
    step = step if step.float() >= 3 / 255 else torch.nextafter(step, torch.tensor(1.0, dtype=torch.float16))
    assert got["scale"].shape == (1, 1, 1) and got["low"].item() == 0 and got["scale"].item() == step.item()
    assert torch.equal(got["codes"].float(), torch.round(v / got["scale"].float()))
    per_head = quantize_v(v, KVQuant(8, 4, "head"))
    assert per_head["scale"].shape == (1, 2, 1) and per_head["low"].flatten().tolist() == [0.0, 2.0]
    for q, t in ((KVQuant(8, 4, "token"), got), (KVQuant(8, 4, "head"), per_head)):
        back = dequantize_v(t["codes"], t["scale"], t["low"], q)
        assert (back - v).abs().max() <= t["scale"].float().max() / 2


def _up16(x: float) -> float:
    h = torch.tensor(x, dtype=torch.float16)
    return float(h if h.float() >= x else torch.nextafter(h, torch.tensor(1e4, dtype=torch.float16)))


@pytest.mark.parametrize("bits,half", [(8, 128), (4, 8)])
def test_symmetric_values_by_hand(bits, half):
    """One group of 4: max |x| = 2, scale 2 / (half - 1) rounded up to float16, codes
    round(x / scale) + half, no low stored; zero reads back exactly."""
    q = KVQuant(bits, 4, v_symmetric=True)
    v = torch.tensor([[[0.0, 1.0, -2.0, 0.5]]])                          # (T 1, H 1, D 4)
    got = quantize_v(v, q)
    assert set(got) == {"codes", "scale"}
    scale = _up16(2 / (half - 1))
    assert got["scale"].item() == scale
    codes = (torch.round(v[0, 0] / scale) + half).tolist()
    assert codes[0] == half and codes[2] == half - round(2 / scale) >= 0
    assert unpack(got["codes"], bits)[0, 0].tolist() == codes
    back = dequantize_v(got["codes"], got["scale"], None, q)
    assert back[0, 0, 0] == 0 and (back - v).abs().max() <= scale / 2
    assert torch.equal(back[0, 0], (torch.tensor(codes) - half) * scale)


@pytest.mark.parametrize("bits", [8, 4])
def test_symmetric_values_within_half_a_step_with_a_group_far_from_zero(bits):
    """The bound holds for every value, also where a token's values sit far from zero (the
    range is then about twice an asymmetric group's)."""
    x = with_outlier_channel()
    x[5] += 30.0
    for span in ("token", "head"):
        q = KVQuant(bits, 8, span, v_symmetric=True)
        v = quantize_v(x, q)
        back = dequantize_v(v["codes"], v["scale"], None, q)
        step = v["scale"].float().repeat_interleave(8, -1).view(37, 2, 8)
        assert ((back - x).abs() <= step / 2 + 1e-5 * x.abs().clamp(min=1)).all(), span
        plain = quantize_v(x, KVQuant(bits, 8, span))
        assert (v["scale"].float() >= plain["scale"].float() * 0.99).all()       # never a finer step


def test_k_groups_stay_inside_the_sample_and_a_short_last_group_works():
    q = KVQuant(8, 16)
    x = with_outlier_channel(t=20)
    k = quantize_k(x, q)
    assert k["scale"].shape[0] == 2                                       # tokens 0-15, then 16-19
    lo = x[16:].amin(0)
    assert (k["low"][1].float() <= lo).all() and (lo - k["low"][1].float() < 0.05).all()


def test_pack_unpack_and_cosines():
    codes = torch.randint(0, 16, (5, 3, 8), dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, 4), 4), codes) and pack(codes, 4).shape == (5, 3, 4)
    x = torch.randn(300, 2, 128)
    for bits, want in ((8, 0.9999), (4, 0.99)):
        q = KVQuant(bits, 128)
        for quant, deq in ((quantize_k, dequantize_k), (quantize_v, dequantize_v)):
            t = quant(x, q)
            cos = torch.nn.functional.cosine_similarity(deq(t["codes"], t["scale"], t["low"], q).flatten(1),
                                                        x.flatten(1)).mean()
            assert cos > want, (bits, quant.__name__, float(cos))


def test_bytes_per_token_by_hand():
    # Qwen2.5-1.5B: 28 layers x 2 KV heads x head_dim 128; float16 28,672 B/token
    assert stored_bytes_per_token(None, 2, 128, 28) == 28672
    # int4, group 128, 256-token samples, per layer: codes 2 x 2 x 128 / 2 = 256 B, K groups
    # 2 x 128 x 2 / 256 = 2 and V groups 2 x 128 / 128 = 2 per token, 4 B (scale + low) each
    assert stored_bytes_per_token(KVQuant(4, 128), 2, 128, 28, tokens_per_sample=256) == 28 * (256 + 8 + 8)
    assert stored_bytes_per_token(KVQuant(8, 128), 2, 128, 28, tokens_per_sample=256) == 28 * (512 + 8 + 8)
    assert stored_bytes_per_token(KVQuant(4, 128, "head"), 2, 128, 28, tokens_per_sample=256) == 28 * (256 + 8 + 8)
    # the learning benchmark's teacher, 2 KV heads x head_dim 32 (float16: 256 B per layer): codes
    # 64 B; K groups 2 x 32 x 2 / 256 = 0.5 per token; V groups 64 / 64 = 1 per token over both
    # heads, or 2 inside each head; 4 B each
    assert stored_bytes_per_token(KVQuant(4, 128), 2, 32, 1, tokens_per_sample=256) == 64 + 4 * 1.5    # 0.273x
    assert stored_bytes_per_token(KVQuant(4, 128, "head"), 2, 32, 1, tokens_per_sample=256) == 64 + 4 * 2.5
    # symmetric values store a 2-byte scale per group: int8, 115-token samples (the benchmark's):
    # codes 128 B, K groups 64 / 115 per token at 4 B, V one group at 2 B; float16 256 B
    sym = stored_bytes_per_token(KVQuant(8, 128, v_symmetric=True), 2, 32, 1, tokens_per_sample=115)
    assert sym == 128 + 4 * 64 / 115 + 2 and sym / 256 < 0.52
    assert stored_bytes_per_token(KVQuant(8, 128), 2, 32, 1, tokens_per_sample=115) == 128 + 4 * 64 / 115 + 4
    with pytest.raises(ValueError, match="head_dim 24 is not a multiple of the V quantization group 16"):
        quantize_v(torch.randn(3, 1, 24), KVQuant(4, 16, "head"))
    with pytest.raises(ValueError, match="KV heads x head_dim 48 is not a multiple of the V quantization "
                                         "group 32; choose a --kv-quant-group"):
        quantize_v(torch.randn(3, 2, 24), KVQuant(4, 32))
