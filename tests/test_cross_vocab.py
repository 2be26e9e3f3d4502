"""Logit distillation across vocabularies (compatible ids, ULD, chunk likelihoods), and several
teachers weighted per sample by their confidence: losses by hand, plumbing against a
recomputation, and whole runs."""

import json
import math
import os
import signal
import types

import pytest
import torch

from conftest import write_jsonl
from kava_common.cache import open_cache
from stage1_extract.config import ExtractConfig
from stage1_extract.extract import main as extract
from stage2_train.align import prefix_ends, prefix_pairs, shared_chunks
from stage2_train.config import TrainConfig
from stage2_train.data import DistillData, answer_logprob, collate
from stage2_train.losses import _masked_mean, chunk_kd_loss, topk_kd_loss, uld_loss
from stage2_train.train import Stopped, main as train
from stage2_train.trainer import Trainer

ONE = torch.ones(1, 1, dtype=torch.bool)


# --- losses by hand -------------------------------------------------------------------------

def test_uld_compares_sorted_probabilities_not_ids():
    """Teacher top-2 [0.5, 0.3] (tail 0.2); student [0.1, 0.6, 0.2, 0.1], sorted [0.6, 0.2 | 0.2]:
    |0.6 - 0.5| + |0.2 - 0.3| + |0.2 - 0.2| = 0.2, though the two put their mass on other ids."""
    lps = torch.log(torch.tensor([[[0.5, 0.3]]]))
    student = torch.log(torch.tensor([[[0.1, 0.6, 0.2, 0.1]]]))
    assert uld_loss(student, lps, ONE).item() == pytest.approx(0.2, abs=1e-6)
    same = torch.log(torch.tensor([[[0.05, 0.3, 0.15, 0.5]]]))               # the teacher's, ids permuted
    assert uld_loss(same, lps, ONE).item() == pytest.approx(0.0, abs=1e-6)
    two = torch.cat([student, same], 1)
    assert uld_loss(two, lps.expand(1, 2, 2), torch.tensor([[True, True]])).item() == pytest.approx(0.1, abs=1e-6)
    assert uld_loss(two, lps.expand(1, 2, 2), torch.tensor([[True, False]])).item() == pytest.approx(0.2, abs=1e-6)
    assert uld_loss(student, lps, torch.zeros(1, 1, dtype=torch.bool)).item() == 0.0


def test_chunk_divergences_by_hand():
    t, s = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -2.0, -3.0]])
    mask = torch.tensor([[True, True, False]])
    assert chunk_kd_loss(s, t, mask, "abs").item() == pytest.approx(0.25, rel=1e-6)      # (0.5 + 0) / 2

    def bkl(a, b):       # KL(Bernoulli(e^a) || Bernoulli(e^b))
        p, q = math.exp(a), math.exp(b)
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    want = (bkl(-1.0, -1.5) + bkl(-2.0, -2.0)) / 2
    assert chunk_kd_loss(s, t, mask, "binary_kl", temperature=1.0).item() == pytest.approx(want, rel=1e-4)
    want100 = (bkl(-0.01, -0.015) + 0.0) / 2
    assert chunk_kd_loss(s, t, mask, "binary_kl", temperature=100.0).item() == pytest.approx(want100, rel=1e-3)
    assert chunk_kd_loss(t, t, mask).item() == pytest.approx(0.0, abs=1e-7)
    s.requires_grad_(True)
    chunk_kd_loss(s, t, mask, temperature=1.0).backward()
    assert s.grad[0, 0] < 0 and s.grad[0, 1] == 0 and s.grad[0, 2] == 0    # raise the under-rated chunk only


def test_top_k_entries_left_out_count_in_neither_distribution():
    """topk_kd_loss over 3 entries with the middle one not kept equals it over the other 2."""
    logits = torch.tensor([[[0.3, -1.0, 2.0, 0.1, 0.0]]])
    ids, lps = torch.tensor([[[2, 4, 0]]]), torch.log(torch.tensor([[[0.5, 0.2, 0.1]]]))
    keep = torch.tensor([[[True, False, True]]])
    for temperature in (1.0, 2.0):
        a = topk_kd_loss(logits, ids, lps, ONE, temperature, keep=keep)
        b = topk_kd_loss(logits, ids[..., [0, 2]], lps[..., [0, 2]], ONE, temperature)
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert topk_kd_loss(logits, ids, lps, ONE, keep=torch.ones_like(keep)).item() == \
        topk_kd_loss(logits, ids, lps, ONE).item()


def test_per_sample_weights_weigh_each_samples_items():
    v = torch.tensor([[[1.0, 2.0]], [[3.0, 5.0]]])                         # (B 2, H 1, T 2)
    mask = torch.tensor([[True, True], [True, False]])
    assert _masked_mean(v, mask).item() == pytest.approx(6 / 3)
    assert _masked_mean(v, mask, torch.tensor([0.5, 2.0])).item() == pytest.approx((0.5 * 3 + 2 * 3) / 3)


# --- positions and chunks across tokenizations, by hand -----------------------------------------

# "Tom has 12 pens" as a student cuts it ("Tom", " has", " 1", "2", " pens", then EOS) and as a
# teacher with BOS does (BOS, "T", "om", " has", " 12", " pen", "s")
S_OFF = [(0, 3), (3, 7), (7, 9), (9, 10), (10, 15), (15, 15)]
T_OFF = [(0, 0), (0, 1), (1, 3), (3, 7), (7, 10), (10, 14), (14, 15)]


def test_prefix_pairs_and_chunks_of_two_tokenizations_by_hand():
    assert prefix_ends(S_OFF).tolist() == [3, 7, 9, 10, 15, -1]
    assert prefix_ends(T_OFF).tolist() == [0, 1, 3, 7, 10, 14, 15]
    # both have read "Tom", "Tom has", "Tom has 12", all of it
    assert prefix_pairs(S_OFF, T_OFF).tolist() == [2, 3, -1, 4, 6, -1]
    s, t, ends = shared_chunks(S_OFF, T_OFF)
    # boundaries 3, 7, 10, 15: "Tom" | " has" | " 12" | " pens"
    assert ends.tolist() == [3, 7, 10, 15] and s.tolist() == [0, 1, 2, 2, 3, -1]
    assert t.tolist() == [-1, 0, 0, 1, 2, 3, 3]
    # a character that byte-level BPE splits over two tokens ends both at the same place: only the
    # last of them has read all of it
    assert prefix_ends([(0, 2), (2, 3), (2, 3), (3, 5)]).tolist() == [2, -1, 3, 5]


def test_chunk_likelihoods_from_a_samples_token_logprobs():
    """The teacher's log-likelihood of each chunk is the sum of its tokens' token_logprobs (token i
    at position i-1); the chunk holding the student's first token has no student log-probability
    and is left out; with kd_tokens answer only chunks that end in the answer count; the EOS after
    an uncut sample is a chunk of its own."""
    text = "Tom has 12 pens"
    tl = torch.tensor([-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7])        # position t: teacher token t+1
    sample = {"char_offsets": torch.tensor(T_OFF), "token_logprobs": tl, "text": text, "truncated": False,
              "char_segments": {"question": (0, 3), "reasoning": (4, 15), "answer": (15, 15)}}
    ids = torch.tensor([5, 6, 7, 8, 9, 0])                                 # EOS (id 0) last
    cache = types.SimpleNamespace(meta=types.SimpleNamespace(tokenizer=types.SimpleNamespace(eos_token_id=0)))
    me = types.SimpleNamespace(tok=types.SimpleNamespace(eos_token_id=0), kd_tokens="all")
    chunk_of, lp = DistillData._chunks(me, ids, torch.tensor(S_OFF), sample, cache)
    # chunks " has" (teacher token 3: -0.3), " 12" (token 4: -0.4), " pens" (tokens 5, 6: -0.5 - 0.6),
    # then EOS (the last position's -0.7)
    assert chunk_of.tolist() == [-1, 0, 1, 1, 2, 3]
    assert lp.tolist() == pytest.approx([-0.3, -0.4, -1.1, -0.7])
    me.kd_tokens = "answer"              # the answer starts at character 4: " has" (ends at 7) is in it
    chunk_of, lp = DistillData._chunks(me, ids, torch.tensor(S_OFF), sample, cache)
    assert chunk_of.tolist() == [-1, 0, 1, 1, 2, 3]
    sample["char_segments"]["reasoning"] = (8, 15)                         # now " has" ends before it
    chunk_of, lp = DistillData._chunks(me, ids, torch.tensor(S_OFF), sample, cache)
    assert chunk_of.tolist() == [-1, -1, 0, 0, 1, 2] and lp.tolist() == pytest.approx([-0.4, -1.1, -0.7])
    sample["truncated"] = True                                             # no EOS chunk for a cut sample
    assert DistillData._chunks(me, ids, torch.tensor(S_OFF), sample, cache)[0].tolist() == [-1, -1, 0, 0, 1, -1]


def test_answer_logprob_is_the_mean_over_the_answers_tokens():
    s = {"token_logprobs": torch.tensor([-9.0, -9.0, -1.0, -2.0, -3.0, -9.0]),
         "token_segments": {"question": (0, 2), "reasoning": (3, 5), "answer": (5, 6)}}
    assert answer_logprob(s) == pytest.approx(-2.0)     # tokens 3, 4, 5 at positions 2, 3, 4
    assert answer_logprob({"token_segments": s["token_segments"]}) is None


# --- compatible vocabularies: top-K distillation with the ids the student lacks dropped ---------

@pytest.fixture(scope="module")
def padded_caches(padded_teachers, tmp_path_factory):
    """The padded teacher's caches with its extended tokenizer and with the tests' own, top-16
    (so that the teacher's extra tokens and padding rows show up among them)."""
    out = {}
    for name, folder in padded_teachers.items():
        (out[name],) = extract(ExtractConfig(
            teachers=[str(folder)], dataset="synthetic", max_samples=40, batch_size=8, quantize=False,
            device="cpu", progress=False, out=str(tmp_path_factory.mktemp(f"pc-{name}")), logits_topk=16))
    return out


def _kd_by_hand(logits, batch, cache, tok_len):
    """KL from the teacher's top-K with ids >= tok_len dropped and the rest renormalised (the tail
    keeps its mass), at every position whose next token is an answer token."""
    total, n = 0.0, 0
    lsm = torch.log_softmax(logits.double(), -1)
    for b, row in enumerate(batch["rows"].tolist()):
        s = next(cache[i] for i in range(len(cache)) if cache[i]["row"] == row)
        target = batch["ce_mask"][b, 1:]
        for j in range(len(s["input_ids"])):
            if j + 1 >= batch["ce_mask"].shape[1] or not target[j]:
                continue
            ids, p = s["topk_ids"][j], s["topk_logprobs"][j].double().exp()
            keep = ids < tok_len
            d = float(p[~keep].sum())
            pk, tail = p[keep] / (1 - d), (1 - float(p.sum())) / (1 - d)
            q = lsm[b, j, ids[keep]]
            q_tail = 1 - float(q.exp().sum())
            total += float((pk * (pk.log() - q)).sum()) + tail * math.log(tail / q_tail)
            n += 1
    return total / n


def test_compatible_vocabularies_distil_as_the_same_tokenizer_does(padded_caches, student_dir, tok, tmp_path):
    """A teacher whose tokenizer adds two special tokens and whose embedding has 64 more rows:
    top-K distillation is allowed, its ids the student lacks are dropped and counted, and on
    samples without the extra tokens it equals distillation from the same teacher's cache made
    with the student's own tokenizer (whose ids beyond the student's vocabulary are dropped
    alike), and a recomputation by hand."""
    parts, trainers = {}, {}
    for name in ("extra", "same"):
        cfg = TrainConfig(student=str(student_dir), caches=[str(padded_caches[name])], out=str(tmp_path / name),
                          device="cpu", progress=False, kv_weight=0.0, ce_weight=0.0, kd_weight=1.0, eval_samples=8)
        tr = trainers[name] = Trainer(cfg, echo=lambda *a: None)
        assert tr.teachers[0].vocab.kind == {"extra": "compatible", "same": "same"}[name]
        batch = collate([tr.data[i] for i in range(6)], pad_id=tok.pad_token_id)
        with torch.no_grad():
            logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = _kd_by_hand(logits, batch, open_cache(padded_caches[name]), len(tok))
        parts[name] = tr.step([batch])
        assert parts[name]["loss_kd"] == pytest.approx(want, rel=1e-4)
        assert batch["teachers"][0]["A"] is None                           # identity alignment
    assert parts["extra"]["loss_kd"] == parts["same"]["loss_kd"]
    cache = open_cache(padded_caches["extra"])
    dropped = sum(int((cache[i]["topk_ids"] >= len(tok)).sum()) for i in range(6))
    assert dropped > 50 and parts["extra"]["kd_ids_dropped"] == parts["same"]["kd_ids_dropped"] == dropped
    assert parts["extra"]["kd_samples_skipped"] == 0


@pytest.mark.slow
def test_a_sample_with_a_token_only_the_teacher_has_aligns_by_characters_and_is_left_out_of_kd(
        padded_teachers, tok, tmp_path):
    rows = [{"question": f"Ava has {n} pens. How many pens does Ava have now?", "answer": f"{n} pens.\n#### {n}"}
            for n in range(2, 8)]
    rows[3]["question"] = "Ava has <|x1|> pens. How many pens does Ava have now?"
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    (cache,) = extract(ExtractConfig(teachers=[str(padded_teachers["extra"])], dataset=str(data), batch_size=8,
                                     quantize=False, device="cpu", progress=False, out=str(tmp_path / "c"),
                                     logits_topk=4))
    d = DistillData([open_cache(cache)], tok, 256, kd_method="topk")
    assert d.vocab[0].kind == "compatible"          # the first 32 samples say so; row 3 is one of 6
    items = [d[i] for i in range(6)]
    assert [it["kd_skipped"] for it in items] == [0, 0, 0, 1, 0, 0]
    odd = items[3]["teachers"][0]
    assert odd["A"] is not None and not odd["kd_valid"].any() and odd["valid"].any()
    assert all(it["teachers"][0]["A"] is None and it["teachers"][0]["kd_valid"].any() for i, it in enumerate(items)
               if i != 3)
    batch = collate(items, pad_id=tok.pad_token_id)
    assert batch["kd_skipped"] == 1 and batch["kd_dropped"] == sum(it["kd_dropped"] for it in items)


# --- different vocabularies: uld and chunk -------------------------------------------------------

def _llama_trainer(student_dir, cache, tmp_path, **kw):
    cfg = TrainConfig(student=str(student_dir), caches=[str(cache)], out=str(tmp_path), device="cpu",
                      progress=False, kv_weight=0.0, ce_weight=0.0, kd_weight=1.0, eval_samples=8, **kw)
    return Trainer(cfg, echo=lambda *a: None)


def test_uld_takes_the_teachers_distribution_where_both_have_read_the_same_text(student_dir, logit_caches, tok,
                                                                               tmp_path):
    tr = _llama_trainer(student_dir, logit_caches["llama"], tmp_path, kd_method="uld", kd_tokens="all")
    assert tr.teachers[0].vocab.kind == "different"
    cache = open_cache(logit_caches["llama"])
    items = [tr.data[i] for i in range(4)]
    batch = collate(items, pad_id=tok.pad_token_id)
    with torch.no_grad():
        logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, n = 0.0, 0
    for b, it in enumerate(items):
        s = cache[tr.data.index[b][0]]
        enc = tok(s["text"], return_offsets_mapping=True)
        pairs = prefix_pairs(enc["offset_mapping"] + [(len(s["text"]),) * 2], s["char_offsets"])
        got = it["teachers"][0]
        assert torch.equal(got["kd_valid"], pairs >= 0) and got["kd_valid"].sum() > 0.5 * len(pairs)
        for j in (pairs >= 0).nonzero().flatten().tolist():
            assert torch.equal(got["topk_logprobs"][j], s["topk_logprobs"][pairs[j]])
            if j + 1 < len(it["input_ids"]):
                p = s["topk_logprobs"][pairs[j]].double().exp()
                q = torch.softmax(logits[b, j].double(), -1).sort(descending=True).values
                total += float((q[:len(p)] - p).abs().sum() + abs((1 - q[:len(p)].sum()) - (1 - p.sum())))
                n += 1
    assert tr.step([batch])["loss_kd"] == pytest.approx(total / n, rel=1e-4)


def test_chunk_likelihoods_of_a_batch_against_a_recomputation(student_dir, logit_caches, tok, tmp_path):
    tr = _llama_trainer(student_dir, logit_caches["llama"], tmp_path, kd_method="chunk",
                        kd_chunk_divergence="abs")
    cache = open_cache(logit_caches["llama"])
    items = [tr.data[i] for i in range(4)]
    batch = collate(items, pad_id=tok.pad_token_id)
    with torch.no_grad():
        lsm = torch.log_softmax(tr.model(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]).logits.double(), -1)
    diffs = []
    for b, it in enumerate(items):
        s = cache[tr.data.index[b][0]]
        enc = tok(s["text"], return_offsets_mapping=True)
        s_chunk, t_chunk, ends = shared_chunks(enc["offset_mapping"] + [(len(s["text"]),) * 2], s["char_offsets"])
        n = len(ends)
        a0 = s["char_segments"]["reasoning"][0]
        tl = s["token_logprobs"].double()
        ids = it["input_ids"]
        for c in range(n):
            st, tt = (s_chunk == c).nonzero().flatten(), (t_chunk == c).nonzero().flatten()
            end = int(enc["offset_mapping"][int(st[-1])][1])
            if 0 in st.tolist() or 0 in tt.tolist() or end <= a0:
                continue
            student = sum(float(lsm[b, t - 1, ids[t]]) for t in st.tolist())
            teacher = float(sum(tl[i - 1] for i in tt.tolist()))
            diffs.append(abs(teacher - student))
        # EOS: the student's last token against the teacher's last position
        diffs.append(abs(float(tl[-1]) - float(lsm[b, len(ids) - 2, ids[-1]])))
    assert len(diffs) > 20
    assert tr.step([batch])["loss_kd"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["uld", "chunk"])
def test_a_student_learns_from_another_vocabularys_logits(student_dir, logit_caches, tmp_path, method):
    from test_stage2 import run
    m = run(student_dir, [logit_caches["llama"]], tmp_path / "r", kd_weight=1.0, kv_weight=0.0, ce_weight=0.0,
            kd_method=method, max_steps=30, log_every=10, lr_student=3e-3)
    assert m[-1]["loss_kd"] < 0.8 * m[0]["loss_kd"], [r["loss_kd"] for r in m]


def test_chunk_needs_token_logprobs_and_confidence_needs_them_too(student_dir, caches, tmp_path):
    with pytest.raises(ValueError, match=r"--kd-method chunk: .* holds no token_logprobs \(made without "
                                         r"--logits-topk, or by an older kava\); run stage 1 again"):
        _llama_trainer(student_dir, caches["llama"], tmp_path / "a", kd_method="chunk")
    with pytest.raises(ValueError, match=r"--teacher-weighting confidence: .* holds no token_logprobs"):
        Trainer(TrainConfig(student=str(student_dir), caches=[str(caches["qwen"]), str(caches["llama"])],
                            out=str(tmp_path / "b"), device="cpu", teacher_weighting="confidence"),
                echo=lambda *a: None)
    with pytest.raises(ValueError, match="teacher_weighting confidence weighs each teacher's loss per sample: "
                                         "use fusion loss"):
        TrainConfig(student="s", caches=["a", "b"], teacher_weighting="confidence", fusion="target",
                    direction="teacher_to_student")


# --- several teachers: confidence weighting -------------------------------------------------------

def test_confidence_weights_for_two_teachers_and_three_samples_by_hand():
    from stage2_train.distiller import Distiller
    me = types.SimpleNamespace(cfg=types.SimpleNamespace(teacher_weighting="confidence", confidence_temperature=0.5),
                               fixed_w=torch.tensor([1.0, 3.0]))
    batch = {"teachers": [{"answer_lp": torch.tensor([-0.1, -2.0, -0.5])},
                          {"answer_lp": torch.tensor([-1.0, -0.2, -0.5])}]}
    w = Distiller.sample_weights(me, batch, torch.device("cpu"))
    for b, (a, c) in enumerate([(-0.1, -1.0), (-2.0, -0.2), (-0.5, -0.5)]):
        e0, e1 = 0.25 * math.exp(a / 0.5), 0.75 * math.exp(c / 0.5)
        assert w[:, b].tolist() == pytest.approx([e0 / (e0 + e1), e1 / (e0 + e1)], rel=1e-6)
    assert w[:, 2].tolist() == pytest.approx([0.25, 0.75])   # equally sure: the fixed weights
    assert Distiller.mean_weights(me, w) == pytest.approx(w.mean(1).tolist())


def _two(student_dir, logit_caches, out, **kw):
    kw.setdefault("max_steps", 6)
    kw.setdefault("log_every", 1)
    return TrainConfig(student=str(student_dir), caches=[str(logit_caches["qwen"]), str(logit_caches["llama"])],
                       out=str(out), device="cpu", progress=False, eval_samples=8, batch_size=4, save_every=0,
                       lr_projector=3e-3, **kw)


@pytest.mark.slow
def test_confidence_weights_train_log_and_resume_exactly(student_dir, logit_caches, tok, tmp_path):
    cfg = _two(student_dir, logit_caches, tmp_path / "a", teacher_weighting="confidence", confidence_temperature=0.3,
               kd_weight=1.0, kd_method="chunk", report_to="tensorboard")
    tr = Trainer(cfg, echo=lambda *a: None)
    items = [tr.data[i] for i in range(4)]
    lp = torch.tensor([[it["teachers"][t]["answer_lp"] for it in items] for t in range(2)])
    want = torch.softmax(lp / 0.3, dim=0).mean(1)
    got = tr.step([collate(items, pad_id=tok.pad_token_id)])["teacher_weights"]
    assert got == pytest.approx(want.tolist(), rel=1e-5) and sum(got) == pytest.approx(1.0)
    assert abs(got[0] - 0.5) > 0.01                        # the teachers are not equally sure
    straight = _metrics(cfg, train)
    assert all(len(r["teacher_weights"]) == 2 and sum(r["teacher_weights"]) == pytest.approx(1.0) for r in straight)
    # stopped after step 3 and resumed: the same weights and losses as without a stop
    b = tmp_path / "b"

    def stop_at_3(line):
        if line.startswith("step      3 "):
            os.kill(os.getpid(), signal.SIGINT)
    stopped = TrainConfig(**{**cfg.__dict__, "out": str(b)})
    with pytest.raises(Stopped) as stop:
        train(stopped, echo=stop_at_3)
    assert stop.value.exit_code in (130, 143)
    assert (b / "step-000003").is_dir() and not (b / "final").exists()
    resumed = _metrics(TrainConfig(**{**stopped.__dict__, "resume": "auto"}), train)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for x, y in zip(straight, resumed):
        assert x["teacher_weights"] == pytest.approx(y["teacher_weights"], rel=1e-6, abs=1e-7)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(tmp_path / "a" / "tensorboard"))
    ev.Reload()
    assert [e.value for e in ev.Scalars("teacher_weights/1")] == pytest.approx(
        [r["teacher_weights"][1] for r in straight], rel=1e-6)


def _metrics(cfg, fn):
    fn(cfg, echo=lambda *a: None)
    return [json.loads(l) for l in (__import__("pathlib").Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]


def test_fixed_weights_and_the_learned_gate_are_logged_too(student_dir, logit_caches, tmp_path):
    fixed = _metrics(_two(student_dir, logit_caches, tmp_path / "f", max_steps=2, teacher_weights=[0.7, 0.3]), train)
    assert [r["teacher_weights"] for r in fixed] == [pytest.approx([0.7, 0.3])] * 2
    gate = _metrics(_two(student_dir, logit_caches, tmp_path / "g", max_steps=3, fusion="target", gate="learned",
                         direction="teacher_to_student"), train)
    w = [r["teacher_weights"] for r in gate]
    assert w[0] == pytest.approx([0.5, 0.5], abs=0.01) and w[-1] != w[0] and all(sum(x) == pytest.approx(1) for x in w)
    one = _metrics(TrainConfig(student=str(student_dir), caches=[str(logit_caches["qwen"])], out=str(tmp_path / "o"),
                               device="cpu", progress=False, eval_samples=8, max_steps=1, log_every=1), train)
    assert "teacher_weights" not in one[0]


def test_confidence_weights_each_samples_kv_loss(student_dir, logit_caches, tok, tmp_path):
    """With one teacher's weight 1 on every sample, the K/V loss is that teacher's alone."""
    tr = Trainer(_two(student_dir, logit_caches, tmp_path / "c", teacher_weighting="confidence", loss="mse"),
                 echo=lambda *a: None)
    batch = collate([tr.data[i] for i in range(4)], pad_id=tok.pad_token_id)
    with torch.no_grad(), tr.cap:
        tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        both, pairs = tr.distiller(batch, tr.cap, tr.device, torch.tensor([[1.0] * 4, [0.0] * 4]))
        alone = sum(tr.distiller._kv(*p.k, *p.v, p.mask) for p in pairs if p.teacher == 0) / 2
        half, _ = tr.distiller(batch, tr.cap, tr.device, torch.full((2, 4), 0.5))
        fixed, _ = tr.distiller(batch, tr.cap, tr.device)
    assert both.item() == pytest.approx(alone.item(), rel=1e-6) and half.item() == pytest.approx(fixed.item(), rel=1e-6)
