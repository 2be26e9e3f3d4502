import numpy as np
import pytest

from kava_demo import tiny
from kava_common.prompt import (SEGMENTS, encode_with_offsets, extract_final_answer, format_prompt,
                                format_sample, token_spans, token_spans_batch)

Q = "Natalia sold clips to 48 friends. How many?"
A = "She sold 48/2 = <<48/2=24>>24 in May.\n#### 72"


def seg(f, name):
    s, e = f.char_spans[SEGMENTS.index(name)]
    return f.text[s:e]


def test_format_sample_segments_by_hand():
    f = format_sample(Q, A)
    assert f.text == "Question: " + Q + "\nAnswer: " + A
    assert f.char_spans == ((10, 53), (62, 99), (105, 107))  # "\n####" at 99..103, " " 104
    assert seg(f, "question") == Q
    assert seg(f, "reasoning") == "She sold 48/2 = <<48/2=24>>24 in May."
    assert seg(f, "answer") == "72"
    assert f.has_final
    assert f.text.startswith(format_prompt(Q))


def test_row_without_final_mark_is_all_reasoning():
    f = format_sample("How much?", "It is 5 dollars.")
    assert seg(f, "reasoning") == "It is 5 dollars."
    assert f.char_spans[2] == (len(f.text), len(f.text))
    assert not f.has_final


def test_empty_answer_and_whitespace():
    f = format_sample("  Why?  ", "   ")
    assert f.text == "Question: Why?\nAnswer:"
    assert f.char_spans == ((10, 14), (22, 22), (22, 22))


def test_non_ascii_counts_code_points():
    f = format_sample("Caf\u00e9 costs \u20ac5?", "\u20ac5 + \u20ac3 = \u20ac8\n####  8 ")
    assert seg(f, "question") == "Caf\u00e9 costs \u20ac5?"
    assert seg(f, "reasoning") == "\u20ac5 + \u20ac3 = \u20ac8"
    assert seg(f, "answer") == "8"


def test_token_spans_overlap_rule():
    # text: "Q: ab\nA: cd #### 7"; hand offsets; token 0 is a BOS with an empty offset,
    # token 6 (" 7") starts on the space before the final answer and still belongs to it.
    offsets = [(0, 0), (0, 2), (3, 5), (5, 9), (9, 11), (11, 16), (16, 18)]
    spans = [(3, 5), (9, 11), (17, 18)]
    assert token_spans(spans, offsets) == [(2, 3), (4, 5), (6, 7)]
    assert token_spans([(18, 18)], offsets) == [(7, 7)]      # empty span at the end
    assert token_spans([(5, 5)], offsets) == [(3, 3)]        # empty span in the middle


def test_token_spans_batch_equals_token_spans_per_sample():
    """The batched version against the per-sample rule, on hand offsets and on random ones
    with special tokens (empty offsets), repeated and out-of-order offsets, samples without
    tokens, and empty spans anywhere."""
    hand = [(0, 0), (0, 2), (3, 5), (5, 9), (9, 11), (11, 16), (16, 18)]
    rng = np.random.default_rng(0)
    offsets, char_spans = [hand, [], [(0, 0)]], [[(3, 5), (9, 11), (17, 18)], [(0, 4), (5, 5), (6, 9)],
                                                 [(0, 0), (0, 3), (3, 3)]]
    for _ in range(300):
        t = int(rng.integers(0, 12))
        starts = np.sort(rng.integers(0, 30, t))
        ends = starts + rng.integers(0, 4, t)                    # some empty (special tokens)
        o = np.stack([starts, ends], 1)
        if t > 2 and rng.random() < 0.3:                          # byte pieces sharing a span
            o[1] = o[2]
        if t > 2 and rng.random() < 0.2:                          # out of order
            o[[0, -1]] = o[[-1, 0]]
        offsets.append(o.astype(np.int32))
        cuts = np.sort(rng.integers(0, 34, 6)).reshape(3, 2)
        char_spans.append([tuple(map(int, c)) for c in cuts])
    got = token_spans_batch(char_spans, offsets)
    assert got.shape == (len(offsets), 3, 2) and got.dtype == np.int64
    for j, (cs, o) in enumerate(zip(char_spans, offsets)):
        assert [tuple(x) for x in got[j].tolist()] == token_spans(cs, o), j
    assert got[0].tolist() == [[2, 3], [4, 5], [6, 7]]
    assert got[1].tolist() == [[0, 0], [0, 0], [0, 0]]           # no tokens: empty at 0
    assert token_spans_batch([], []).shape == (0, 0, 2)


def test_extract_final_answer():
    assert extract_final_answer(A) == "72"
    assert extract_final_answer("x\n#### 1,234\nmore") == "1234"
    assert extract_final_answer("no mark 5") is None


TEXTS = [format_sample(Q, A).text, "", "caf\u00e9 \u20ac5 \u201cquoted\u201d #### 5", "x" * 300]


def _reference(tok, texts):
    enc = tok(texts, return_offsets_mapping=True, add_special_tokens=True)
    return [(list(i), [tuple(o) for o in offs]) for i, offs in zip(enc["input_ids"], enc["offset_mapping"])]


def _as_lists(encoded):
    out = []
    for ids, offs in encoded:
        assert ids.dtype == np.int64 and offs.dtype == np.int32 and offs.shape == (len(ids), 2)
        out.append((ids.tolist(), [tuple(o) for o in offs.tolist()]))
    return out


@pytest.mark.parametrize("add_bos", [False, True])
def test_encode_with_offsets_equals_the_tokenizer_call(add_bos):
    t = tiny.train_tokenizer(tiny.corpus(300, seed=5) + [TEXTS[2]], vocab_size=280, add_bos=add_bos)
    # a truncation set on the backend (as some hub tokenizer.json files do) must not leak in:
    # transformers' call turns it off, and so must the fast path
    t.backend_tokenizer.enable_truncation(max_length=8)
    ref = _reference(t, TEXTS)
    assert len(ref[3][0]) > 8 and (ref[0][0][0] == t.bos_token_id) == add_bos
    assert _as_lists(encode_with_offsets(t, TEXTS)) == ref
    assert encode_with_offsets(t, []) == []


def test_encode_with_offsets_falls_back_when_the_backend_disagrees(tok, monkeypatch):
    other = tiny.train_tokenizer(tiny.corpus(50, seed=9), vocab_size=270).backend_tokenizer
    ref = _reference(tok, TEXTS)
    monkeypatch.setattr(type(tok), "backend_tokenizer", property(lambda self: other))
    assert [len(e.ids) for e in other.encode_batch(TEXTS[:1])] != [len(ref[0][0])]  # really differs
    assert _as_lists(encode_with_offsets(tok, TEXTS)) == ref
