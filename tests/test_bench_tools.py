"""bench/compare_arms.py: paired differences read back from a bench_learn root's eval files."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
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
