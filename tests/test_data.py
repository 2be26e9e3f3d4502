import re
from pathlib import Path

import pytest

from conftest import write_jsonl
from kava_common.data import load_rows
from kava_common.synthetic import synthetic_problems

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "gsm8k"


def test_synthetic_is_gsm8k_format_and_arithmetic_is_right():
    probs = synthetic_problems(300, "train", seed=1)
    for q, a in probs:
        assert q.endswith("have now?")
        notes = re.findall(r"<<([^=]+)=(\d+)>>", a)
        assert notes, a
        for expr, val in notes:
            assert eval(expr.replace("/", "//")) == int(val), (expr, val)
        final = a.splitlines()[-1]
        assert final.startswith("#### ")
        last_result = re.findall(r">>(\d+)", a)[-1]
        assert final == f"#### {last_result}"


def test_synthetic_varied_wording_keeps_the_arithmetic():
    varied = synthetic_problems(300, "train", seed=1, varied=True)
    assert varied == synthetic_problems(300, "train", seed=1, varied=True)
    assert varied[0][0].split(".")[0] == synthetic_problems(1, "train", seed=1)[0][0].split(".")[0]
    openings, swapped = set(), 0
    for q, a in varied:
        assert q.endswith("have now?")
        notes = re.findall(r"<<([^=]+)=(\d+)>>", a)
        for expr, val in notes:
            assert eval(expr.replace("/", "//")) == int(val), (expr, val)
        assert a.splitlines()[-1] == "#### " + notes[-1][1]
        openings |= {line.split()[0] for line in a.splitlines()[:-1]}
        swapped += any(e.startswith("2*") for e, _ in notes)   # doubling written 2*x
    assert {"Now", "So", "In", "After", "Giving", "One", "Each", "Split", "Doubled,", "Twice"} <= openings
    assert swapped > 10
    assert load_rows("synthetic-varied", "train", 5).answers == [a for _, a in synthetic_problems(5, varied=True)]


def test_synthetic_slips_one_step_and_leaves_the_other_problems_alone():
    clean = synthetic_problems(300, "train", seed=1)
    assert synthetic_problems(300, "train", seed=1, slip_rate=0.0) == clean
    noisy = synthetic_problems(300, "train", seed=1, slip_rate=0.3)
    slipped = 0
    for (q0, a0), (q, a) in zip(clean, noisy):
        notes = [(expr, int(val)) for expr, val in re.findall(r"<<([^=]+)=(\d+)>>", a)]
        wrong = [(expr, val) for expr, val in notes if eval(expr.replace("/", "//")) != val]
        if (q, a) == (q0, a0):
            assert not wrong
            continue
        slipped += 1
        assert len(wrong) == 1, a                       # one slip, every later step computed from it
        expr, val = wrong[0]
        assert 1 <= abs(eval(expr.replace("/", "//")) - val) <= 9
        assert a.splitlines()[-1] == "#### " + re.findall(r">>(\d+)", a)[-1]
        assert q.split(".")[0] == q0.split(".")[0]      # the same problem up to the slip
    assert 0.2 < slipped / 300 < 0.4
    assert all(len(re.findall(r"<<", a)) >= 2 for _, a in synthetic_problems(50, "train", 2, slip_rate=1.0))
    assert sum(p != c for p, c in zip(synthetic_problems(50, "train", 2, slip_rate=1.0),
                                     synthetic_problems(50, "train", 2))) == 50


def test_synthetic_is_seeded_and_splits_differ():
    assert synthetic_problems(20, "train", 0) == synthetic_problems(20, "train", 0)
    assert synthetic_problems(20, "train", 0) != synthetic_problems(20, "train", 1)
    assert synthetic_problems(20, "train", 0) != synthetic_problems(20, "test", 0)
    rows = load_rows("synthetic", "test", max_samples=7, seed=3)
    assert len(rows) == 7 and rows.name == "synthetic-seed3"
    assert rows.identity()["content_sha256"] == load_rows("synthetic", "test", 7, seed=3).content_hash()


def test_local_jsonl_and_errors(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"question": "q1", "answer": "a #### 1"},
                                          {"question": "q2", "answer": "b"}])
    rows = load_rows(str(p), "train")
    assert rows.questions == ["q1", "q2"] and rows.answers == ["a #### 1", "b"]
    assert load_rows(str(p), max_samples=1).questions == ["q1"]
    none = write_jsonl(tmp_path / "none.jsonl", [{"question": "q1", "answer": "1"}, {"question": "q2", "answer": None},
                                                {"question": "q3"}])
    with pytest.raises(ValueError, match=r"2 row\(s\) have no `answer` \(rows 1, 2\); kava trains and evaluates"):
        load_rows(str(none))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "answer": "y"}])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['question'\]"):
        load_rows(str(bad))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_rows(str(tmp_path / "x.csv"))


@pytest.mark.skipif(not GSM8K.is_dir(), reason="the real GSM8K is not at ../shared/gsm8k")
def test_real_gsm8k_by_path():
    train = load_rows(str(GSM8K / "train.jsonl"))
    test = load_rows(str(GSM8K / "test.jsonl"))
    assert (len(train), len(test)) == (7473, 1319)
    assert all("####" in a for a in train.answers)


def test_saved_datasets_folder(tmp_path):
    import datasets
    d = datasets.Dataset.from_dict({"question": ["a?", "b?"], "answer": ["#### 1", "#### 2"]})
    d.save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict({"test": d}).save_to_disk(str(tmp_path / "dict"))
    assert load_rows(str(tmp_path / "flat")).questions == ["a?", "b?"]
    assert load_rows(str(tmp_path / "dict"), "test").answers == ["#### 1", "#### 2"]
    with pytest.raises(ValueError, match=r"no split 'train'; it has \['test'\]"):
        load_rows(str(tmp_path / "dict"), "train")


def test_gsm8k_loads_config_main_from_the_hub(monkeypatch):
    import datasets
    calls = []

    def fake(*args, **kw):
        calls.append((args, kw))
        return datasets.Dataset.from_dict({"question": ["q"], "answer": ["r\n#### 3"]})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    rows = load_rows("gsm8k", "test")
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"})]
    assert rows.name == "gsm8k" and rows.split == "test" and rows.answers == ["r\n#### 3"]


def test_synthetic_hard_has_more_steps():
    hard = load_rows("synthetic-hard", "test", max_samples=50)
    easy = load_rows("synthetic", "test", max_samples=50)
    assert hard.name == "synthetic-hard-seed0"
    n_steps = lambda rows: [a.count("<<") - a.count("buys") for a in rows.answers]  # bags = 2 notes
    assert min(n_steps(hard)) >= 3 and max(n_steps(easy)) <= 3


@pytest.mark.parametrize("content, message", [
    (b'{"question": "a", "answer": "1"}\n{"question": "b", "answer": 2\n', r"line 2 is not valid JSON"),
    (b'{"question": "a", "answer": "1"}\n\n{"question": "caf\xe9", "answer": "1"}\n', r"line 3 is not UTF-8 \(byte \d+: b'\\xe9'\)"),
    (b"", r"no rows \(the file is empty\)"),
    (b"\n  \n", r"no rows \(the file is empty\)"),
    (b'["question", "answer"]\n', r"line 1 is a list, expected an object"),
])
def test_a_bad_jsonl_file_is_named_with_the_line_and_the_reason(tmp_path, content, message):
    p = tmp_path / "d.jsonl"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{p}: {message}"):
        load_rows(str(p))
