"""The example configs in configs/ load, and the seed config holds the original recipe."""

from pathlib import Path

import pytest

from stage2_train.config import load_config
from stage2_train.sweep import load_sweep

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PLACEHOLDERS = {"student": "S", "caches": ["C"]}


def test_seed_config_is_the_original_recipe():
    cfg = load_config(str(CONFIGS / "seed_qwen25_1.5b_to_0.5b.yaml"), {"caches": ["C"]})
    assert cfg.student == "Qwen/Qwen2.5-0.5B"
    assert (cfg.batch_size, cfg.grad_accum, cfg.log_every, cfg.save_every) == (2, 16, 50, 200)
    assert (cfg.lr_student, cfg.lr_projector) == (5e-5, 1e-3)
    assert (cfg.loss, cfg.alpha, cfg.beta) == ("mercator", 1.0, 0.01)


def test_sweep_example_loads():
    spec = load_sweep(CONFIGS / "sweep_example.yaml")
    assert spec["grid"] == {"loss": ["mercator", "mse"], "projector": ["head", "mlp"]}


def write_yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_values_convert_only_when_unambiguous(tmp_path):
    """PyYAML reads 1e-4 as a string and a quoted "10" is a string: both are plain numbers."""
    cfg = load_config(write_yaml(tmp_path, 'lr_student: 1e-4\nsave_every: "10"\nmax_steps: 4.0\nalpha: 2\n'),
                      dict(PLACEHOLDERS))
    assert (cfg.lr_student, cfg.save_every, cfg.max_steps, cfg.alpha) == (1e-4, 10, 4, 2.0)
    assert type(cfg.save_every) is int and type(cfg.max_steps) is int and type(cfg.alpha) is float


@pytest.mark.parametrize("text, message", [
    ("max_steps: 2.7", "max_steps: expected int, got 2.7"),
    ('freeze_student: "no"', "freeze_student: expected bool, got 'no'"),
    ("freeze_student: 1", "freeze_student: expected bool, got 1"),
    ("lr_student: .nan", "lr_student: expected float, got nan"),
    ("lr_projector: -1.0e-3", "lr_projector must be >= 0, got -0.001"),
    ("batch_size: true", "batch_size: expected int, got True"),
    ("out: 5", "out: expected str, got 5"),
])
def test_yaml_values_of_the_wrong_type_are_refused_by_name(tmp_path, text, message):
    with pytest.raises(ValueError, match="invalid stage-2 settings") as e:
        load_config(write_yaml(tmp_path, text + "\n"), dict(PLACEHOLDERS))
    assert message in str(e.value)


def test_stage2_cli_reports_a_bad_value_in_one_line_without_a_traceback(tmp_path, capsys):
    from stage2_train.__main__ import main as cli
    rc = cli(["--config", write_yaml(tmp_path, "max_steps: 2.7\n"), "--student", "S", "--cache", "C"])
    err = capsys.readouterr().err
    assert rc == 1 and "max_steps: expected int, got 2.7" in err and "Traceback" not in err


def test_stage1_settings_are_type_checked():
    from stage1_extract.config import ExtractConfig
    with pytest.raises(ValueError, match=r"max_samples: expected int, got 'ten'"):
        ExtractConfig(teachers=["t"], max_samples="ten")
    assert ExtractConfig(teachers=["t"], shard_mb="64", layers=["0", 2]).layers == [0, 2]
    with pytest.raises(ValueError, match="--kv-quant-v-symmetric needs --kv-quant int8 or int4"):
        ExtractConfig(teachers=["t"], kv_quant_v_symmetric=True)
    assert ExtractConfig(teachers=["t"], kv_quant="int8", kv_quant_v_symmetric=True).quant.v_symmetric


def test_sweep_run_names_are_distinct_for_distinct_settings():
    from stage2_train.sweep import combos, run_name
    grid = {"layer_weights": [[1, 10], [11, 0], [110], [1, 1, 0]], "loss": ["mse", "l1"]}
    names = [run_name(v) for v in combos(grid)]
    assert len(set(names)) == len(names) == 8
    assert run_name({"loss": "mse", "kv_weight": 0.1}) == "loss-mse_kv_weight-0.1"   # readable as it was
    assert run_name({"layer_weights": [1, 10]}).startswith("layer_weights-110-")


def test_original_bottleneck_config_holds_the_original_projector():
    cfg = load_config(str(CONFIGS / "original_bottleneck.yaml"), {"caches": ["C"]})
    assert (cfg.projector, cfg.bottleneck_hidden, cfg.bottleneck_dropout, cfg.direction) == \
        ("bottleneck", 14336, 0.1, "teacher_to_student")
    assert (cfg.batch_size, cfg.grad_accum, cfg.lr_student, cfg.lr_projector) == (2, 16, 5e-5, 1e-3)


def test_runs_dir_from_the_environment_sits_below_yaml_and_flags(tmp_path, monkeypatch):
    from stage2_train.__main__ import main as cli
    from stage2_train import train as train_mod
    seen = []
    monkeypatch.setattr(train_mod, "main", lambda cfg: seen.append(cfg.out))
    monkeypatch.setenv("KAVA_RUNS_DIR", str(tmp_path / "runs"))
    assert cli(["--student", "S", "--cache", "C"]) == 0
    assert cli(["--student", "S", "--cache", "C", "--config", write_yaml(tmp_path, "out: from-yaml\n")]) == 0
    assert cli(["--student", "S", "--cache", "C", "--out", "from-flag"]) == 0
    assert seen == [str(tmp_path / "runs" / "run"), "from-yaml", "from-flag"]


def test_the_tinyllama_config_fits_8gb_at_the_real_shapes(tmp_path):
    """configs/qwen2_7b_to_tinyllama.yaml at TinyLlama-1.1B's published shape with a Qwen2-7B
    cache of every layer (28 x 4 KV heads x 128) mapped onto its 22 layers, every answer as long
    as max_length: the estimate stage 2 prints is under 7.5 GB, and training the embeddings too
    costs their gradient and 8-bit optimizer state (65.5M parameters x 4 bytes)."""
    import re
    from types import SimpleNamespace
    import numpy as np
    import torch
    from transformers import LlamaConfig
    from kava_demo.tiny import TINYLLAMA_11B
    from stage2_train.build import Teacher, memory_estimate
    LlamaConfig(**TINYLLAMA_11B).save_pretrained(tmp_path / "tinyllama")
    cfg = load_config(str(CONFIGS / "qwen2_7b_to_tinyllama.yaml"), {"caches": ["C"], "student": str(tmp_path / "tinyllama")})
    assert (cfg.loss, cfg.projector, cfg.direction, cfg.align) == ("mercator", "head", "student_to_teacher", "auto")
    cache = SimpleNamespace(layers=list(range(28)), token_segments=lambda: np.array([[[0, 10], [10, 900], [900, 901]]]))
    teachers = [Teacher(cache=cache, kv_quant=None, distilled=[(s, [(0, 1.0)]) for s in range(22)], heads=4,
                        head_dim=128, fingerprint="f", path="C", vocab=None)]

    def estimate(c):
        text = memory_estimate(c, teachers, torch.bfloat16, torch.device("cuda"))
        return float(re.search(r"estimated peak memory ([0-9.]+) GB", text).group(1))
    fixed = estimate(cfg)
    trained = estimate(load_config(str(CONFIGS / "qwen2_7b_to_tinyllama.yaml"), {
        "caches": ["C"], "student": str(tmp_path / "tinyllama"), "freeze_embeddings": False}))
    assert 6.5 < fixed < 7.5 and trained - fixed == pytest.approx(32000 * 2048 * 4 / 1024 ** 3, abs=0.011)


def test_the_latent_config_fits_8gb_at_the_real_shapes_only_with_checkpointing(tmp_path):
    """configs/kava_latent_qwen25_0.5b.yaml at Qwen2.5-0.5B's published shape, its own cache (24
    layers x 2 KV heads x 64, 8 slots) and GSM8K's longest question (~400 tokens with the prompt):
    the estimate stage 2 prints is under 7.5 GB, and over it without gradient checkpointing."""
    import re
    from types import SimpleNamespace
    import numpy as np
    import torch
    from transformers import Qwen2Config
    from kava_demo.tiny import QWEN25_05B
    from stage2_train.build import Teacher, memory_estimate
    Qwen2Config(**QWEN25_05B).save_pretrained(tmp_path / "qwen")
    over = {"caches": ["C"], "student": str(tmp_path / "qwen")}
    cfg = load_config(str(CONFIGS / "kava_latent_qwen25_0.5b.yaml"), over)
    assert (cfg.latent, cfg.jacobi_iters, cfg.latent_cot_weight, cfg.kv_weight) == (8, 3, 0.0, 10.0)
    assert (cfg.loss, cfg.projector, cfg.direction, cfg.latent_keys) == ("mercator", "head", "student_to_teacher",
                                                                         "post_rope")
    cache = SimpleNamespace(layers=list(range(24)), token_segments=lambda: np.array([[[0, 399], [399, 700], [700, 708]]]))
    teachers = [Teacher(cache=cache, kv_quant=None, distilled=[(s, [(s, 1.0)]) for s in range(24)], heads=2,
                        head_dim=64, fingerprint="f", path="C", vocab=None)]

    def estimate(c):
        text = memory_estimate(c, teachers, torch.bfloat16, torch.device("cuda"))
        assert "at batch 8 x 418 tokens (400 question, 8 latent, 10 answer; the latents' forwards 1624 tokens)" in text
        return float(re.search(r"estimated peak memory ([0-9.]+) GB", text).group(1))
    assert 4.0 < estimate(cfg) < 7.5
    assert estimate(load_config(str(CONFIGS / "kava_latent_qwen25_0.5b.yaml"), {**over,
                                                                                "gradient_checkpointing": False})) > 7.5
