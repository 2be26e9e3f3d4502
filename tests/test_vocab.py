"""kava_common.vocab: whether a teacher's vocabulary is the student's (same, compatible or
different), from the tokenizers and the cache's texts, and what `info --student` says of it."""

import json
import shutil

import numpy as np
import pytest

from kava_common import KavaError
from kava_demo import tiny
from kava_common.cache import open_cache
from kava_common.info import main as info_main
from kava_common.vocab import (check_texts, compare_vocabularies, teacher_tokenizer,
                               vocab_match)
from stage1_extract.config import ExtractConfig
from stage1_extract.extract import main as extract


def test_the_same_tokenizer_shares_every_id_below_the_students_rows(tok):
    m = compare_vocabularies(tok, tok, student_rows=len(tok) + 64)
    assert m.kind == "same" and m.identity and len(m.shared) == len(tok) + 64
    assert m.shared[:len(tok)].all() and not m.shared[len(tok):].any()     # padding rows name no token
    assert m.keep(np.array([[0, 299, 300, 363, 364, -1]])).tolist() == [[True, True, False, False, False, False]]
    assert compare_vocabularies(tok, tok, student_rows=200).shared.sum() == 200


def test_added_special_tokens_leave_the_vocabularies_compatible_both_ways(tok, extra_tok):
    assert len(tok) == 300 and extra_tok.convert_tokens_to_ids(["<|x1|>", "<|x2|>"]) == [300, 301]
    m = compare_vocabularies(extra_tok, tok)                          # teacher has two tokens more
    assert m.kind == "compatible" and m.identity
    assert m.reason == "300 tokens with the same ids; 2 teacher tokens the student lacks, 0 student tokens the teacher lacks"
    assert m.keep(np.array([5, 299, 300, 301, 302])).tolist() == [True, True, False, False, False]
    back = compare_vocabularies(tok, extra_tok, student_rows=302 + 64)  # the student has them
    assert back.kind == "compatible" and back.shared[:300].all() and not back.shared[300:].any()


def test_a_tokenizer_trained_otherwise_is_different_naming_a_token(tok, llama_dir):
    from transformers import AutoTokenizer
    other = AutoTokenizer.from_pretrained(llama_dir)
    m = compare_vocabularies(other, tok)
    assert m.kind == "different" and not m.identity and m.shared is None
    s = m.reason.split("'")[1]
    assert other.get_vocab()[s] != tok.get_vocab()[s]
    assert f"is id {other.get_vocab()[s]} in the teacher's vocabulary and {tok.get_vocab()[s]} in the student's" \
        in m.reason


def test_a_text_the_student_tokenizes_otherwise_makes_the_pair_different(tok, extra_tok):
    m = compare_vocabularies(extra_tok, tok)
    plain = "Question: Ava has 3 pens.\nAnswer: 3 #### 3"
    odd = "Question: Ava has <|x1|> pens.\nAnswer: 3 #### 3"
    ids = lambda t, text: t(text)["input_ids"]
    assert check_texts(m, tok, [(0, plain, ids(extra_tok, plain))]) is m
    assert check_texts(m, tok, [(0, plain, ids(extra_tok, plain)[:5])]) is m      # a cut sample: its length
    at = ids(extra_tok, odd).index(300)
    got = check_texts(m, tok, [(0, plain, ids(extra_tok, plain)), (7, odd, ids(extra_tok, odd)),
                               (8, odd, ids(extra_tok, odd))])
    assert got.kind == "different" and got.reason.startswith(
        f"the student tokenizes 2 of 3 samples into other ids than the teacher, sample row 7 (first at token {at}: ")
    few = check_texts(m, tok, [(0, plain, ids(extra_tok, plain)), (7, odd, ids(extra_tok, odd))])
    assert few.kind == "compatible" and few.shared is m.shared
    assert few.reason.startswith(m.reason + f"; 1 of 2 samples checked tokenized otherwise, sample row 7 (first at "
                                            f"token {at}: ")


def _cache(teacher, out, **kw):
    (path,) = extract(ExtractConfig(teachers=[str(teacher)], dataset="synthetic", max_samples=6, batch_size=3,
                                    quantize=False, device="cpu", progress=False, out=str(out), **kw))
    return path


def test_the_cache_keeps_its_teachers_tokenizer_and_checks_it(padded_teachers, tok, tmp_path):
    path = _cache(padded_teachers["extra"], tmp_path / "c")
    c = open_cache(path)
    assert len(teacher_tokenizer(c)) == 302 and (path / "tokenizer" / "tokenizer.json").is_file()
    assert c.manifest["tokenizer"]["eos_token_id"] == tok.eos_token_id and c.manifest["tokenizer"]["bos_token_id"] is None
    m = vocab_match(c, tok, 300)
    assert m.kind == "compatible" and m.shared.sum() == 300
    # without its folder, the manifest's name (here the teacher's local folder) is loaded instead
    shutil.rmtree(path / "tokenizer")
    assert len(teacher_tokenizer(open_cache(path))) == 302
    # a tokenizer that is not the one the cache was made with is refused
    tok.save_pretrained(path / "tokenizer")
    with pytest.raises(KavaError, match=r"the tokenizer at .*tokenizer is not the one the cache was made with"):
        teacher_tokenizer(open_cache(path))
    shutil.rmtree(path / "tokenizer")
    m = json.loads((path / "manifest.json").read_text())
    m["tokenizer"]["name"] = str(tmp_path / "gone")
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(KavaError, match=r"holds no tokenizer/ folder and its teacher's tokenizer .*gone"):
        teacher_tokenizer(open_cache(path))


@pytest.mark.slow
def test_info_says_which_vocabulary_case_applies(padded_teachers, llama_dir, student_like, tmp_path, capsys):
    same = _cache(padded_teachers["same"], tmp_path / "s")
    compatible = _cache(padded_teachers["extra"], tmp_path / "c")
    different = _cache(llama_dir, tmp_path / "d")
    assert info_main([str(same), str(compatible), str(different), "--student", str(student_like)]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("vocabulary")]
    assert lines[0] == f"vocabulary   student {student_like}: same tokenizer: identity alignment, logit " \
                       "distillation with --kd-method topk"
    assert lines[1].startswith(f"vocabulary   student {student_like}: compatible vocabularies (300 tokens with the "
                               "same ids; 2 teacher tokens the student lacks")
    assert lines[1].endswith("--kd-method topk (top-K ids the student lacks are dropped and counted)")
    assert "different vocabularies (token " in lines[2] and lines[2].endswith(
        "character-overlap alignment, logit distillation with --kd-method uld or chunk")
    assert info_main([str(same), "--student", str(tmp_path / "nobody")]) == 1
    assert "student" in capsys.readouterr().err


@pytest.fixture(scope="module")
def student_like(tmp_path_factory, tok):
    from kava_common import save_pretrained
    cfg = tiny.tiny_config("qwen2", len(tok), hidden=32, layers=1, heads=2, kv_heads=1, tok=tok)
    return save_pretrained(tiny.build_model(cfg), tok, tmp_path_factory.mktemp("student-like"))

