"""The original direction: a Llama-architecture student with its own tokenizer (BOS, another
vocabulary) learns from a Qwen2 teacher's cache through the command line, with the TinyLlama
config's loss and projector: it trains, prints its memory estimate, saves, resumes to the same
losses, evaluates, and runs in a sweep."""

import json
import re
import shutil

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from kava_common import save_pretrained
from kava_demo import tiny
from stage2_train.__main__ import main as cli
from stage2_train.evaluate import main as evaluate_main
from stage2_train.sweep import main as sweep_main

CONFIG = "configs/qwen2_7b_to_tinyllama.yaml"


@pytest.fixture(scope="module")
def llama_student(tmp_path_factory):
    """A 2-layer Llama with GQA (2 KV heads of 8) and a tokenizer of its own that adds BOS."""
    ltok = tiny.train_tokenizer(tiny.corpus(300, seed=9), vocab_size=260, add_bos=True)
    cfg = tiny.tiny_config("llama", len(ltok), hidden=32, layers=2, heads=4, kv_heads=2, tok=ltok)
    cfg.tie_word_embeddings = False                      # as TinyLlama's
    return save_pretrained(tiny.build_model(cfg, seed=5), ltok, tmp_path_factory.mktemp("llama-student"))


def flags(student, cache, out, **kw):
    """The TinyLlama config with what a CPU test needs over it: the tiny student, the cache's data
    set, fp32 and plain AdamW, few steps."""
    base = dict(student=student, cache=cache, out=out, dataset="synthetic-seed0", precision="fp32",
                optimizer="adamw", batch_size=4, grad_accum=1, max_steps=6, log_every=2, save_every=2,
                warmup_steps=2, eval_samples=8, num_workers=0, device="cpu", lr_student=1e-3)
    base.update(kw)
    out = ["--config", CONFIG, "--no-progress"]
    for k, v in base.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_llama_student_from_a_qwen2_cache_trains_resumes_and_evaluates(llama_student, logit_caches, tmp_path,
                                                                         capsys):
    cache = str(logit_caches["qwen"])
    assert cli(flags(llama_student, cache, tmp_path / "a")) == 0
    out = capsys.readouterr().out
    assert "different vocabularies" in out and "character-overlap alignment" in out
    assert re.search(r"estimated peak memory [0-9.]+ GB \(weights .*\) at batch 4 x 512 tokens", out)
    straight = metrics(tmp_path / "a")
    assert [r["step"] for r in straight] == [2, 4, 6]
    assert straight[-1]["cos_k"] > straight[-1]["cos_k_shuffled"] and straight[-1]["loss_kv"] < straight[0]["loss_kv"]
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final" / "student")
    assert type(student).__name__ == "LlamaForCausalLM" and student.config.num_key_value_heads == 2
    tok = AutoTokenizer.from_pretrained(tmp_path / "a" / "final" / "student")
    assert tok("Question: 1")["input_ids"][0] == tok.bos_token_id
    proj = json.loads((tmp_path / "a" / "final" / "projector.json").read_text())
    assert proj["student"] == {"num_kv_heads": 2, "head_dim": 8} and proj["teachers"][0]["num_kv_heads"] == 2
    # killed after its step-4 checkpoint, resumed: the losses of the uninterrupted run
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for gone in ("final", "step-000006"):
        shutil.rmtree(tmp_path / "b" / gone)
    assert cli(flags(llama_student, cache, tmp_path / "b", resume="auto")) == 0
    assert "resumed from" in capsys.readouterr().out
    resumed = metrics(tmp_path / "b")
    assert [r["step"] for r in resumed] == [2, 4, 6]
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["cos_k"] == pytest.approx(b["cos_k"], rel=1e-5)
    assert evaluate_main(["--model", str(tmp_path / "b" / "final" / "student"), "--dataset", "synthetic",
                          "--max-samples", "4", "--max-new-tokens", "8", "--device", "cpu", "--no-progress"]) == 0
    assert "exact match" in capsys.readouterr().out
    rows = (tmp_path / "b" / "final" / "student" / "eval-test.jsonl").read_text().splitlines()
    assert len(rows) == 4 and all(json.loads(r)["prompt"].startswith("Question: ") for r in rows)


@pytest.mark.slow
def test_a_sweep_over_a_llama_student(llama_student, logit_caches, tmp_path, capsys):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"out: {tmp_path / 'sw'}\nbase: {CONFIG}\n"
        f"settings: {{student: {llama_student}, caches: [{logit_caches['qwen']}], dataset: synthetic-seed0,\n"
        "           precision: fp32, optimizer: adamw, batch_size: 4, grad_accum: 1, max_steps: 2, log_every: 2,\n"
        "           save_every: 0, eval_samples: 8, num_workers: 0, device: cpu, kd_weight: 1.0}\n"
        "grid:\n  kd_method: [uld, chunk]\n"
        "eval: {dataset: synthetic, split: test, max_samples: 2, max_new_tokens: 4, device: cpu}\n")
    assert sweep_main([str(spec), "--no-progress"]) == 0
    csv = (tmp_path / "sw" / "results.csv").read_text().splitlines()
    assert csv[0].startswith("run,kd_method,") and len(csv) == 3
    for method in ("uld", "chunk"):
        m = metrics(tmp_path / "sw" / f"kd_method-{method}")
        assert m[-1]["loss_kd"] > 0 and m[-1]["step"] == 2
