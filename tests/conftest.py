"""Shared fixtures: a locally trained tokenizer and tiny teachers of real architectures."""

from __future__ import annotations

import json

import pytest
import torch

from kava_common import save_pretrained
from kava_demo import tiny
from stage1_extract.config import ExtractConfig
from stage1_extract.extract import main as extract

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tok():
    return tiny.train_tokenizer(tiny.corpus(400) + ["caf\u00e9 \u20ac5 \u201cquoted\u201d"], vocab_size=300)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tok):
    """A GQA Qwen2 teacher whose head_dim (32) differs from hidden/heads (64/4 = 16).

    Every linear's output width is a multiple of 32, as bitsandbytes' 4-bit CPU kernel needs."""
    cfg = tiny.tiny_config("qwen2", len(tok), hidden=64, layers=3, heads=4, kv_heads=2,
                           head_dim=32, intermediate=128, tok=tok)
    return save_pretrained(tiny.build_model(cfg, seed=0), tok, tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def narrow_teacher_dir(tmp_path_factory, tok):
    """A Qwen2 teacher with linears that bitsandbytes' packed 4-bit CPU kernel cannot take:
    k_proj and v_proj are 48 wide (2 KV heads x head_dim 24; not a multiple of 32) and o_proj
    reads 96 inputs (not a multiple of the 64-value quantization block). q_proj, gate_proj,
    up_proj and down_proj fit it."""
    cfg = tiny.tiny_config("qwen2", len(tok), hidden=64, layers=2, heads=4, kv_heads=2,
                           head_dim=24, intermediate=128, tok=tok)
    return save_pretrained(tiny.build_model(cfg, seed=4), tok, tmp_path_factory.mktemp("narrow"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A Llama teacher with its own tokenizer (adds BOS) and plain MHA geometry."""
    ltok = tiny.train_tokenizer(tiny.corpus(300, seed=5), vocab_size=280, add_bos=True)
    cfg = tiny.tiny_config("llama", len(ltok), hidden=64, layers=2, heads=2, kv_heads=2, tok=ltok)
    return save_pretrained(tiny.build_model(cfg, seed=3), ltok, tmp_path_factory.mktemp("llama"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def latents_by_hand(model, head, prefix, m):
    """The step-by-step reference of M latent steps: a full forward per latent, no cache, one
    sample; the M latent embeddings that follow `prefix` (1, T, hidden)."""
    seq = prefix
    for _ in range(m):
        h = model(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1]
        seq = torch.cat([seq, head(h[:, -1:])], 1)
    return seq[:, prefix.shape[1]:]


@pytest.fixture(scope="session")
def extra_tok(tok, tmp_path_factory):
    """The tests' tokenizer with two special tokens added after its last id, as Qwen2.5's
    tokenizer is Qwen2's with special tokens added."""
    from transformers import AutoTokenizer
    folder = tmp_path_factory.mktemp("extra-tok")
    tok.save_pretrained(folder)
    t = AutoTokenizer.from_pretrained(folder)
    t.add_special_tokens({"additional_special_tokens": ["<|x1|>", "<|x2|>"]})
    return t


@pytest.fixture(scope="session")
def padded_teachers(tmp_path_factory, tok, extra_tok):
    """One Qwen2 teacher with 64 embedding rows more than `extra_tok` has tokens (as Qwen2-7B's
    152,064 rows hold 151,646 tokens), saved twice: with `extra_tok` (a vocabulary compatible
    with the tests' tokenizer) and with the tests' tokenizer itself (the same vocabulary)."""
    cfg = tiny.tiny_config("qwen2", len(extra_tok) + 64, hidden=64, layers=2, heads=4, kv_heads=2,
                           head_dim=32, intermediate=128, tok=tok)
    model = tiny.build_model(cfg, seed=21)
    return {"extra": save_pretrained(model, extra_tok, tmp_path_factory.mktemp("padded-extra")),
            "same": save_pretrained(model, tok, tmp_path_factory.mktemp("padded-same"))}


@pytest.fixture(scope="session")
def caches(tmp_path_factory, teacher_dir, llama_dir):
    root = tmp_path_factory.mktemp("caches")
    cfg = ExtractConfig(teachers=[str(teacher_dir), str(llama_dir)], dataset="synthetic",
                        max_samples=72, batch_size=8, quantize=False, device="cpu", progress=False,
                        out=str(root))
    qwen, llama = extract(cfg)
    other = ExtractConfig(**{**cfg.__dict__, "teachers": [str(teacher_dir)], "seed": 1, "max_samples": 40})
    (other_data,) = extract(other)
    return {"qwen": qwen, "llama": llama, "other": other_data}


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tok):
    cfg = tiny.tiny_config("qwen2", len(tok), hidden=32, layers=2, heads=4, kv_heads=1, head_dim=16, tok=tok)
    return save_pretrained(tiny.build_model(cfg, seed=7), tok, tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="session")
def logit_caches(tmp_path_factory, teacher_dir, llama_dir):
    root = tmp_path_factory.mktemp("logit-caches")
    cfg = ExtractConfig(teachers=[str(teacher_dir), str(llama_dir)], dataset="synthetic", max_samples=72,
                        batch_size=8, quantize=False, device="cpu", progress=False, out=str(root), logits_topk=8)
    qwen, llama = extract(cfg)
    return {"qwen": qwen, "llama": llama}
