"""stage1_extract.slot_answers: the teacher's answer read after its chain of thought's K/V slots."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def slot_cache(teacher_dir, tmp_path_factory):
    """A float32 cache of every teacher layer with 6 R-KV slots (lambda 0.3)."""
    from stage1_extract.config import ExtractConfig
    from stage1_extract.extract import main as extract
    cfg = ExtractConfig(teachers=[str(teacher_dir)], dataset="synthetic", max_samples=6, batch_size=3,
                        quantize=False, dtype="float32", kv_dtype="float32", device="cpu", progress=False,
                        out=str(tmp_path_factory.mktemp("slots")), rkv_slots=6, rkv_lambda=0.3)
    (path,) = extract(cfg)
    return path


def _teacher(teacher_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()


def _scores(model, ids, positions, a0, a1):
    """(all right, right, summed NLL) of the answer tokens from one forward over `ids` at `positions`."""
    with torch.no_grad():
        # the mask given: without it transformers reads a jump in the positions as a second sequence packed in
        logits = model(input_ids=ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       position_ids=positions[None], use_cache=False).logits[0].float()
    at = len(ids) - (a1 - a0)                     # where the answer starts in `ids`
    pred, target = logits[at - 1:len(ids) - 1], ids[at:]
    right = int((pred.argmax(-1) == target).sum())
    return right == len(target), right, float(torch.nn.functional.cross_entropy(pred, target, reduction="sum"))


@pytest.mark.slow
def test_full_and_none_forms_equal_the_teacher_over_the_text_and_all_slots_equal_full(teacher_dir, slot_cache):
    """`full`: the answer after the cached question and reasoning K/V scores as the teacher over
    the whole text; `none`: as the teacher over the text without its chain of thought, the
    answer at its own positions; more slots than reasoning tokens keep them all, so score as
    `full`; the slots of the cache's M and lambda are the stored ones."""
    from kava_common.cache import open_cache
    from stage1_extract.slot_answers import answer_scores, past_kv
    c, model = open_cache(slot_cache), _teacher(teacher_dir)
    for i in range(len(c)):
        s, stored = c[i], c.rkv(i)
        (r0, r1), (a0, a1) = s["token_segments"]["reasoning"], s["token_segments"]["answer"]
        ids, imp = s["input_ids"], stored["importance"]
        full = answer_scores(model, ids, past_kv(s["k"], s["v"], r0, r1, imp, None, 0, 0.3, full=True), r1, a0, a1)
        want = _scores(model, ids[:a1], torch.arange(a1), a0, a1)
        assert full[:2] == want[:2] and full[2] == pytest.approx(want[2], rel=1e-4, abs=1e-5), i
        keep = torch.cat([torch.arange(r0), torch.arange(r1, a1)])
        none = answer_scores(model, ids, past_kv(s["k"], s["v"], r0, r1, imp, None, 0, 0.3, full=False), r1, a0, a1)
        want = _scores(model, ids[keep], keep, a0, a1)
        assert none[:2] == want[:2] and none[2] == pytest.approx(want[2], rel=1e-4, abs=1e-5), i
        for how in ("rkv", "even"):
            every = answer_scores(model, ids, past_kv(s["k"], s["v"], r0, r1, imp, how, r1 - r0, 0.3, full=False),
                                  r1, a0, a1)
            assert every[:2] == full[:2] and every[2] == pytest.approx(full[2], rel=1e-5, abs=1e-6), (i, how)
        past = past_kv(s["k"], s["v"], r0, r1, imp, "rkv", 6, 0.3, full=False)
        for layer, (k, v) in enumerate(past):
            assert k.shape == (1, 2, r0 + 6, 32)
            assert torch.equal(k[0, :, :r0], s["k"][layer, :, :r0]) and torch.equal(k[0, :, r0:], stored["k"][layer])
            assert torch.equal(v[0, :, r0:], stored["v"][layer])


@pytest.mark.slow
def test_slot_answers_reports_each_form_and_refuses_what_it_cannot_score(teacher_dir, slot_cache, tmp_path, capsys):
    """The command over the cache: one row per form, `full` every answer the teacher gets right
    over the whole text, slots counted per layer and head; a cache of some layers, a teacher
    with other weights and a cache without slots asked for R-KV slots are refused, naming them."""
    import shutil
    from kava_common.cache import open_cache
    from stage1_extract.config import ExtractConfig
    from stage1_extract.extract import main as extract
    from stage1_extract.slot_answers import SlotAnswersArgs, main, slot_answers
    res = slot_answers(SlotAnswersArgs(cache=str(slot_cache), slots=[2, 100], device="cpu", progress=False))
    c, model = open_cache(slot_cache), _teacher(teacher_dir)
    right = []
    for i in range(len(c)):
        s = c[i]
        a0, a1 = s["token_segments"]["answer"]
        right.append(_scores(model, s["input_ids"][:a1], torch.arange(a1), a0, a1)[0])
    reasoning = [c[i]["token_segments"]["reasoning"] for i in range(len(c))]
    assert res["samples"] == 6 and res["skipped"] == {} and res["lambda"] == 0.3
    assert list(res["forms"]) == ["full", "rkv 2", "rkv 100", "even 2", "even 100", "none"]
    assert res["forms"]["full"]["exact"] == pytest.approx(sum(right) / 6)
    assert res["forms"]["rkv 100"]["exact"] == res["forms"]["full"]["exact"]
    assert res["forms"]["full"]["slots"] == pytest.approx(sum(b - a for a, b in reasoning) / 6)
    assert res["forms"]["rkv 2"]["slots"] == 2 and res["forms"]["none"]["slots"] == 0
    assert main([str(slot_cache), "--slots", "2", "--select", "even", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| even 2 | 2.0 |" in out and out.count("\n| ") == 4      # header, full, even 2, none
    from kava_common.cache.read import KVCache
    read = KVCache.__getitem__

    def bad_k(self, i):                   # sample 4's keys hold a NaN: left out and said, never averaged in
        s = read(self, i)
        if i == 4:
            s["k"] = s["k"].clone()
            s["k"][1, 0, 3, 5] = float("nan")
        return s
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KVCache, "__getitem__", bad_k)
        res5 = slot_answers(SlotAnswersArgs(cache=str(slot_cache), slots=[2], select=["even"], device="cpu",
                                            progress=False))
        assert main([str(slot_cache), "--slots", "2", "--select", "even", "--no-progress"]) == 0
    assert res5["samples"] == 5 and res5["skipped"] == {4: "its K/V hold NaN or Inf"}
    assert res5["forms"]["full"]["exact"] == pytest.approx(sum(right[:4] + right[5:]) / 5)
    assert "skipped 1 sample(s), e.g. sample 4: its K/V hold NaN or Inf" in capsys.readouterr().out
    (some,) = extract(ExtractConfig(teachers=[str(teacher_dir)], dataset="synthetic", max_samples=2, quantize=False,
                                    device="cpu", progress=False, out=str(tmp_path / "some"), layers=[0, 2]))
    assert main([str(some), "--select", "even", "--no-progress"]) == 1
    assert "holds teacher layers [0, 2] of 3; the teacher's answer needs the K/V of every layer" in \
        capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(teacher_dir, other)
    w = other / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\1")
    assert main([str(slot_cache), "--teacher", str(other), "--no-progress"]) == 1
    assert f"teacher '{other}'" in (err := capsys.readouterr().err) and "is not the one that wrote the cache" in err
    assert main([str(slot_cache), "--teacher", str(tmp_path / "gone"), "--no-progress"]) == 1
    assert f"teacher '{tmp_path / 'gone'}' could not be loaded (" in (err := capsys.readouterr().err) and \
        err.rstrip().endswith("give its folder or hub id with --teacher") and "Traceback" not in err
    (plain,) = extract(ExtractConfig(teachers=[str(teacher_dir)], dataset="synthetic", max_samples=2, quantize=False,
                                     device="cpu", progress=False, out=str(tmp_path / "plain")))
    assert main([str(plain), "--no-progress"]) == 1
    assert "made without --rkv-slots, so it holds no importance to choose R-KV slots by" in capsys.readouterr().err
    assert main([str(slot_cache), "--slots", "0", "--select", "best"]) == 1
    assert "--slots 0: must be at least 1; --select 'best': choose rkv, even, results" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["plain", "packed"])
def test_a_4bit_teacher_reads_its_answer_on_either_cpu_path_and_falls_back_to_plain_saying_so(
        teacher_dir, tmp_path, monkeypatch, kernel):
    """A cache a 4-bit teacher wrote: the check loads it 4-bit on the path the cache was written
    on (`full` then scores close to that teacher over the whole text), or on the plain path,
    saying so, where this CPU has no packed kernel."""
    from kava_common.cache import open_cache
    from stage1_extract import slot_answers as sa
    from stage1_extract.config import ExtractConfig
    from stage1_extract.extract import main as extract
    from stage1_extract.teacher import load_teacher
    if kernel == "packed" and not sa.has_packed_kernel():
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes' packed 4-bit kernel cannot run here")
    (path,) = extract(ExtractConfig(teachers=[str(teacher_dir)], dataset="synthetic", max_samples=4, batch_size=2,
                                    quantize=True, cpu_4bit_kernel=kernel, kv_dtype="float16", device="cpu",
                                    progress=False, out=str(tmp_path), rkv_slots=4))
    said = []
    res = sa.slot_answers(sa.SlotAnswersArgs(cache=str(path), slots=[4], device="cpu", progress=False),
                          echo=said.append)
    assert res["cpu_kernel"] == kernel and said == []
    c = open_cache(path)
    quant = {k: v for k, v in c.manifest["teacher"]["quantization"].items()
             if k not in ("cpu_kernel", "cpu_plain_modules")}
    model = load_teacher(str(teacher_dir), quant, torch.device("cpu"), cpu_4bit_kernel=kernel)
    nll = tokens = 0
    for i in range(len(c)):
        s = c[i]
        a0, a1 = s["token_segments"]["answer"]
        nll += _scores(model, s["input_ids"][:a1], torch.arange(a1), a0, a1)[2]
        tokens += a1 - a0
    # the cached K/V (float16, from a padded batch) against one bf16 forward: close, not equal
    assert res["forms"]["full"]["nll"] == pytest.approx(nll / tokens, rel=0.02)
    if kernel == "packed":
        monkeypatch.setattr(sa, "has_packed_kernel", lambda: False)
        res = sa.slot_answers(sa.SlotAnswersArgs(cache=str(path), slots=[4], device="cpu", progress=False),
                              echo=said.append)
        assert res["cpu_kernel"] == "plain" and len(said) == 1 and "runs on the plain path" in said[0]
