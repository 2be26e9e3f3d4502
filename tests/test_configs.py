"""The example configs in configs/ load, and the seed config holds the original recipe."""

from pathlib import Path

import pytest

from stage2_train.config import load_config
from stage2_train.sweep import load_sweep

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PLACEHOLDERS = {"student": "S", "caches": ["C"]}


@pytest.mark.parametrize("path", sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("sweep")))
def test_every_config_loads(path):
    cfg = load_config(str(CONFIGS / path), dict(PLACEHOLDERS))
    assert cfg.caches == ["C"]


def test_seed_config_is_the_original_recipe():
    cfg = load_config(str(CONFIGS / "seed_qwen25_1.5b_to_0.5b.yaml"), {"caches": ["C"]})
    assert cfg.student == "Qwen/Qwen2.5-0.5B"
    assert (cfg.batch_size, cfg.grad_accum, cfg.log_every, cfg.save_every) == (2, 16, 50, 200)
    assert (cfg.lr_student, cfg.lr_projector) == (5e-5, 1e-3)
    assert (cfg.loss, cfg.alpha, cfg.beta) == ("mercator", 1.0, 0.01)


def test_sweep_example_loads():
    spec = load_sweep(CONFIGS / "sweep_example.yaml")
    assert spec["grid"] == {"loss": ["mercator", "mse"], "projector": ["head", "mlp"]}
