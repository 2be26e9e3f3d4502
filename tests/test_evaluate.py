import json

import pytest
import torch

from kava_common import save_pretrained
from kava_demo import tiny
from kava_common.data import load_rows
from kava_common.prompt import format_prompt
from stage2_train.evaluate import evaluate, extract_answer, gold_answer, main


@pytest.mark.parametrize("text,want", [
    (" She sold 48/2=<<48/2=24>>24.\n#### 72", "72"),
    (" total\n#### 1,234\nQuestion: next", "1234"),
    (" so #### $18.00 dollars", "18"),
    (" #### -3", "-3"),
    (" First 5 then 7.", "7"),                 # no ####: the last number
    (" 2.50 each", "2.5"),
    (" no numbers at all", None),
    (" ####", None),
])
def test_extract_answer_on_hand_written_generations(text, want):
    assert extract_answer(text) == want


def test_gold_answer():
    assert gold_answer("a\n#### 1,000") == "1000"
    assert gold_answer("no mark") is None


class KnownLM:
    """A stand-in causal LM whose continuation of each prompt is given in advance."""

    def __init__(self, tok, answers: dict[str, str]):
        self.tok, self.answers = tok, answers

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        prompts = self.tok.batch_decode(input_ids, skip_special_tokens=True)
        conts = [self.tok(self.answers[p.strip()], add_special_tokens=False)["input_ids"][:max_new_tokens]
                 for p in prompts]
        width = max(map(len, conts))
        pad = [c + [self.tok.eos_token_id] * (width - len(c)) for c in conts]
        return torch.cat([input_ids, torch.tensor(pad)], dim=1)


def test_accuracy_arithmetic_and_limits(tok, tmp_path):
    from kava_common.prompt import format_prompt
    rows = load_rows("synthetic", "test", max_samples=10)
    answers = {}
    for i, (q, a) in enumerate(zip(rows.questions, rows.answers)):
        gold = gold_answer(a)
        # rows 0, 3, 6, 9 right via ####; row 1 right via last number; the rest wrong
        answers[format_prompt(q)] = (f" work\n#### {gold}" if i % 3 == 0 else
                                     f" it is {gold}" if i == 1 else f" #### {int(gold) + 1}")
    out = tmp_path / "e.jsonl"
    r = evaluate("known", "synthetic", "test", max_samples=10, batch_size=4, out=out, device="cpu",
                 progress=False, model=KnownLM(tok, answers), tok=tok)
    assert (r.n, r.correct, r.accuracy) == (10, 5, 0.5)
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [l["index"] for l in lines] == list(range(10))
    assert [l["correct"] for l in lines] == [True, True, False, True, False, False, True, False, False, True]
    assert lines[1]["extracted"] == lines[1]["gold"] and lines[0]["prompt"].startswith("Question: ")
    r = evaluate("known", "synthetic", "test", max_samples=3, batch_size=2, device="cpu", progress=False,
                 model=KnownLM(tok, answers), tok=tok)
    assert (r.n, r.correct) == (3, 2)


def test_cli_on_a_real_tiny_model(tok, tmp_path, capsys):
    cfg = tiny.tiny_config("qwen2", len(tok), hidden=32, layers=1, heads=2, kv_heads=1, tok=tok)
    d = save_pretrained(tiny.build_model(cfg), tok, tmp_path / "m")
    assert main(["--model", str(d), "--max-samples", "5", "--max-new-tokens", "8", "--no-progress"]) == 0
    assert "exact match 0/5 = 0.0000 on synthetic test" in capsys.readouterr().out
    lines = (d / "eval-test.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(l)["gold"] for l in lines)


def test_earlier_results_survive_a_bad_argument_or_a_failed_run(tok, tmp_path, capsys):
    cfg = tiny.tiny_config("qwen2", len(tok), hidden=32, layers=1, heads=2, kv_heads=1, tok=tok)
    d = save_pretrained(tiny.build_model(cfg), tok, tmp_path / "m")
    out = tmp_path / "results.jsonl"
    earlier = json.dumps({"index": 0, "prompt": "p", "output": "o", "extracted": "1", "gold": "1", "correct": True})
    out.write_text(earlier + "\n")                # an earlier evaluate's results
    assert main(["--model", str(d), "--max-new-tokens", "0", "--out", str(out), "--no-progress"]) == 1
    assert "--max-new-tokens must be >= 1, got 0" in capsys.readouterr().err
    assert main(["--model", str(d), "--dataset", str(tmp_path / "missing.jsonl"), "--out", str(out),
                 "--no-progress"]) == 1
    assert out.read_text() == earlier + "\n" and not list(tmp_path.glob("*.tmp"))
    assert main(["--model", str(d), "--max-samples", "2", "--max-new-tokens", "4", "--out", str(out),
                 "--no-progress"]) == 0
    assert len(out.read_text().splitlines()) == 2


def test_a_run_that_fails_midway_leaves_the_earlier_file(tok, tmp_path):
    class FailsOnSecondBatch(KnownLM):
        calls = 0

        def generate(self, *a, **kw):
            FailsOnSecondBatch.calls += 1
            if FailsOnSecondBatch.calls == 2:
                raise RuntimeError("out of memory")
            return super().generate(*a, **kw)
    rows = load_rows("synthetic", "test", 4)
    answers = {format_prompt(q).strip(): "#### 1" for q in rows.questions}
    out = tmp_path / "results.jsonl"
    earlier = json.dumps({"index": 0, "prompt": "p", "output": "o", "extracted": "1", "gold": "1", "correct": True})
    out.write_text(earlier + "\n")                # an earlier evaluate's results
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate("m", "synthetic", "test", max_samples=4, batch_size=2, out=out, device="cpu", progress=False,
                 model=FailsOnSecondBatch(tok, answers), tok=tok)
    assert out.read_text() == earlier + "\n" and not list(tmp_path.glob("*.tmp"))


def test_rows_without_a_gold_answer_are_not_scored_and_are_reported(tok, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "a?", "answer": "so #### 4"}, {"question": "b?", "answer": "no final answer"},
        {"question": "c?", "answer": "#### 6"}]))
    answers = {format_prompt("a?").strip(): "#### 4", format_prompt("b?").strip(): "#### 5",
               format_prompt("c?").strip(): "#### 7"}
    out = tmp_path / "r.jsonl"
    r = evaluate("m", str(data), "train", out=out, device="cpu", progress=False, model=KnownLM(tok, answers), tok=tok)
    assert (r.n, r.correct, r.unscored, r.accuracy) == (2, 1, 1, 0.5)
    assert [json.loads(l)["correct"] for l in out.read_text().splitlines()] == [True, None, False]


@pytest.mark.parametrize("output,want", [
    (" 12", "12"),
    (" 13=<<13-2=11>>11 left.\nDoubled, 22.\n#### 22", "13"),   # reasoning after the begun line: not scored
    (" 7 #### 9", "7"),                                           # a second answer line on the same line
    (" 1,024\n", "1024"),
    ("", None),
])
def test_direct_scores_the_begun_answer_line_only(output, want):
    from stage2_train.evaluate import direct_answer
    assert extract_answer(direct_answer(output)) == want


def test_direct_begins_the_answer_line_and_scores_only_it(tok, tmp_path, capsys):
    """--direct: the prompt ends in ' ####'; a model that answers at once is right, one that
    writes its reasoning after the mark and then the right answer line is not."""
    rows = load_rows("synthetic", "test", max_samples=4)
    golds = [gold_answer(a) for a in rows.answers]
    answers = {}
    for i, q in enumerate(rows.questions):
        p = (format_prompt(q) + " ####").strip()
        answers[p] = (f" {golds[i]}" if i in (0, 2) else f" 3=<<1+2=3>>3\n#### {golds[i]}")
    out = tmp_path / "d.jsonl"
    r = evaluate("known", "synthetic", "test", max_samples=4, batch_size=2, out=out, device="cpu", progress=False,
                 model=KnownLM(tok, answers), tok=tok, direct=True)
    assert (r.n, r.correct) == (4, 2)
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [l["correct"] for l in lines] == [True, golds[1] == "3", True, golds[3] == "3"]
    assert all(l["prompt"].endswith("\nAnswer: ####") for l in lines)
    assert [l["extracted"] for l in lines] == [golds[0], "3", golds[2], "3"]
    with pytest.raises(Exception, match="--latent and --direct"):
        evaluate("known", "synthetic", "test", max_samples=1, device="cpu", progress=False,
                 model=KnownLM(tok, answers), tok=tok, direct=True, latent=2)
    cfg = tiny.tiny_config("qwen2", len(tok), hidden=32, layers=1, heads=2, kv_heads=1, tok=tok)
    d = save_pretrained(tiny.build_model(cfg), tok, tmp_path / "m")
    assert main(["--model", str(d), "--max-samples", "3", "--max-new-tokens", "4", "--direct", "--no-progress"]) == 0
    assert "exact match without a chain of thought 0/3" in capsys.readouterr().out


def test_a_stage2_run_or_checkpoint_folder_stands_for_its_student(tmp_path):
    from stage2_train.evaluate import student_of
    run = tmp_path / "run"
    for folder in (run / "final" / "student", run / "step-000003" / "student", tmp_path / "model"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    assert student_of(str(run)) == str(run / "final" / "student")
    assert student_of(str(run / "final")) == str(run / "final" / "student")
    assert student_of(str(run / "step-000003")) == str(run / "step-000003" / "student")
    for given in (str(tmp_path / "model"), str(tmp_path / "empty"), "Qwen/Qwen2.5-0.5B"):
        assert student_of(given) == given
