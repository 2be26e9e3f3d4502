"""R-KV selection of chain-of-thought K/V (kava_common.rkv), by hand on small tensors."""

import math
import re

import pytest
import torch

from kava_common.rkv import gather_slots, importance, redundancy, rkv_select, select


def test_importance_is_the_answers_mean_attention_maxed_over_the_query_group():
    k = torch.tensor([[[1.0], [0.0]]])                    # 1 KV head, 2 reasoning keys, head_dim 1
    # query head 0 attends evenly; head 1 asks with q 2 then 0 (scale 1/sqrt(1))
    q = torch.tensor([[[0.0], [0.0]], [[2.0], [0.0]]])    # (2 query heads, 2 answer tokens, 1)
    e2 = math.exp(2)
    head1 = [(e2 / (e2 + 1) + 0.5) / 2, (1 / (e2 + 1) + 0.5) / 2]
    got = importance(q, k)
    assert got.shape == (1, 2)
    assert got[0].tolist() == pytest.approx([max(0.5, head1[0]), max(0.5, head1[1])], rel=1e-6)
    # two KV heads, one query head each: no max across KV heads
    k2 = torch.cat([k, torch.tensor([[[0.0], [1.0]]])])
    got2 = importance(q, k2)
    assert got2[0].tolist() == pytest.approx([0.5, 0.5]) and got2[1].tolist() == pytest.approx(
        [(1 / (e2 + 1) + 0.5) / 2, (e2 / (e2 + 1) + 0.5) / 2], rel=1e-6)
    # a padded key takes no attention
    assert importance(q, k, torch.tensor([True, False]))[0].tolist() == pytest.approx([1.0, 0.0])
    with pytest.raises(ValueError, match="3 query heads do not share 2 KV heads"):
        importance(torch.zeros(3, 1, 1), k2)


def test_redundancy_favours_a_key_unlike_the_others_and_ignores_padding():
    k = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]])   # keys 0 and 1 point the same way
    # mean cosine to the others: 0.5, 0.5, 0 -> softmax of minus them
    a, b = math.exp(-0.5), 1.0
    assert redundancy(k)[0].tolist() == pytest.approx([a / (2 * a + b), a / (2 * a + b), b / (2 * a + b)], rel=1e-6)
    # key 1 is padding: keys 0 and 2 have nothing alike left, and 1 gets nothing
    assert redundancy(k, torch.tensor([True, False, True]))[0].tolist() == pytest.approx([0.5, 0.0, 0.5])


def test_select_keeps_the_best_in_time_order_earlier_on_ties_and_marks_empty_slots():
    assert select(torch.tensor([[0.1, 0.8, 0.9]]), 2)[0].tolist() == [[1, 2]]       # time order, not score order
    assert select(torch.tensor([[0.3, 0.5, 0.5, 0.1]]), 2)[0].tolist() == [[1, 2]]
    assert select(torch.tensor([[0.3, 0.5, 0.5, 0.1]]), 1)[0].tolist() == [[1]]     # a tie: the earlier token
    index, mask = select(torch.tensor([[0.2, 0.7]]), 3)                              # fewer tokens than slots
    assert index.tolist() == [[0, 1, -1]] and mask.tolist() == [[True, True, False]]
    # padding is never selected, however high its score
    index, mask = select(torch.tensor([[0.2, 9.0, 0.1]]), 3, torch.tensor([True, False, True]))
    assert index.tolist() == [[0, 2, -1]] and mask.tolist() == [[True, True, False]]
    x = torch.arange(6.0).view(1, 3, 2)
    assert gather_slots(x, torch.tensor([[2, 0, -1]])).tolist() == [[[4.0, 5.0], [0.0, 1.0], [0.0, 0.0]]]


def test_lambda_mixes_importance_and_redundancy_and_the_slots_are_the_keys_at_the_index():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(4, 5, 8, generator=g), torch.randn(2, 9, 8, generator=g), torch.randn(2, 9, 8, generator=g)
    imp, red = importance(q, k), redundancy(k)
    for lam in (0.0, 0.1, 1.0):
        got = rkv_select(q, k, v, 4, lam)
        want, _ = select(lam * imp + (1 - lam) * red, 4)
        assert torch.equal(got["index"], want) and torch.equal(got["I"], imp)
        for h in range(2):
            assert torch.equal(got["k"][h], k[h, want[h]]) and torch.equal(got["v"][h], v[h, want[h]])
    assert torch.equal(rkv_select(q, k, v, 4, 1.0)["index"], select(imp, 4)[0])       # importance only
    assert torch.equal(rkv_select(q, k, v, 4, 0.0)["index"], select(red, 4)[0])       # redundancy only
    short = rkv_select(q, k[:, :2], v[:, :2], 4)                                      # 2 reasoning tokens
    assert short["mask"].tolist() == [[True, True, False, False]] * 2 and not short["k"][:, 2:].any()
    with pytest.raises(ValueError, match=r"--rkv-lambda must lie in \[0, 1\], got 1.5"):
        rkv_select(q, k, v, 4, 1.5)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_captured_answer_queries_are_the_queries_the_attention_uses(arch, monkeypatch):
    """QueryCapture's post-RoPE queries at chosen positions of a padded batch equal the
    query_states each attention layer computes there (recorded from the model's own RoPE call)."""
    import sys
    from kava_demo import tiny
    from stage1_extract.capture import QueryCapture
    cfg = tiny.tiny_config(arch, 97, hidden=64, layers=3, heads=4, kv_heads=2, head_dim=16, intermediate=96)
    model = tiny.build_model(cfg, seed=3).eval()
    attn = type(model.get_decoder().layers[0].self_attn)
    mod = sys.modules[attn.__module__]
    seen = []
    real = mod.apply_rotary_pos_emb
    monkeypatch.setattr(mod, "apply_rotary_pos_emb", lambda q, k, cos, sin, *a, **kw: seen.append(
        real(q, k, cos, sin, *a, **kw)) or seen[-1])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (2, 11), generator=g)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0                                       # left padding, as stage 1 pads
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    index = torch.tensor([[6, 7, 10], [8, 9, 10]])        # answer positions along the padded axis
    with QueryCapture(model, [0, 2]) as qc:
        qc.want(index)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    own = [s[0] for s in seen if s[0].shape[2] == 11]     # the layers' own calls (the capture's hold 3 positions)
    assert len(own) == 3 and sorted(qc.got) == [0, 2]
    for l in (0, 2):
        want = torch.stack([own[l][b, :, index[b]] for b in range(2)])          # (B, Hq, P, D)
        assert qc.got[l].shape == (2, 4, 3, 16)
        assert torch.allclose(qc.got[l], want, atol=1e-6), (l, (qc.got[l] - want).abs().max())


# 200: longer than any chain of thought here; max_length 220 cuts the longer samples' reasoning and answer
@pytest.mark.slow
@pytest.mark.parametrize("slots,max_length", [(8, 512), (200, 512), (8, 220)])
def test_stage1_stores_rkv_slots_equal_to_a_recomputation_from_the_full_cache(teacher_dir, tmp_path, slots,
                                                                              max_length):
    """--rkv-slots M: per sample and stored layer, the slots, their positions and the importance
    equal R-KV's selection recomputed from the full cache's keys and values and the answer's
    queries of an unbatched forward; a chain of thought shorter than M keeps every token."""
    from transformers import AutoModelForCausalLM
    from kava_common import KavaError
    from kava_common.cache import open_cache
    from stage1_extract.capture import QueryCapture
    from stage1_extract.config import ExtractConfig
    from stage1_extract.extract import main as extract
    cfg = ExtractConfig(teachers=[str(teacher_dir)], dataset="synthetic", max_samples=12, batch_size=5,
                        quantize=False, device="cpu", progress=False, out=str(tmp_path), rkv_slots=slots,
                        rkv_lambda=0.3, layers=[0, 2], max_length=max_length)
    (path,) = extract(cfg)
    c = open_cache(path, verify=True)
    c.verify()
    assert (c.meta.rkv_slots, c.meta.rkv_lambda) == (slots, 0.3)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    short = 0
    for i in range(len(c)):
        s, got = c[i], c.rkv(i)
        (r0, r1), (a0, a1) = s["token_segments"]["reasoning"], s["token_segments"]["answer"]
        with QueryCapture(model, [0, 2]) as qc, torch.no_grad():
            qc.want(torch.arange(a0, a1)[None])
            model(input_ids=s["input_ids"][None], use_cache=False)
        kv = c.kv(i)
        for li, l in enumerate([0, 2]):
            want = rkv_select(qc.got[l][0], kv["k"][li][:, r0:r1].float(), kv["v"][li][:, r0:r1].float(), slots, 0.3)
            assert torch.equal(got["index"][li], torch.where(want["mask"], want["index"] + r0, -1)), (i, l)
            assert torch.equal(got["mask"][li], want["mask"])
            assert torch.equal(got["k"][li].float(), want["k"]) and torch.equal(got["v"][li].float(), want["v"])
            assert torch.allclose(got["importance"][li][:, r0:r1], want["I"], atol=1e-5)
            assert not got["importance"][li][:, :r0].any() and not got["importance"][li][:, r1:].any()
        short += r1 - r0 < slots
        if r1 - r0 < slots:                                   # every reasoning token kept, the rest empty
            assert got["mask"][0, 0].sum() == r1 - r0 and not got["k"][:, :, r1 - r0:].any()
    assert c.meta.num_samples == 12 and short == (12 if slots == 200 else 0)
    if max_length < 512:        # some answers cut away: their importance is 0, the slots still filled
        cut = [i for i in range(len(c)) if c[i]["truncated"]]
        assert 0 < len(cut) < 12 and all(c[i]["token_segments"]["answer"][0] == 220 for i in cut)
        assert all(not c.rkv(i)["importance"].any() and c.rkv(i)["mask"].all() for i in cut)
    if slots == 200 or max_length < 512:
        return
    # without --rkv-slots, the cache and its fingerprint are as before
    plain = ExtractConfig(**{**cfg.__dict__, "rkv_slots": 0, "out": str(tmp_path / "plain")})
    (p2,) = extract(plain)
    assert "rkv" not in open_cache(p2).meta.raw["identity"] and open_cache(p2).meta.rkv_slots == 0
    with pytest.raises(KavaError, match="made without --rkv-slots"):
        open_cache(p2).rkv(0)


def _rkv_cfg(teacher, out, **kw):
    from stage1_extract.config import ExtractConfig
    return ExtractConfig(**{**dict(teachers=[str(teacher)], dataset="synthetic", out=str(out), max_samples=10,
                                   batch_size=3, quantize=False, dtype="float32", kv_dtype="float16", shard_mb=0.2,
                                   device="cpu", progress=False, layers=[0, 2]), **kw})


@pytest.mark.slow
def test_recompress_chooses_rkv_slots_again_as_stage1_would_without_the_teacher(teacher_dir, tmp_path):
    """From a cache with R-KV slots (M 8, lambda 0.3), recompress with another M and lambda, a
    layer subset, int8 K/V or no slots gives the very samples stage 1 writes with those settings."""
    from kava_common import KavaError
    from kava_common.cache import open_cache
    from kava_common.recompress import RecompressArgs, recompress
    from stage1_extract.extract import main as extract
    (parent,) = extract(_rkv_cfg(teacher_dir, tmp_path / "parent", rkv_slots=8, rkv_lambda=0.3))
    cases = [({"rkv_slots": 4, "rkv_lambda": 0.7}, {"rkv_slots": 4, "rkv_lambda": 0.7}),
             ({"rkv_slots": 12}, {"rkv_slots": 12, "rkv_lambda": 0.3}),
             ({"kv_quant": "int8", "kv_quant_group": 8}, {"rkv_slots": 8, "rkv_lambda": 0.3, "kv_quant": "int8",
                                                           "kv_quant_group": 8}),
             ({"rkv_slots": 0}, {})]
    for i, (args, settings) in enumerate(cases):
        derived = recompress(RecompressArgs(cache=str(parent), out=str(tmp_path / f"derived{i}"), progress=False,
                                            **args), log=lambda *a: None)
        (direct,) = extract(_rkv_cfg(teacher_dir, tmp_path / f"direct{i}", **settings))
        assert derived.name == direct.name, args               # the same identity, so the same fingerprint
        a, b = open_cache(derived), open_cache(direct)
        assert len(a) == len(b) == 10
        for i in range(10):                                    # sample for sample (a layer subset shards otherwise)
            ka, kb = a.kv(i), b.kv(i)
            assert all(torch.equal(ka[n], kb[n]) for n in ("input_ids", "k", "v")), (args, i)
            if settings:
                ra, rb = a.rkv(i), b.rkv(i)
                assert all(torch.equal(ra[n], rb[n]) for n in ("k", "v", "index", "mask", "importance")), (args, i)
        assert a.verify() > 0 and b.meta.rkv_slots == settings.get("rkv_slots", 0)
    # a layer subset: the same slots as the whole cache's for that layer (stage 1 with fewer layers
    # plans other shards, so other batches, whose padding moves float16 values by an ulp)
    sub = open_cache(recompress(RecompressArgs(cache=str(parent), out=str(tmp_path / "sub"), progress=False,
                                               rkv_slots=12, layers=[2]), log=lambda *a: None))
    whole = open_cache(next((tmp_path / "derived1").iterdir()), layers=[2])
    for i in range(10):
        ra, rb = sub.rkv(i), whole.rkv(i)
        assert all(torch.equal(ra[n], rb[n]) for n in ("k", "v", "index", "importance")) and ra["k"].shape[0] == 1
    bad = [({"rkv_slots": 4, "kv_dtype": "float32"}, "importance was computed from float16 keys"),
           ({"rkv_lambda": 1.5}, r"--rkv-lambda in \[0, 1\], got 8 and 1.5")]
    for args, message in bad:
        with pytest.raises(KavaError, match=message):
            recompress(RecompressArgs(cache=str(parent), out=str(tmp_path / "bad"), progress=False, **args))
    plain = tmp_path / "derived3" / next((tmp_path / "derived3").iterdir()).name
    with pytest.raises(KavaError, match="made without --rkv-slots, so it holds no importance"):
        recompress(RecompressArgs(cache=str(plain), rkv_slots=4, progress=False))
    quantized = next((tmp_path / "derived2").iterdir())
    with pytest.raises(KavaError, match="its K/V are quantized, and R-KV slots are chosen from the float keys"):
        recompress(RecompressArgs(cache=str(quantized), kv_dtype="float16", progress=False))


@pytest.mark.slow
def test_store_hidden_keeps_every_layers_output_at_the_token_before_the_answer(teacher_dir, tmp_path):
    """--store-hidden: per sample (batched, padded), each decoder layer's output at the token
    before the answer equals an unbatched forward's hidden states there (the last layer's,
    after the final norm, as transformers reports it)."""
    from transformers import AutoModelForCausalLM
    from kava_common import KavaError
    from kava_common.cache import open_cache
    from kava_common.recompress import RecompressArgs, recompress
    from stage1_extract.extract import main as extract
    (path,) = extract(_rkv_cfg(teacher_dir, tmp_path, store_hidden=True, kv_dtype="float32", layers=[0]))
    c = open_cache(path, verify=True)
    c.verify()
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    n_layers = model.config.num_hidden_layers
    for i in range(len(c)):
        s, got = c[i], c.hidden(i)
        at = s["token_segments"]["answer"][0] - 1
        with torch.no_grad():
            hs = model(input_ids=s["input_ids"][None], output_hidden_states=True, use_cache=False).hidden_states
        assert got.shape == (n_layers, model.config.hidden_size)
        for l in range(n_layers - 1):
            assert torch.allclose(got[l], hs[l + 1][0, at], atol=1e-5), (i, l)
        final = model.model.norm(got[-1][None])[0]
        assert torch.allclose(final, hs[n_layers][0, at], atol=1e-5), i
    # recompress carries them, in the new float dtype
    derived = open_cache(recompress(RecompressArgs(cache=str(path), out=str(tmp_path / "d"), kv_dtype="float16",
                                                   progress=False), log=lambda *a: None), verify=True)
    assert derived.verify() > 0 and torch.equal(derived.hidden(3), c.hidden(3).half())
    (plain,) = extract(_rkv_cfg(teacher_dir, tmp_path / "plain"))
    with pytest.raises(KavaError, match="made without --store-hidden"):
        open_cache(plain).hidden(0)


@pytest.mark.slow
def test_evenly_spaced_slots_and_their_cache_equal_stage1_by_recompress(teacher_dir, tmp_path):
    """--rkv-select even: M evenly spaced reasoning tokens, the first and last among them, all of
    a shorter chain; stage 1 with it equals recompress from an R-KV cache, and its fingerprint
    differs from the R-KV cache's while the default keeps the fingerprint R-KV caches had."""
    from kava_common.cache import open_cache
    from kava_common.recompress import RecompressArgs, recompress
    from kava_common.rkv import even_slots
    from stage1_extract.extract import main as extract
    assert even_slots(2, 10, 4)[0].tolist() == [[0, 3, 6, 9]] * 2
    assert even_slots(1, 7, 3)[0].tolist() == [[0, 3, 6]]
    index, mask = even_slots(1, 2, 4)
    assert index.tolist() == [[0, 1, -1, -1]] and mask.tolist() == [[True, True, False, False]]
    (rkv,) = extract(_rkv_cfg(teacher_dir, tmp_path / "rkv", rkv_slots=6))
    (even,) = extract(_rkv_cfg(teacher_dir, tmp_path / "even", rkv_slots=6, rkv_select="even"))
    assert open_cache(rkv).fingerprint != open_cache(even).fingerprint
    assert "rkv_select" not in open_cache(rkv).meta.raw["identity"] and open_cache(even).meta.rkv_select == "even"
    derived = open_cache(recompress(RecompressArgs(cache=str(rkv), out=str(tmp_path / "d"), rkv_select="even",
                                                   progress=False), log=lambda *a: None))
    e = open_cache(even)
    assert derived.path.name == e.path.name
    for i in range(len(e)):
        a, b = derived.rkv(i), e.rkv(i)
        assert all(torch.equal(a[n], b[n]) for n in ("k", "v", "index", "importance")), i
        (r0, r1) = e.text(i)["token_segments"]["reasoning"]
        assert b["index"][0, 0].tolist() == [x + r0 if x >= 0 else -1 for x in even_slots(1, r1 - r0, 6)[0][0].tolist()]


def test_result_tokens_are_those_holding_each_calculator_results_first_character():
    """GSM8K's <<a op b=c>>c: the token that holds the character after each '>>', indices from the
    chain of thought's first token; tokens outside it are not looked at; the results' slots keep
    them in order, evenly spaced when there are more than M, the rest empty when fewer."""
    from kava_common.rkv import result_slots, result_tokens
    text = "Q?\nA: 8-3=<<8-3=5>>5 left.\n5*2=<<5*2=10>>10 now.\n#### 10"
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+|\n", text)]
    # tokens: whitespace-split words, so ">>5" is one token starting at the '<<' block's end
    r0 = next(i for i, (a, _) in enumerate(words) if text[a:].startswith("8-3"))
    r1 = next(i for i, (a, _) in enumerate(words) if text[a:].startswith("####"))
    got = result_tokens(text, words, r0, r1)
    assert [text[slice(*words[r0 + t])] for t in got] == ["8-3=<<8-3=5>>5", "5*2=<<5*2=10>>10"]
    chars = [(i, i + 1) for i in range(len(text))]                # one token per character
    start = text.index("8-3")
    got = result_tokens(text, chars, start, text.index("####"))
    assert [text[start + t] for t in got] == ["5", "1"] and got == [text.index(">>5") + 2 - start,
                                                                    text.index(">>10") + 2 - start]
    assert result_tokens(text, chars, start, text.index(">>10") + 2) == [text.index(">>5") + 2 - start]
    assert result_tokens(text, chars, 5, 5) == []
    index, mask = result_slots(2, [3, 9], 4)
    assert index.tolist() == [[3, 9, -1, -1]] * 2 and mask.tolist() == [[True, True, False, False]] * 2
    assert result_slots(1, [1, 4, 6, 8, 11], 3)[0].tolist() == [[1, 6, 11]]
    assert result_slots(1, [], 2)[0].tolist() == [[-1, -1]]


@pytest.mark.slow
def test_result_slots_in_stage1_equal_recompress_and_sit_on_the_results(teacher_dir, tmp_path):
    """--rkv-select results: every stored slot is the token after a '>>' of the chain of thought,
    in order, the same for every layer and head; stage 1 with it equals recompress from an R-KV
    cache, sample for sample."""
    from kava_common.cache import open_cache
    from kava_common.recompress import RecompressArgs, recompress
    from stage1_extract.extract import main as extract
    (rkv,) = extract(_rkv_cfg(teacher_dir, tmp_path / "rkv", rkv_slots=3))
    (res,) = extract(_rkv_cfg(teacher_dir, tmp_path / "res", rkv_slots=3, rkv_select="results"))
    e = open_cache(res)
    assert e.meta.rkv_select == "results" and e.fingerprint != open_cache(rkv).fingerprint
    derived = open_cache(recompress(RecompressArgs(cache=str(rkv), out=str(tmp_path / "d"), rkv_select="results",
                                                   progress=False), log=lambda *a: None))
    assert derived.path.name == e.path.name
    filled = 0
    for i in range(len(e)):
        a, b = derived.rkv(i), e.rkv(i)
        assert all(torch.equal(a[n], b[n]) for n in ("k", "v", "index", "mask", "importance")), i
        s = e[i]
        (r0, r1), offs, text = s["token_segments"]["reasoning"], s["char_offsets"].tolist(), s["text"]
        marks = [m.end() for m in re.finditer(">>", text[offs[r0][0]:offs[r1 - 1][1]])]
        idx = b["index"][0, 0][b["mask"][0, 0]].tolist()
        assert (b["index"] == b["index"][0, 0]).all()                  # every layer and head alike
        assert len(idx) == min(3, len(marks)) and idx == sorted(idx)
        for t in idx:                                                  # each holds a result's first character
            assert any(offs[t][0] <= offs[r0][0] + c < offs[t][1] for c in marks), (i, t)
        assert torch.equal(b["k"][0, 0, :len(idx)], s["k"][0, 0, idx])
        filled += len(idx)
    assert filled > 0


@pytest.mark.slow
def test_samples_without_calculator_results_are_counted_and_their_slots_left_empty(teacher_dir, tmp_path,
                                                                                      monkeypatch):
    import stage1_extract.extract as ex
    from kava_common.cache import open_cache
    from kava_common.data import load_rows
    monkeypatch.setattr(ex, "result_tokens", lambda text, offsets, r0, r1: [])
    said = []
    cfg = _rkv_cfg(teacher_dir, tmp_path, rkv_slots=3, rkv_select="results", max_samples=4)
    path = ex.extract_teacher(cfg, str(teacher_dir), load_rows("synthetic", None, 4, seed=cfg.seed), log=said.append)
    assert any("--rkv-select results: 4 of 4 samples have no calculator result ('>>') in their chain of thought; "
               "their slots stay empty (masked), so they teach no K/V" in s for s in said)
    c = open_cache(path)
    assert all(not c.rkv(i)["mask"].any() and (c.rkv(i)["index"] == -1).all() for i in range(4))
