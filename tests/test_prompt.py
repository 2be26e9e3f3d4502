from kava_common.prompt import (SEGMENTS, extract_final_answer, format_prompt, format_sample,
                                token_spans)

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


def test_extract_final_answer():
    assert extract_final_answer(A) == "72"
    assert extract_final_answer("x\n#### 1,234\nmore") == "1234"
    assert extract_final_answer("no mark 5") is None
