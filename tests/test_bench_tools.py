"""The benchmarks' tools: bench/stats.py's paired intervals, bench/compare_arms.py's reading of a
bench_learn root's eval files."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    """A bench script as a module; its own imports find bench/ first, as when it is run."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_eval(path: Path, correct: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"correct": bool(c)}) + "\n" for c in correct))


def test_compare_arms_reads_both_layouts_and_pairs_by_seed(tmp_path, capsys):
    ca = load("compare_arms")
    # arm a: a validation-trained layout (seed-s/seed-s/eval.jsonl); arm b: a scored-only one
    write_eval(tmp_path / "test" / "a" / "seed-0" / "seed-0" / "eval.jsonl", [1, 1, 0, 1])
    write_eval(tmp_path / "test" / "a" / "seed-1" / "seed-1" / "eval.jsonl", [1, 0, 0, 1])
    write_eval(tmp_path / "test" / "b" / "seed-0" / "eval.jsonl", [1, 0, 0, 0])
    write_eval(tmp_path / "test" / "b" / "seed-1" / "eval.jsonl", [0, 0, 0, 1])
    assert ca.arm_scores(tmp_path, "test", "a") == [[True, True, False, True], [True, False, False, True]]
    assert ca.main([str(tmp_path), "a-b"]) == 0
    out = capsys.readouterr().out.splitlines()
    # (3 - 1 + 2 - 1) / 8 = 0.375; nothing on validation
    assert out[0] == "validation, a - b: not both scored on validation"
    assert out[1].startswith("test, a - b: +0.375 [")


def test_compare_arms_refuses_a_seed_without_scores(tmp_path):
    ca = load("compare_arms")
    (tmp_path / "test" / "a" / "seed-0").mkdir(parents=True)
    with pytest.raises(SystemExit, match="seed-0 holds no eval.jsonl"):
        ca.arm_scores(tmp_path, "test", "a")


# --- paired confidence intervals ---------------------------------------------------------------

def test_paired_bootstrap_by_hand_and_on_known_differences():
    import numpy as np
    paired_bootstrap = load("stats").paired_bootstrap
    # one seed, two problems, the arm right on one more: resampled means are 0, 0.5 or 1 with
    # chances 1/4, 1/2, 1/4, so the 95% interval runs from 0 to 1
    r = paired_bootstrap([[1, 0]], [[0, 0]], n_boot=4000)
    assert (r["diff"], r["low"], r["high"]) == (0.5, 0.0, 1.0)
    # identical arms: no difference, whatever the draws
    g = np.random.default_rng(0)
    same = g.integers(0, 2, (5, 1000))
    r = paired_bootstrap(same, same, n_boot=500)
    assert (r["diff"], r["low"], r["high"]) == (0.0, 0.0, 0.0)
    # the arm also solves a fixed 30% of the problems the base misses, every seed: +0.3, and the
    # interval is about 0.3 +- 2 sqrt(0.21 / 1000) = +- 0.029; pairing removes the shared noise
    base = g.integers(0, 2, (5, 1000)) * (g.random((1, 1000)) < 0.7)
    arm = base.copy()
    gain = np.zeros(1000, bool)
    gain[:300] = True
    base[:, gain], arm[:, gain] = 0, 1
    r = paired_bootstrap(arm, base, n_boot=2000)
    assert r["diff"] == 0.3 and 0.26 < r["low"] < 0.3 < r["high"] < 0.34, r
    assert paired_bootstrap(arm, base, n_boot=2000) == r                   # same seed, same interval
    with pytest.raises(ValueError, match="one shape"):
        paired_bootstrap([[1, 0]], [[1, 0, 1]])
