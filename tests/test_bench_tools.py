"""The benchmarks' tools: bench/stats.py's paired intervals, bench/compare_arms.py's reading of a
bench_learn root's eval files."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

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


# --- bench_learn's latent-reasoning registration parts -------------------------------------------

def test_answer_only_data_keeps_each_problem_with_its_final_line_only(tmp_path):
    bl = load("bench_learn")
    from kava_common.data import load_rows
    task = {"dataset": "synthetic", "student_problems": 5}
    path = bl.answer_only_data(tmp_path, task, "synthetic")
    rows = load_rows("synthetic", "train", 5)
    got = [json.loads(l) for l in Path(path).read_text().splitlines()]
    assert got == [{"question": q, "answer": "#### " + a.rsplit("#### ", 1)[1]} for q, a in zip(rows.questions,
                                                                                               rows.answers)]
    assert bl.answer_only_data(tmp_path, task, "synthetic") == path          # made once
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q?", "answer": "no final line"}) + "\n")
    with pytest.raises(SystemExit, match="bad.jsonl train row 0 has no #### line"):
        bl.answer_only_data(tmp_path, {"dataset": str(bad), "student_problems": 1}, str(bad))


def test_a_latent_arm_is_scored_after_its_latent_steps_and_others_write_out(tmp_path):
    bl = load("bench_learn")
    reg = {"task": {"dataset": "synthetic", "max_new_tokens": 40}, "seeds": [3],
           "eval": {"validation": 10, "batch_size": 5},
           "students": {"t": {"from_teacher": "qwen2"}},
           "student": {"settings": {"max_steps": 5, "device": "cpu"}},
           "arms": {"cot": {"what": "c", "caches": ["{cache_qwen2}"], "kv_weight": 0.0},
                    "kava": {"what": "k", "caches": ["{cache_qwen2}"], "kv_weight": 1.0, "latent": 4,
                             "jacobi_iters": 2}}}
    paths = {"cache_qwen2": "C", "student_t_3": "T"}
    cot = bl.arm_sweep(tmp_path, "cot", 3, "validation", reg, paths, {})
    kava = bl.arm_sweep(tmp_path, "kava", 3, "validation", reg, paths, {})
    assert cot["settings"] == {"max_steps": 5, "device": "cpu", "caches": ["C"], "kv_weight": 0.0, "student": "T"}
    assert "latent" not in cot["eval"] and cot["out"] == str(tmp_path / "validation" / "cot" / "seed-3")
    assert (kava["eval"]["latent"], kava["eval"]["jacobi_iters"]) == (4, 2)
    assert kava["settings"]["latent"] == 4 and kava["eval"]["max_samples"] == 10
    # the registration's device trains and scores the students unless their settings name one
    on_gpu = dict(reg, task=dict(reg["task"], device="cuda"), student={"settings": {"max_steps": 5}})
    gpu = bl.arm_sweep(tmp_path, "kava", 3, "validation", on_gpu, paths, {})
    assert gpu["settings"]["device"] == gpu["eval"]["device"] == "cuda"
    named = dict(on_gpu, student=reg["student"])
    assert bl.arm_sweep(tmp_path, "kava", 3, "validation", named, paths, {})["eval"]["device"] == "cpu"
    assert cot["eval"]["device"] == "cpu"


def test_scores_carry_forward_passes_into_the_table(tmp_path):
    import numpy as np
    bl = load("bench_learn")
    ev = tmp_path / "eval.jsonl"
    ev.write_text("".join(json.dumps({"correct": c, "forward_passes": n}) + "\n" for c, n in
                          [(True, 10), (False, 6), (True, 8)]))
    r = bl.scored(ev, {}, 0.0)
    assert r["scores"] == [True, False, True] and r["passes"] == 8.0
    write_eval(ev, [1, 0])                       # written before forward passes were recorded
    assert np.isnan(bl.scored(ev, {}, 0.0)["passes"])
    rows = [{"arm": "a", "what": "base", "baseline": "a", "acc": 0.5, "acc_min": 0.4, "acc_max": 0.6, "passes": 76.0,
             **{c: float("nan") for c in bl.COSINES}},
            {"arm": "b", "what": "latent", "baseline": "a", "acc": 0.7, "acc_min": 0.7, "acc_max": 0.7, "passes": 9.5,
             "paired": {"diff": 0.2, "low": 0.1, "high": 0.3}, **{c: float("nan") for c in bl.COSINES}}]
    lines = bl.table(rows)
    assert lines[0].endswith("| forward passes per answer |") and "paired diff to its baseline" in lines[0]
    assert lines[2] == "| base | 0.500 (0.400-0.600) | (baseline) | - (-) | - (-) | 76.0 |"
    assert lines[3] == "| latent | 0.700 (0.700-0.700) | +0.200 [+0.100, +0.300] | - (-) | - (-) | 9.5 |"
    for r in rows:
        r["passes"] = float("nan")
    assert bl.table(rows)[0] == ("| arm | exact match (seed min-max) | paired diff to CE [95% CI] | cos K (shuffled) "
                                 "| cos V (shuffled) |")


def test_registrations_sharing_a_root_keep_their_own_reports(tmp_path):
    bl = load("bench_learn")
    reg = {"task": {"dataset": "synthetic", "student_problems": 64}, "seeds": [0],
           "student": {"settings": {"max_steps": 5, "batch_size": 2}}, "eval": {"teachers": 10},
           "teachers": {"t": {"stage1": {}}}, "arms": {"a": {"what": "base"}, "b": {"what": "other"}}}
    nan = {c: float("nan") for c in bl.COSINES}
    for name, acc in (("one", 0.25), ("two", 0.75)):
        rows = [{"arm": "a", "what": "base", "baseline": "a", "acc": 0.5, "acc_min": 0.5, "acc_max": 0.5,
                 "passes": 6.0, **nan},
                {"arm": "b", "what": "other", "baseline": "a", "acc": acc, "acc_min": acc, "acc_max": acc,
                 "passes": 6.0, "runs_trained": 1, "paired": {"diff": acc - 0.5, "low": acc - 0.6, "high": acc - 0.4}, **nan}]
        bl.report(tmp_path / f"results-{name}", reg, {"teacher_t_acc": 0.9}, [("test", rows)], {}, [], 1.0,
                  log=lambda *a: None)
    one, two = (tmp_path / "results-one.md").read_text(), (tmp_path / "results-two.md").read_text()
    assert "| other | 0.250 (0.250-0.250) | -0.250 [-0.350, -0.150] |" in one
    assert "| other | 0.750 (0.750-0.750) | +0.250 [+0.150, +0.350] |" in two
    assert json.loads((tmp_path / "results-one.json").read_text())["sections"][0]["rows"][1]["acc"] == 0.25
    assert (tmp_path / "results-one.png").stat().st_size > 0 and (tmp_path / "results-two.png").stat().st_size > 0
    assert not (tmp_path / "results.md").exists()
    assert one.startswith("Task synthetic: students see 64 problems, 5 steps x batch 2, seeds [0].")
    longer = dict(reg, arms={"a": {"what": "base"}, "b": {"what": "other", "max_steps": 20}, "c": {"max_steps": 5}})
    assert bl.steps_text(longer) == "5 steps x batch 2 (b 20 steps: arms that set their own)"
    assert json.loads((tmp_path / "results-two.json").read_text())["runs"] == {"trained": 1, "all": 2}
    assert bl.diff_label(rows) == "exact match minus base (paired, 95% CI)"
    assert bl.diff_label(rows + [dict(rows[1], arm="c", baseline="b")]) == \
        "exact match minus its baseline (paired, 95% CI)"


def test_a_run_finished_before_is_read_back_and_counted_apart_from_the_trained(tmp_path, monkeypatch):
    bl = load("bench_learn")
    calls = []

    def fake_sweep(path, echo, progress):         # a one-point sweep that trains its run
        run = Path(path).parent / "seed-0"
        calls.append((run / "result.json").is_file())
        run.mkdir(exist_ok=True)
        write_eval(run / "eval.jsonl", [1, 0, 1, 1])
        (run / "result.json").write_text("{}")
        return [{"run": "seed-0"}]

    monkeypatch.setattr(bl, "run_sweep", fake_sweep)
    out = tmp_path / "test" / "kava" / "seed-0"
    first = bl.run_one((out, {"settings": {}}, 1, None))
    again = bl.run_one((out, {"settings": {}}, 1, None))
    assert calls == [False, True] and (first["trained"], again["trained"]) == (True, False)
    assert first["scores"] == again["scores"] == [True, False, True, True]
    assert yaml.safe_load((out / "sweep.yaml").read_text()) == {"settings": {}}


def test_a_registration_that_fixes_every_setting_has_no_validation_round(tmp_path):
    bl = load("bench_learn")
    reg = {"arms": {"a": {"what": "a"}}, "test": ["a"], "seeds": [0]}
    assert bl.decisions(reg) == {}
    assert bl.validate(tmp_path, reg, {}, pool=None, threads=1, log=print) == ([], {})
    assert bl.decisions({"choose_from": ["a"]}) == {"chosen": ["a"]}


def test_a_teacher_is_scored_with_and_without_its_chain_of_thought_once(tok, tmp_path):
    from kava_common import save_pretrained
    from kava_demo import tiny
    bl = load("bench_learn")
    cfg = tiny.tiny_config("qwen2", len(tok), hidden=32, layers=1, heads=2, kv_heads=1, tok=tok)
    t = save_pretrained(tiny.build_model(cfg), tok, tmp_path / "teacher")
    task = {"dataset": "synthetic", "max_new_tokens": 4}
    said = []
    for direct in (False, True):
        acc = bl.teacher_accuracy(t, "t", task, 3, direct, said.append)
        ev = t / ("eval-validation-direct-3.jsonl" if direct else "eval-validation-3.jsonl")
        lines = [json.loads(l) for l in ev.read_text().splitlines()]
        assert len(lines) == 3 and acc == sum(l["correct"] for l in lines) / 3
        assert all(l["prompt"].endswith(" ####") == direct for l in lines)
    assert said[1].endswith("on 3 validation problems without its chain of thought")
    bl.teacher_accuracy(t, "t", task, 3, True, said.append)
    assert said[2].endswith("without its chain of thought (scored before)")


def _student_reads_its_answer_by_hand(run, cache, n: int) -> tuple[int, float, int]:
    """A latent run's student answering its first `n` cache samples, recomputed step by step
    from the saved files: the question and begin-of-thought, one full forward per latent step
    (a run with --jacobi-iters >= M - 1 has these latents), end-of-thought and the answer
    teacher-forced. (answers wholly right, summed NLL of the answer tokens, how many)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from conftest import latents_by_hand
    from kava_common.cache.read import open_cache
    from stage2_train.latent import load_latent_head
    from stage2_train.latent_data import BOT, EOT
    student = run / "final" / "student"
    tok, model = AutoTokenizer.from_pretrained(student), AutoModelForCausalLM.from_pretrained(student).eval()
    head = load_latent_head(str(student), model.config.hidden_size, "cpu")
    emb, c, m = model.get_input_embeddings(), open_cache(cache), 4
    right, nll, tokens = 0, 0.0, 0
    for i in range(n):
        s = c.text(i)
        text, (r0, r1) = s["text"], s["char_segments"]["reasoning"]
        question = tok(text[:r0].rstrip(" "))["input_ids"] + [tok.convert_tokens_to_ids(BOT)]
        answer = tok(text[r1:], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            seq = emb(torch.tensor([question]))
            seq = torch.cat([seq, latents_by_hand(model, head, seq, m),
                             emb(torch.tensor([[tok.convert_tokens_to_ids(EOT)] + answer]))], 1)
            logits = model(inputs_embeds=seq).logits[0, -len(answer) - 1:-1]
        # the answer segment's tokens are scored, not the text between the thought and them
        (_, r), (a0, _) = s["token_segments"]["reasoning"], s["token_segments"]["answer"]
        logits, target = logits[a0 - r:], torch.tensor(answer[a0 - r:])
        right += bool((logits.argmax(-1) == target).all())
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        tokens += len(target)
    return right, nll, tokens


@pytest.mark.slow
def test_latent_readout_gives_the_teacher_its_slots_its_students_latents_or_nothing(student_dir, teacher_dir, tmp_path,
                                                                                   monkeypatch):
    """bench/latent_readout.py on a tiny latent run: the student's own answer scores as a
    step-by-step recomputation; the teacher reading its own slots and nothing
    scores as stage1_extract.slot_answers' `rkv M` and `none`; a projector that returned the very
    slots (un-rotated ones for a run taught keys before RoPE) puts them where the slots were; a
    student layer taught a mix of teacher layers is refused."""
    from types import SimpleNamespace
    from kava_common import KavaError
    from stage1_extract.config import ExtractConfig
    from stage1_extract.extract import main as extract
    from stage1_extract.slot_answers import SlotAnswersArgs, slot_answers
    from stage2_train.config import TrainConfig
    import torch
    from stage2_train.train import main as train
    ro = load("latent_readout")
    (cache,) = extract(ExtractConfig(teachers=[str(teacher_dir)], dataset="synthetic", max_samples=12, batch_size=4,
                                     quantize=False, dtype="float32", kv_dtype="float32", device="cpu", progress=False,
                                     rkv_slots=4, rkv_lambda=0.3, out=str(tmp_path / "c")))
    run = tmp_path / "run"
    train(TrainConfig(student=str(teacher_dir), caches=[str(cache)], out=str(run), device="cpu", progress=False,
                      eval_samples=4, batch_size=4, max_steps=3, log_every=1, save_every=0, latent=4, jacobi_iters=3,
                      kv_weight=3.0), echo=lambda *a: None)
    got = ro.readout(run, 8, progress=False)
    right, nll, tokens = _student_reads_its_answer_by_hand(run, cache, 8)
    assert got["forms"]["student"]["exact"] == right / 8
    assert got["forms"]["student"]["nll"] == pytest.approx(nll / tokens, rel=1e-5)
    ref = slot_answers(SlotAnswersArgs(cache=str(cache), samples=8, slots=[4], select=["rkv"], device="cpu",
                                       progress=False))
    assert got["samples"] == ref["samples"] == 8 and got["latent"] == 4
    for form, name in (("slots", "rkv 4"), ("none", "none")):
        assert got["forms"][form]["exact"] == ref["forms"][name]["exact"]
        assert got["forms"][form]["nll"] == pytest.approx(ref["forms"][name]["nll"], rel=1e-5)
    assert all(0.0 <= r["exact"] <= 1.0 and r["nll"] > 0 for r in got["forms"].values())

    def the_slots(distiller, teacher, pairs, batch):
        n = int(batch["slot_mask"][0].sum())
        return {li: (batch["slots_k"][0, li][:, :n].float(), batch["slots_v"][0, li][:, :n].float())
                for li in range(batch["slots_k"].shape[1])}
    import stage1_extract.slot_answers as sa
    score = sa.answer_scores
    pasts = []

    def kept(model, ids, past, r1, a0, a1):
        pasts.append(past)
        return score(model, ids, past, r1, a0, a1)
    monkeypatch.setattr(ro, "project", the_slots)
    monkeypatch.setattr(sa, "answer_scores", kept)
    # the teacher's reads per sample: its slots, the latents, nothing, another sample's latents; a
    # projector that gave the slots (un-rotated ones for a run taught keys before RoPE) puts the
    # very keys and values where the slots were
    pre = tmp_path / "pre"
    train(TrainConfig(student=str(teacher_dir), caches=[str(cache)], out=str(pre), device="cpu", progress=False,
                      eval_samples=4, batch_size=4, max_steps=1, log_every=1, save_every=0, latent=4, jacobi_iters=1,
                      kv_weight=3.0, latent_keys="pre_rope"), echo=lambda *a: None)
    for folder in (run, pre):
        pasts.clear()
        ro.readout(folder, 8, progress=False)
        assert len(pasts) == 4 * 8
        for i in range(8):
            slots, latents, nothing = pasts[4 * i:4 * i + 3]
            for (sk, sv), (lk, lv), (nk, _) in zip(slots, latents, nothing):
                assert torch.allclose(lk, sk, atol=1e-5) and torch.equal(lv, sv), (folder.name, i)
                assert nk.shape[2] + 4 == sk.shape[2]                    # nothing: the 4 slots left out
    mixed = SimpleNamespace(distilled=[(0, [(0, 0.5), (1, 0.5)])], cache=SimpleNamespace(layers=[0, 1]))
    with pytest.raises(KavaError, match=r"student layer 0 is taught a mix of teacher layers"):
        ro.one_to_one(mixed)
    some = SimpleNamespace(distilled=[(0, [(0, 1.0)])], cache=SimpleNamespace(layers=[0, 1]))
    with pytest.raises(KavaError, match=r"teaches teacher layers \[0\] of 2"):
        ro.one_to_one(some)


def test_a_teacher_trains_with_its_own_lr_and_batch_on_the_registrations_device(tok, tmp_path, monkeypatch):
    from kava_common.data import load_rows
    bl = load("bench_learn")
    seen, rows = [], load_rows("synthetic", "train", 6)
    monkeypatch.setattr(bl, "train_lm", lambda model, tok, texts, steps, batch, lr, seed, log, device="cpu":
                        seen.append((len(texts), steps, batch, lr, device)))
    monkeypatch.setattr(bl, "load_rows", lambda *a, **k: rows)
    spec = {"arch": "qwen2", "init_seed": 1, "steps": 7, "model": {"hidden": 32, "layers": 1, "heads": 2,
                                                                     "kv_heads": 1, "head_dim": 16, "intermediate": 64}}
    task = {"dataset": "synthetic", "teacher_problems": 6}
    bl.build_teacher(tmp_path, "t-default", spec, task, tok, lambda *a: None)
    path = bl.build_teacher(tmp_path, "t-own", dict(spec, lr=5e-4, batch=8), dict(task, device="meta"), tok,
                            lambda *a: None)
    assert seen == [(6, 7, 32, 2e-3, "cpu"), (6, 7, 8, 5e-4, "meta")]
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert not list(path.glob("*settings*"))       # not in the folder, whose .json files stage 1 hashes
    assert json.loads((tmp_path / "t-own.settings.json").read_text()) == {
        "arch": "qwen2", "tokenizer": None, "init_seed": 1, "steps": 7, "model": spec["model"], "lr": 5e-4,
        "batch": 8, "dataset": "synthetic", "teacher_problems": 6}
    # the same settings on another device reuse it; other settings under its name are refused
    said = []
    assert bl.build_teacher(tmp_path, "t-own", dict(spec, lr=5e-4, batch=8), task, tok, said.append) == path
    assert len(seen) == 2 and said == []
    with pytest.raises(SystemExit, match=r"t-own was trained with other settings \(batch 8 there, 32 here; "
                                         r"lr 0.0005 there, 0.002 here\)"):
        bl.build_teacher(tmp_path, "t-own", spec, task, tok, said.append)
    # a teacher trained before its settings were kept is reused, and they are recorded as given
    (tmp_path / "t-own.settings.json").unlink()
    assert bl.build_teacher(tmp_path, "t-own", spec, task, tok, said.append) == path
    assert "not recorded; recorded now" in said[0] and len(seen) == 2
    assert json.loads((tmp_path / "t-own.settings.json").read_text())["batch"] == 32


def test_a_registration_that_names_torch_kernels_is_refused_under_others():
    bl = load("bench_learn")
    assert bl.check_kernels({}, "AVX512") == ""
    assert bl.check_kernels({"torch_cpu_kernels": "avx2"}, "AVX2") == "torch CPU kernels AVX2, as the registration asks"
    with pytest.raises(SystemExit, match="asks for torch CPU kernels AVX2 and torch runs AVX512; set "
                                         "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE"):
        bl.check_kernels({"torch_cpu_kernels": "AVX2"}, "AVX512")
    with pytest.raises(SystemExit, match="ATEN_CPU_CAPABILITY=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE "
                                         "MKL_ENABLE_INSTRUCTIONS=AVX512 before"):
        bl.check_kernels({"torch_cpu_kernels": "avx512"}, "AVX2")
    with pytest.raises(SystemExit, match="torch_cpu_kernels AVX3: choose one of AVX2, AVX512, DEFAULT"):
        bl.check_kernels({"torch_cpu_kernels": "avx3"}, "AVX2")


def test_the_registration_plot_keeps_every_label_inside_the_figure(tmp_path):
    """Arm descriptions as long as the registrations' own: wrapped, and the title, the axis label
    and every arm's label drawn inside the figure, in each panel (a label longer than the space
    beside the bars once pushed the title and axis label off the image's right edge)."""
    bl = load("bench_learn")
    long = "K/V Mercator from the Llama teacher across tokenizers, character-overlap alignment, kv_weight 10, 1,200 steps"
    rows = [{"arm": "base", "what": "no-CoT student: answer only", "baseline": "base"}] + [
        {"arm": f"a{i}", "what": f"{long} ({i})", "baseline": "base",
         "paired": {"diff": 0.1 * i - 0.15, "low": 0.1 * i - 0.2, "high": 0.1 * i - 0.1}} for i in range(6)]
    sections = [("test (1000 problems x 5 seeds)", rows), ("validation (1000 problems x 5 seeds)", rows[:3])]
    fig = bl.figure(sections)
    fig.canvas.draw()
    renderer, box = fig.canvas.get_renderer(), fig.bbox
    arms = [t for ax in fig.axes for t in ax.get_yticklabels()]
    labels = [t for ax in fig.axes for t in (ax.title, ax.xaxis.label)] + arms
    assert len(labels) == 2 * 2 + 6 + 2
    for t in labels:
        e = t.get_window_extent(renderer)
        assert box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 and e.y1 <= box.y1, t.get_text()
        assert max(len(line) for line in t.get_text().split("\n")) <= (40 if t in arms else 80)
    from matplotlib.colors import to_rgba
    assert [c.get_facecolor() for c in fig.axes[0].patches][:4] == [to_rgba("tab:red")] + [to_rgba("tab:gray")] * 2 + [
        to_rgba("tab:green")]
    bl.plot(sections, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
