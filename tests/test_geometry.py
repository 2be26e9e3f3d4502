import pytest
from transformers import LlamaConfig, Qwen2Config

from kava_common.geometry import KVGeometry, dtype_bytes

# (config, layers, kv heads, head_dim, K+V bytes per token in fp16) from design.md's table,
# built from the published hyperparameters (no download).
MODELS = {
    "Qwen2.5-0.5B": (Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                 num_key_value_heads=2), 24, 2, 64, 12288),
    "Qwen2.5-1.5B": (Qwen2Config(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                 num_key_value_heads=2), 28, 2, 128, 28672),
    "Qwen2-7B": (Qwen2Config(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                             num_key_value_heads=4), 28, 4, 128, 57344),
    "TinyLlama-1.1B": (LlamaConfig(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                                   num_key_value_heads=4), 22, 4, 64, 22528),
    "Llama-3.2-1B": (LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                 num_key_value_heads=8, head_dim=64), 16, 8, 64, 32768),
}


@pytest.mark.parametrize("name", MODELS)
def test_geometry_table(name):
    cfg, layers, kv, hd, bpt = MODELS[name]
    g = KVGeometry.from_config(cfg)
    assert (g.num_layers, g.num_kv_heads, g.head_dim) == (layers, kv, hd)
    assert g.bytes_per_token("float16") == bpt
    assert g.bytes_per_token("float32") == 2 * bpt
    assert g.bytes_per_token("bfloat16", layers=[0, 5]) == 2 * 2 * kv * hd * 2


def test_head_dim_from_config_wins_over_hidden_over_heads():
    g = KVGeometry.from_config(Qwen2Config(hidden_size=64, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=32))
    assert g.head_dim == 32 and g.num_kv_heads == 2 and g.num_attention_heads == 4
    assert g.rope["rope_theta"] == 10000.0


def test_gsm8k_estimate_matches_design_notes():
    g = KVGeometry.from_config(MODELS["Qwen2.5-1.5B"][0])
    assert 46e9 < 7473 * 220 * g.bytes_per_token() < 48e9     # "about 47 GB"


def test_unknown_dtype():
    with pytest.raises(ValueError, match="unknown kv dtype 'int3'"):
        dtype_bytes("int3")
