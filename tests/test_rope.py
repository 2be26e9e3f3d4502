"""kava_common.rope: stored keys rotated and un-rotated as transformers' RoPE rotates them."""

import math

import pytest
import torch

from kava_common.geometry import KVGeometry
from kava_common.rope import inverse_frequencies, rotate, unrotate


def test_a_pair_turns_by_its_position_times_its_frequency_by_hand():
    rope = {"rope_theta": 10000.0, "rope_type": "default"}
    # head_dim 2: one pair, frequency theta^0 = 1, so position p turns (1, 0) by p radians
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    got = rotate(x, torch.tensor([1, 3]), rope)
    assert torch.allclose(got, torch.tensor([[math.cos(1), math.sin(1)], [-2 * math.sin(3), 2 * math.cos(3)]]),
                          atol=1e-6)
    # head_dim 4: pairs (0, 2) and (1, 3) at frequencies 1 and theta^(-1/2) = 0.01
    assert torch.allclose(inverse_frequencies(rope, 4), torch.tensor([1.0, 0.01], dtype=torch.float64))
    got = rotate(torch.tensor([[0.0, 1.0, 0.0, 0.0]]), torch.tensor([50]), rope)
    assert torch.allclose(got, torch.tensor([[0.0, math.cos(0.5), 0.0, math.sin(0.5)]]), atol=1e-6)
    # linear scaling divides the position by the factor
    lin = {"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}
    assert torch.allclose(rotate(x, torch.tensor([4, 12]), lin), rotate(x, torch.tensor([1, 3]), rope), atol=1e-6)


@pytest.mark.parametrize("arch,extra", [("qwen2", {"rope_theta": 1e6}),
                                        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}})])
def test_rotate_equals_the_models_own_rotary_embedding_and_unrotate_undoes_it(arch, extra):
    import importlib
    from transformers import AutoConfig
    cfg = AutoConfig.for_model(arch, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               num_hidden_layers=1, intermediate_size=64, vocab_size=50, **extra)
    mod = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    emb = getattr(mod, f"{'Qwen2' if arch == 'qwen2' else 'Llama'}RotaryEmbedding")(cfg)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(3, 2, 7, 16, generator=g)                     # (B, H, T, D)
    pos = torch.randint(0, 300, (3, 7), generator=g)
    cos, sin = emb(k, pos)
    want, _ = mod.apply_rotary_pos_emb(k, k, cos, sin)            # (B, H, T, D), heads share positions
    rope = KVGeometry.from_config(cfg).rope
    got = rotate(k, pos.unsqueeze(1).expand(3, 2, 7), rope)
    assert torch.allclose(got, want, atol=1e-4)
    back = unrotate(want, pos.unsqueeze(1).expand(3, 2, 7), rope)
    assert torch.allclose(back, k, atol=1e-4)
    # an empty slot (position -1, zeros) stays zeros
    assert torch.equal(unrotate(torch.zeros(1, 4), torch.tensor([-1]), rope), torch.zeros(1, 4))


def test_scalings_that_cannot_be_undone_exactly_are_refused():
    for rope, message in [({"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}, "RoPE type 'llama3'"),
                          ({"rope_theta": None, "rope_scaling": {"type": "yarn"}}, "RoPE type 'yarn'"),
                          ({"rope_type": "default"}, "give no rope_theta"),
                          ({"rope_theta": 1e4, "partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5")]:
        with pytest.raises(ValueError, match=message):
            inverse_frequencies(rope, 8)
