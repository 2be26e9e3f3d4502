"""Latent reasoning steps (stage2_train.latent) on tiny models: sequential, Jacobi, gradients."""

import math

import pytest
import torch

from conftest import latents_by_hand
from kava_demo import tiny
from stage2_train.latent import LatentHead, latent_sequence, latents


def _model(arch="qwen2"):
    cfg = tiny.tiny_config(arch, 61, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, intermediate=64)
    model = tiny.build_model(cfg, seed=4).eval()
    torch.manual_seed(0)
    return model, LatentHead(32)


def _prefix(model, ids_list):
    """Left-padded question ids (+ a bot id, 1) as embeddings and mask."""
    width = max(len(x) for x in ids_list) + 1
    ids = torch.zeros(len(ids_list), width, dtype=torch.long)
    mask = torch.zeros(len(ids_list), width, dtype=torch.long)
    for b, x in enumerate(ids_list):
        row = torch.tensor(x + [1])
        ids[b, width - len(row):], mask[b, width - len(row):] = row, 1
    return model.get_input_embeddings()(ids), mask


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_sequential_latents_equal_a_step_by_step_reference_and_jacobi_converges_to_them(arch):
    model, head = _model(arch)
    questions = [[5, 6, 7, 8, 9], [10, 11, 12]]
    prefix, mask = _prefix(model, questions)
    m = 4
    with torch.no_grad():
        seq = latents(model, head, prefix, mask, m, iters=0)
        assert seq.shape == (2, m, 32)
        for b, q in enumerate(questions):              # each sample alone, unpadded, by hand
            alone, _ = _prefix(model, [q])
            assert torch.allclose(seq[b:b + 1], latents_by_hand(model, head, alone, m), atol=1e-5), b
        # Jacobi: after T passes the first T + 1 latents are exact; T >= M - 1 gives them all
        for t in range(1, m):
            jac = latents(model, head, prefix, mask, m, iters=t)
            assert torch.allclose(jac[:, :t + 1], seq[:, :t + 1], atol=1e-5), t
        assert not torch.allclose(latents(model, head, prefix, mask, m, iters=1)[:, 3], seq[:, 3], atol=1e-3)
        assert torch.allclose(latents(model, head, prefix, mask, m, iters=m - 1), seq, atol=1e-5)
    with pytest.raises(ValueError, match="--latent must be >= 1"):
        latents(model, head, prefix, mask, 0)
    with pytest.raises(ValueError, match="--jacobi-iters must be >= 0"):
        latents(model, head, prefix, mask, 2, iters=-1)


@pytest.mark.parametrize("iters", [0, 2])
def test_the_answers_gradient_reaches_every_latent_step_the_head_and_the_student(iters):
    model, head = _model()
    model.train()
    prefix, mask = _prefix(model, [[5, 6, 7], [8, 9]])
    prefix = prefix.detach()
    suffix_ids = torch.tensor([[2, 20, 21], [2, 22, 0]])            # eot (2), answer, right padding
    suffix_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    suffix = model.get_input_embeddings()(suffix_ids)
    m = 3
    z = latents(model, head, prefix, mask, m, iters)
    z.retain_grad()
    embeds, full, where = latent_sequence(prefix, mask, z, suffix, suffix_mask)
    assert (where.start, where.stop) == (prefix.shape[1], prefix.shape[1] + m)
    assert full.tolist()[1] == [0] + [1] * (prefix.shape[1] - 1) + [1] * m + [1, 1, 0]
    logits = model(inputs_embeds=embeds, attention_mask=full).logits
    # cross-entropy on the answer after the latents: the last answer token's prediction
    loss = torch.nn.functional.cross_entropy(logits[0, -2:-1], suffix_ids[0, 2:3])
    loss.backward()
    # every latent step feeds the answer (directly and through the later latents' inputs)
    assert all(float(z.grad[0, k].abs().sum()) > 0 for k in range(m))
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in head.parameters())
    assert float(model.get_decoder().layers[0].self_attn.q_proj.weight.grad.abs().sum()) > 0


def test_the_latent_forward_is_the_whole_sequence_in_one_forward():
    """The forward a latent step trains on: [question, bot, latents, eot, answer] at once, the
    K/V captured from it alone."""
    import types
    from kava_common.geometry import KVGeometry
    from stage2_train.latent import _latent_forward
    from stage2_train.student import StudentKV
    model, head = _model()
    prefix, mask = _prefix(model, [[5, 6, 7, 8]])
    batch = {"question_ids": torch.tensor([[5, 6, 7, 8, 1]]), "question_mask": mask,
             "suffix_ids": torch.tensor([[2, 30, 31]]), "suffix_mask": torch.ones(1, 3, dtype=torch.long)}
    cap = StudentKV(model, [0, 1], KVGeometry.from_config(model.config))
    cfg = types.SimpleNamespace(latent=2, jacobi_iters=0, latent_hidden_weight=0.0)
    with torch.no_grad():
        out, where, _, _ = _latent_forward(model, cap, head, batch, cfg, torch.device("cpu"),
                                           lambda: torch.autocast("cpu", enabled=False))
        z = latents(model, head, prefix, mask, 2)
        suffix = model.get_input_embeddings()(batch["suffix_ids"])
        ref = model(inputs_embeds=torch.cat([prefix, z, suffix], 1)).logits
    assert out.logits.shape == (1, 3, 61)                       # the suffix's positions alone
    assert torch.allclose(out.logits, ref[:, -3:], atol=1e-5) and (where.start, where.stop) == (5, 7)
    assert cap.kv(0)[0].shape[2] == 5 + 2 + 3                   # the K/V of the whole sequence, not of a latent pass


@pytest.mark.parametrize("iters", [0, 2])
def test_gradient_checkpointing_changes_no_latent_value_and_no_gradient(iters, monkeypatch):
    """A latent micro-batch under gradient checkpointing: the same latents, answer logits, captured
    K/V at the latent positions, loss (CODI's layer outputs in it) and gradients (student, latent
    head) as without it. The K/V come from the forward, not the backward's recomputation;
    sequential latents (iters 0), whose cache transformers drops under checkpointing, are
    recomputed without one."""
    import types
    from kava_common.geometry import KVGeometry
    from stage2_train import latent as L
    from stage2_train.student import StudentKV, enable_checkpointing
    model, head = _model()
    model.train()
    batch = {"question_ids": torch.tensor([[5, 6, 7, 8, 1], [0, 0, 9, 10, 1]]),
             "question_mask": torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]),
             "suffix_ids": torch.tensor([[2, 30, 31], [2, 32, 0]]), "suffix_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    cap = StudentKV(model, [0, 1], KVGeometry.from_config(model.config))
    cfg = types.SimpleNamespace(latent=3, jacobi_iters=iters, latent_hidden_weight=1.0)   # CODI's outputs too
    target = torch.randn(2, 2, 3, 8, generator=torch.Generator().manual_seed(1))

    def run():
        model.zero_grad(), head.zero_grad()
        out, where, s, sm = L._latent_forward(model, cap, head, batch, cfg, torch.device("cpu"),
                                              lambda: torch.autocast("cpu", enabled=False))
        kv = [x[:, :, where].detach().clone() for x in cap.kv(1)]
        k, v = cap.kv(0)
        loss = L._answer_ce(out.logits, s, sm) + (k[:, :, where] - target).square().mean() + v[:, :, where].mean() \
            + out.layer_outputs[1].square().mean()
        loss.backward()
        grads = [p.grad.clone() for p in (model.model.layers[0].self_attn.k_proj.weight,
                                          model.model.layers[1].mlp.up_proj.weight, *head.parameters())]
        return out.logits.detach(), kv, loss.item(), grads

    plain = run()
    assert plain[0].shape == (2, 3, 61) and all(float(g.abs().sum()) > 0 for g in plain[3])
    enable_checkpointing(model)
    assert L.checkpointing(model)
    checkpointed = run()
    for a, b in zip([plain[0], *plain[1], *plain[3]], [checkpointed[0], *checkpointed[1], *checkpointed[3]]):
        assert torch.allclose(a, b, atol=1e-5)
    assert checkpointed[2] == pytest.approx(plain[2], rel=1e-6)
    with torch.no_grad():
        assert not L.checkpointing(model)               # no backward: the cached path is exact
    if iters == 0:             # why the cache-free path: over a dropped cache the latents fail or go wrong
        monkeypatch.setattr(L, "checkpointing", lambda model: False)
        try:
            assert not torch.allclose(run()[0], plain[0], atol=1e-3)
        except RuntimeError as e:                        # transformers 5: the mask no longer fits the input
            assert "shape" in str(e)


def test_the_students_keys_before_rope_are_k_proj_and_after_it_turned_at_their_positions():
    """StudentKV.kv(rotated=False) is the k_proj output as heads; rotated, the same keys turned by
    kava_common.rope at the positions the latent forward gives (real tokens counted, left pad not)."""
    from kava_common.geometry import KVGeometry
    from kava_common.rope import rotate
    from stage2_train.latent import _positions
    from stage2_train.student import StudentKV
    model, _ = _model()
    geo = KVGeometry.from_config(model.config)
    ids = torch.tensor([[0, 0, 5, 6, 7], [9, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    raw = {}
    model.model.layers[1].self_attn.k_proj.register_forward_hook(lambda m, a, o: raw.__setitem__(1, o))
    cap = StudentKV(model, [0, 1], geo)
    with torch.no_grad(), cap:
        model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask))
    pre, v = cap.kv(1, rotated=False)
    assert torch.equal(pre, raw[1].view(2, 5, 2, 8).transpose(1, 2))
    post, v2 = cap.kv(1)
    assert torch.equal(v, v2)
    pos = _positions(mask).unsqueeze(1).expand(2, 2, 5)
    assert torch.allclose(post, rotate(pre, pos, geo.rope), atol=1e-5)
    assert not torch.allclose(post[1, :, 1:], pre[1, :, 1:], atol=1e-3)


def _value(t: torch.Tensor) -> float:
    return t.detach().item()


def test_the_latent_kv_loss_by_hand():
    """One student layer (1 KV head x 2) projected by an identity into a teacher layer mixed from
    two stored layers; the second slot is empty (mask) and counts nothing."""
    from stage2_train.latent import latent_kv_loss
    from stage2_train.projector import KVProjector
    proj = KVProjector("linear", 1, 1, 2, 1, 2)
    with torch.no_grad():
        for lin in (proj.k[0].proj, proj.v[0].proj):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    sk = torch.tensor([[[[1.0, 2.0], [9.0, 9.0]]]])                 # (B 1, H 1, M 2, D 2)
    sv = torch.tensor([[[[0.0, 1.0], [9.0, 9.0]]]])
    slots_k = torch.zeros(1, 2, 1, 2, 2)                            # (B, L 2, H, M, D)
    slots_k[0, 0, 0, 0] = torch.tensor([3.0, 2.0])
    slots_k[0, 1, 0, 0] = torch.tensor([1.0, 6.0])
    slots_v = torch.zeros(1, 2, 1, 2, 2)
    slots_v[0, 0, 0, 0] = torch.tensor([2.0, 1.0])
    mask = torch.tensor([[True, False]])
    distilled = [(0, [(0, 0.5), (1, 0.5)])]                         # the teacher target: mean of both layers
    # K target (2, 4), V target (1, 0.5): mse per element, mean over the one filled slot
    want_mse = ((1 - 2) ** 2 + (2 - 4) ** 2) / 2 + ((0 - 1) ** 2 + (1 - 0.5) ** 2) / 2
    got = latent_kv_loss({0: (sk, sv)}, slots_k, slots_v, mask, distilled, proj, "mse").item()
    assert got == pytest.approx(want_mse)
    def hub(d):                                                      # smooth L1 with beta 1
        return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5
    want_sl1 = (hub(-1) + hub(-2)) / 2 + (hub(-1) + hub(0.5)) / 2
    assert _value(latent_kv_loss({0: (sk, sv)}, slots_k, slots_v, mask, distilled, proj, "smooth_l1")) == \
        pytest.approx(want_sl1)
    cos_k = (1 * 2 + 2 * 4) / (5 ** 0.5 * 20 ** 0.5)
    cos_v = (0 * 1 + 1 * 0.5) / (1 * 1.25 ** 0.5)
    want_merc = (1 - cos_k) + (1 - cos_v)                            # beta 0: direction only
    assert _value(latent_kv_loss({0: (sk, sv)}, slots_k, slots_v, mask, distilled, proj, "mercator", beta=0.0)) == \
        pytest.approx(want_merc, rel=1e-6)
    # normalised: the filled slot's K target (2, 4) has std sqrt(2), V's (1, 0.5) std sqrt(0.125)
    want_norm = ((1 - 2) ** 2 + (2 - 4) ** 2) / 2 / 2 + ((0 - 1) ** 2 + (1 - 0.5) ** 2) / 2 / 0.125
    assert _value(latent_kv_loss({0: (sk, sv)}, slots_k, slots_v, mask, distilled, proj, "mse", normalize=True)) == \
        pytest.approx(want_norm, rel=1e-6)
    # the gradient reaches the student's latent K/V and the projector
    sk.requires_grad_(True)
    latent_kv_loss({0: (sk, sv)}, slots_k, slots_v, mask, distilled, proj, "mse").backward()
    assert sk.grad[0, 0, 0].abs().sum() > 0 and not sk.grad[0, 0, 1].any()   # the empty slot: no gradient


def test_the_contrastive_latent_kv_loss_by_hand():
    """InfoNCE across 3 problems, 1 head, 2 slots, temperature 0.5: problem 2's second slot is
    empty (never a candidate, never a row), and a row with no other problem counts nothing;
    through latent_kv_loss it takes the place of --loss for K and V alike."""
    import math
    from stage2_train.latent import contrastive_kv, latent_kv_loss
    from stage2_train.projector import KVProjector
    pred = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]], [[[0.0, 1.0], [1.0, -1.0]]], [[[1.0, 1.0], [5.0, 5.0]]]])
    target = torch.tensor([[[[2.0, 0.0], [0.0, 1.0]]], [[[1.0, 1.0], [1.0, 0.0]]], [[[0.0, 3.0], [7.0, 7.0]]]])
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    r2 = 2 ** -0.5

    def row(cosines, own):                        # -log softmax(cos / 0.5)[own]
        z = [c / 0.5 for c in cosines]
        return -(z[own] - math.log(sum(math.exp(x) for x in z)))
    # slot 0, targets (1, 0), (r2, r2), (0, 1) by direction; slot 1: (0, 1), (1, 0) (problem 2's is empty)
    want = [row([1, r2, 0], 0), row([0, r2, 1], 1), row([r2, 1, r2], 2),
            row([r2, r2], 0), row([-r2, r2], 1)]
    got = contrastive_kv(pred, target, mask, 0.5)
    assert got.item() == pytest.approx(sum(want) / 5, rel=1e-6)
    alone = torch.tensor([[True, True], [True, False], [True, False]])      # slot 1: problem 0 alone
    assert contrastive_kv(pred, target, alone, 0.5).item() == pytest.approx(sum(want[:3]) / 3, rel=1e-6)
    assert contrastive_kv(pred, target, torch.tensor([[True, False], [False, False], [False, True]]), 0.5).item() == 0
    # the loss of a prediction at its own target is below that of one at a shared direction
    assert contrastive_kv(target, target, mask, 0.5) < contrastive_kv(torch.ones_like(target), target, mask, 0.5)
    proj = KVProjector("linear", 1, 1, 2, 1, 2)
    with torch.no_grad():
        for lin in (proj.k[0].proj, proj.v[0].proj):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    slots = target[:, None]                                                  # (B, L 1, H, M, D)
    pred.requires_grad_(True)
    loss = latent_kv_loss({0: (pred, pred)}, slots, slots, mask, [(0, [(0, 1.0)])], proj, "mse", contrast=0.5)
    assert loss.item() == pytest.approx(2 * sum(want) / 5, rel=1e-6)           # K and V
    loss.backward()
    assert pred.grad[2, 0, 1].abs().sum() == 0 and pred.grad[0, 0, 0].abs().sum() > 0   # the empty slot: none


@pytest.mark.slow
def test_latent_data_tokenizes_question_thought_and_answer_and_stacks_the_slots(teacher_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from kava_common import KavaError
    from kava_common.cache import open_cache
    from kava_common.prompt import format_prompt
    from stage1_extract.config import ExtractConfig
    from stage1_extract.extract import main as extract
    from stage2_train.latent_data import BOT, EOT, LatentData, add_thought_tokens, collate_latent
    base = dict(teachers=[str(teacher_dir)], dataset="synthetic", max_samples=6, batch_size=3, quantize=False,
                device="cpu", progress=False, layers=[1, 2])
    (path,) = extract(ExtractConfig(**base, out=str(tmp_path / "c"), rkv_slots=5))
    c = open_cache(path)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    rows, said = len(tok), []
    bot, eot = add_thought_tokens(tok, model, said.append)
    assert (bot, eot) == (rows, rows + 1) and model.get_input_embeddings().num_embeddings >= rows + 2
    assert add_thought_tokens(tok, model, said.append) == (bot, eot) and len(tok) == rows + 2   # added once
    assert said == [f"added {BOT} and {EOT} to the student's tokenizer (ids {bot}, {eot}; saved with it), "
                    "new embedding rows drawn from the mean and covariance of the others"]
    # a model whose embedding has rows to spare (as Qwen2.5's) keeps its size
    spare = tiny.build_model(tiny.tiny_config("qwen2", rows + 8, hidden=32, layers=1, heads=4, kv_heads=2), seed=0)
    fresh, said = AutoTokenizer.from_pretrained(teacher_dir), []
    assert add_thought_tokens(fresh, spare, said.append) == (rows, rows + 1)
    assert spare.get_input_embeddings().num_embeddings == rows + 8
    assert said[0].endswith("(ids %d, %d; saved with it), on embedding rows that no token used" % (rows, rows + 1))
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again.convert_tokens_to_ids([BOT, EOT]) == [bot, eot]
    assert again(f"a{BOT}b", add_special_tokens=False)["input_ids"][1] == bot           # one token, not split
    data = LatentData(c, tok, bot, eot)
    from kava_common.data import load_rows
    rows6 = load_rows("synthetic", "train", 6)
    for i in range(6):
        it = data[i]
        q, a = rows6.questions[c.text(i)["row"]], rows6.answers[c.text(i)["row"]]
        assert it["question"][-1] == bot and tok.decode(it["question"][:-1]) == format_prompt(q.strip())
        assert it["suffix"][0] == eot and it["suffix"][-1] == tok.eos_token_id
        assert tok.decode(it["suffix"][1:-1]).strip() == a[a.rfind("####"):].strip()
        assert tok.decode(it["cot"]) == a[:a.rfind("####")].strip()
        r = c.rkv(i)
        assert torch.equal(it["slots_k"], r["k"]) and torch.equal(it["slot_mask"], r["mask"][0, 0])
    batch = collate_latent([data[0], data[1]], pad_id=0)
    lq = [len(data[0]["question"]), len(data[1]["question"])]
    width = max(lq)
    for b in range(2):     # questions left-padded, suffixes right-padded
        assert batch["question_mask"][b].tolist() == [0] * (width - lq[b]) + [1] * lq[b]
        assert batch["question_ids"][b, width - lq[b]:].tolist() == data[b]["question"]
        n = len(data[b]["suffix"])
        assert batch["suffix_ids"][b, :n].tolist() == data[b]["suffix"] and batch["suffix_mask"][b].sum() == n
    assert batch["slots_k"].shape == (2, 2, 2, 5, 32) and batch["slot_mask"].shape == (2, 5)
    (plain,) = extract(ExtractConfig(**base, out=str(tmp_path / "p")))
    with pytest.raises(KavaError, match="made without --rkv-slots; a latent student"):
        LatentData(open_cache(plain), tok, bot, eot)
    # keys before RoPE: each filled slot is the teacher's own k_proj output at the slot's token
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    got = {}
    for l in (1, 2):
        teacher.model.layers[l].self_attn.k_proj.register_forward_hook(
            lambda m, a, o, l=l: got.__setitem__(l, o[0].view(-1, 2, 32).transpose(0, 1)))   # (H, T, D)
    pre = LatentData(c, tok, bot, eot, keys="pre_rope")
    filled = 0
    for i in range(6):
        with torch.no_grad():
            teacher(input_ids=c[i]["input_ids"][None])
        r, it = c.rkv(i), pre[i]
        assert it["slots_k"].dtype == torch.float32 and torch.equal(it["slots_v"], r["v"])
        for li, l in enumerate((1, 2)):
            for h in range(2):
                for m in range(5):
                    p = int(r["index"][li, h, m])
                    want = got[l][h, p] if p >= 0 else torch.zeros(32)
                    assert torch.allclose(it["slots_k"][li, h, m], want, atol=3e-3 * float(want.abs().max()) + 1e-3)
                    filled += p >= 0
        assert not torch.allclose(it["slots_k"], r["k"].float(), atol=1e-2)     # the rotation was undone
    assert filled > 0


@pytest.fixture(scope="module")
def rkv_cache(teacher_dir, tmp_path_factory):
    from stage1_extract.config import ExtractConfig
    from stage1_extract.extract import main as extract
    (path,) = extract(ExtractConfig(teachers=[str(teacher_dir)], dataset="synthetic", max_samples=40, batch_size=8,
                                    quantize=False, device="cpu", progress=False, rkv_slots=4,
                                    out=str(tmp_path_factory.mktemp("rkv"))))
    return path


def _latent_cfg(student_dir, cache, out, **kw):
    from stage2_train.config import TrainConfig
    base = dict(student=str(student_dir), caches=[str(cache)], out=str(out), device="cpu", progress=False,
                eval_samples=8, batch_size=4, grad_accum=2, max_steps=6, log_every=1, save_every=3,
                lr_projector=3e-3, latent=4, jacobi_iters=1, kv_weight=3.0)
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_a_latent_student_trains_saves_and_resumes_exactly(student_dir, teacher_dir, rkv_cache, tmp_path, capsys):
    """--latent 4 through stage 2: the K/V loss at the latent positions falls, the student saved
    with its thought tokens loads back, and a run resumed from step 3 logs the same numbers as
    one that ran straight through."""
    import json
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from stage2_train.latent_data import BOT, EOT
    from stage2_train.train import main as train
    train(_latent_cfg(student_dir, rkv_cache, tmp_path / "a", max_steps=12, save_every=0), echo=lambda *a: None)
    straight = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in straight] == list(range(1, 13))
    first, last = straight[0], straight[-1]
    assert last["loss_kv"] < first["loss_kv"] and last["cos_k"] > first["cos_k"] and last["cos_v"] > first["cos_v"]
    assert last["eval_loss_ce"] < first["eval_loss_ce"] and all(math.isfinite(r["cos_k_shuffled"]) for r in straight)
    final = tmp_path / "a" / "final" / "student"
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.convert_tokens_to_ids([BOT, EOT]) == [len(tok) - 2, len(tok) - 1]
    assert AutoModelForCausalLM.from_pretrained(final).get_input_embeddings().num_embeddings >= len(tok)
    # with the written chain of thought's cross-entropy beside: logged, and in the loss
    train(_latent_cfg(student_dir, rkv_cache, tmp_path / "cot", max_steps=2, save_every=0, latent_cot_weight=0.5),
          echo=lambda *a: None)
    for r in (json.loads(l) for l in (tmp_path / "cot" / "metrics.jsonl").read_text().splitlines()):
        assert r["loss_cot"] > 0 and r["loss"] == pytest.approx(3.0 * r["loss_kv"] + r["loss_ce"] + 0.5 * r["loss_cot"],
                                                                rel=1e-5)
    assert all(r["loss_cot"] == 0.0 for r in straight)
    # CODI's hidden-state loss needs the teacher's hidden states, then is logged and in the loss
    from kava_common import KavaError
    with pytest.raises(KavaError, match="made without --store-hidden"):
        train(_latent_cfg(student_dir, rkv_cache, tmp_path / "h0", max_steps=1, latent_hidden_weight=1.0),
              echo=lambda *a: None)
    from stage1_extract.config import ExtractConfig
    from stage1_extract.extract import main as extract
    (hcache,) = extract(ExtractConfig(teachers=[str(teacher_dir)], dataset="synthetic", max_samples=40, batch_size=8,
                                      quantize=False, device="cpu", progress=False, rkv_slots=4, store_hidden=True,
                                      out=str(tmp_path / "hc")))
    train(_latent_cfg(student_dir, hcache, tmp_path / "h", max_steps=6, save_every=0, latent_hidden_weight=2.0),
          echo=lambda *a: None)
    hm = [json.loads(l) for l in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_hidden"] > 0 and r["loss"] == pytest.approx(
        3.0 * r["loss_kv"] + r["loss_ce"] + 2.0 * r["loss_hidden"], rel=1e-5) for r in hm)
    assert hm[-1]["loss_hidden"] < hm[0]["loss_hidden"]
    # answers after the latent steps, and written out, by the same student
    from stage2_train.evaluate import EvalConfig, run as evaluate_run
    evaluate_run(EvalConfig(model=str(final), split="test", max_samples=4, batch_size=2, max_new_tokens=8, latent=4,
                            jacobi_iters=1, device="cpu", progress=False, out=str(tmp_path / "eval.jsonl")))
    lat = [json.loads(l) for l in (tmp_path / "eval.jsonl").read_text().splitlines()]
    wrote = [json.loads(l) for l in (tmp_path / "eval-written.jsonl").read_text().splitlines()]
    assert len(lat) == len(wrote) == 4
    assert all(3 <= r["forward_passes"] <= 1 + 1 + 8 for r in lat)        # Jacobi 1 + 1 passes, then <= 8 tokens
    assert all(1 <= r["forward_passes"] <= 8 for r in wrote)
    # the run folder and its final/ stand for the student saved in them, latent head and all
    for name, folder in (("run", final.parent.parent), ("final", final.parent)):
        evaluate_run(EvalConfig(model=str(folder), split="test", max_samples=4, batch_size=2, max_new_tokens=8,
                                latent=4, jacobi_iters=1, device="cpu", progress=False,
                                out=str(tmp_path / f"eval-{name}.jsonl")))
        assert [json.loads(l) for l in (tmp_path / f"eval-{name}.jsonl").read_text().splitlines()] == lat
    # not told --latent: the run's own steps and passes, said; --latent 0: the written decode alone;
    # steps or passes other than the run's: evaluated, and said
    capsys.readouterr()
    evaluate_run(EvalConfig(model=str(final.parent.parent), split="test", max_samples=4, batch_size=2,
                            max_new_tokens=8, device="cpu", progress=False, out=str(tmp_path / "eval-own.jsonl")))
    assert "the run trained 4 latent steps, 1 Jacobi pass: answering so" in capsys.readouterr().out
    assert [json.loads(l) for l in (tmp_path / "eval-own.jsonl").read_text().splitlines()] == lat
    evaluate_run(EvalConfig(model=str(final), split="test", max_samples=4, batch_size=2, max_new_tokens=8, latent=0,
                            device="cpu", progress=False, out=str(tmp_path / "eval-w.jsonl")))
    assert [json.loads(l) for l in (tmp_path / "eval-w.jsonl").read_text().splitlines()] == wrote
    assert not (tmp_path / "eval-w-written.jsonl").exists() and "latent steps" not in capsys.readouterr().out
    evaluate_run(EvalConfig(model=str(final), split="test", max_samples=4, batch_size=2, max_new_tokens=8,
                            jacobi_iters=0, device="cpu", progress=False, out=str(tmp_path / "eval-seq.jsonl")))
    assert ("note: evaluating 4 latent steps, one after another; the run trained 4 latent steps, 1 Jacobi pass"
            in capsys.readouterr().out)
    # stopped after step 3's checkpoint (max_steps 3), then resumed to 12
    train(_latent_cfg(student_dir, rkv_cache, tmp_path / "b", max_steps=3), echo=lambda *a: None)
    train(_latent_cfg(student_dir, rkv_cache, tmp_path / "b", max_steps=12, save_every=0, resume="auto"),
          echo=lambda *a: None)
    resumed = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(straight, resumed):
        for key in ("loss", "loss_kv", "loss_ce", "cos_k"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


@pytest.mark.slow
def test_the_latent_config_trains_and_evaluates_a_tiny_student_through_the_command_line(teacher_dir, rkv_cache,
                                                                                        tmp_path, capsys):
    """configs/kava_latent_qwen25_0.5b.yaml (gradient checkpointing and all) on a tiny model and
    its own cache, with what a CPU test needs over it: 4 slots, fp32, plain AdamW, 2 steps. It
    trains, says what its memory estimate counted, and the run answers after its latent steps."""
    import json
    from stage2_train.__main__ import main as cli
    from stage2_train.evaluate import main as evaluate_main
    run = tmp_path / "kava"
    over = dict(student=teacher_dir, cache=rkv_cache, out=run, dataset="synthetic-seed0", latent=4, precision="fp32",
                optimizer="adamw", batch_size=4, grad_accum=1, max_steps=2, log_every=1, save_every=0,
                warmup_steps=1, eval_samples=4, num_workers=0, device="cpu")
    args = ["--config", "configs/kava_latent_qwen25_0.5b.yaml", "--no-progress"]
    for k, v in over.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    assert cli(args) == 0
    assert "4 latent" in capsys.readouterr().out
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) and r["loss_kv"] > 0 for r in rows)
    assert all(r["loss_cot"] == 0.0 for r in rows)
    assert evaluate_main(["--model", str(run), "--latent", "4", "--split", "test", "--max-samples", "4",
                          "--batch-size", "4", "--max-new-tokens", "8", "--device", "cpu", "--no-progress",
                          "--out", str(tmp_path / "eval.jsonl")]) == 0
    answers = [json.loads(l) for l in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and all(1 + 3 + 1 <= r["forward_passes"] <= 1 + 3 + 8 for r in answers)


@pytest.mark.slow
def test_a_latent_run_refuses_a_cache_of_another_slot_count_before_loading_the_student(student_dir, rkv_cache,
                                                                                       tmp_path):
    """--latent 8 against a cache of 4 slots: one message naming the cache, both counts and the
    way out, before the student loads; the recompress it names makes a cache the run takes."""
    import json
    from kava_common import KavaError
    from kava_common.recompress import RecompressArgs, recompress
    from stage2_train.train import main as train
    lines = []
    with pytest.raises(KavaError, match=rf"{rkv_cache}: holds 4 R-KV slots per layer and KV head, and --latent 8 "
                                        rf"takes 8 latent steps against as many: give --latent 4, or re-select 8 slots "
                                        rf"from the cache without the teacher \(python -m kava_common.recompress "
                                        rf"{rkv_cache} --rkv-slots 8\)"):
        train(_latent_cfg(student_dir, rkv_cache, tmp_path / "x", max_steps=1, latent=8), echo=lines.append)
    assert not any("estimated peak memory" in l for l in lines)
    eight = recompress(RecompressArgs(cache=str(rkv_cache), out=str(tmp_path / "c8"), rkv_slots=8, progress=False),
                       log=lambda *a: None)
    train(_latent_cfg(student_dir, eight, tmp_path / "ok", max_steps=1, latent=8, save_every=0), echo=lambda *a: None)
    assert json.loads((tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()[-1])["loss_kv"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("iters, lora", [(1, 0), (0, 0), (1, 4)])
def test_a_latent_run_under_gradient_checkpointing_logs_the_same_numbers(student_dir, rkv_cache, tmp_path, iters,
                                                                         lora):
    """--latent with --gradient-checkpointing (what fits a real student on a small GPU), plain and
    through LoRA: step by step the same losses and held-out cosines as without it; the memory
    estimate it prints counts the latents' forwards as they run."""
    import json
    import re
    from stage2_train.train import main as train
    said = {}
    for gc in (False, True):
        lines = []
        train(_latent_cfg(student_dir, rkv_cache, tmp_path / f"gc{gc}", max_steps=3, save_every=0, jacobi_iters=iters,
                          gradient_checkpointing=gc, lora_r=lora), echo=lines.append)
        said[gc] = next(l for l in lines if l.startswith("estimated peak memory"))
        said[gc, "rows"] = [json.loads(l) for l in (tmp_path / f"gc{gc}" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(said[False, "rows"], said[True, "rows"]):
        for key in ("loss", "loss_kv", "loss_ce", "cos_k", "cos_v", "eval_loss_ce"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    for gc in (False, True):          # the latents' forwards: Jacobi, or one after another (no cache under gc)
        q, a, n = map(int, re.search(r"at batch 4 x \d+ tokens \((\d+) question, 4 latent, (\d+) answer; "
                                     r"the latents' forwards (\d+) tokens\)", said[gc]).groups())
        assert n == (q + (q + 4) if iters else 4 * q + 6 if gc else q + 4)


@pytest.mark.slow
def test_a_student_taught_by_its_own_teacher_mode_through_no_projector(student_dir, teacher_dir, rkv_cache, tmp_path):
    """KaVa's own setting: the teacher is the student, the K/V loss compares the latent steps' keys
    before RoPE with the slots' un-rotated keys, no projector between. The loss falls; a student of
    another geometry is refused, naming the cache."""
    import json
    from kava_common import KavaError
    from stage2_train.train import main as train
    with pytest.raises(KavaError, match=rf"{rkv_cache}: projector identity needs the same KV heads"):
        train(_latent_cfg(student_dir, rkv_cache, tmp_path / "x", max_steps=1, projector="identity"),
              echo=lambda *a: None)
    train(_latent_cfg(teacher_dir, rkv_cache, tmp_path / "self", max_steps=8, save_every=0, projector="identity",
                      latent_keys="pre_rope", lr_student=3e-3), echo=lambda *a: None)
    rows = [json.loads(l) for l in (tmp_path / "self" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss_kv"]) for r in rows) and rows[-1]["loss_kv"] < rows[0]["loss_kv"]
    assert rows[-1]["cos_k"] > rows[0]["cos_k"] and rows[-1]["cos_k"] > rows[-1]["cos_k_shuffled"]


def test_latent_settings_are_checked():
    from stage2_train.config import TrainConfig
    base = dict(student="s", caches=["c"], latent=4)
    for kw, message in [({"caches": ["c", "d"]}, "latent takes one teacher's cache, got 2"),
                        ({"kd_weight": 1.0}, "drop kd_weight and ce_chunk"),
                        ({"direction": "teacher_to_student"}, "direction student_to_teacher"),
                        ({"jacobi_iters": -1}, "latent and jacobi_iters must be >= 0"),
                        ({"latent": 0, "latent_keys": "pre_rope"}, "latent_keys pre_rope .* needs latent"),
                        ({"projector": "bottleneck"}, "projector linear, head, mlp or identity"),
                        ({"latent_contrast": -0.1}, "latent_contrast must be >= 0, got -0.1"),
                        ({"latent_contrast": 0.1, "batch_size": 1},
                         "latent_contrast contrasts the problems of a micro-batch: batch_size must be >= 2, got 1"),
                        ({"latent": 0, "latent_contrast": 0.1}, "latent_contrast is a K/V loss at the latent steps")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**{**base, **kw})
    assert TrainConfig(**base, projector="identity", latent_keys="pre_rope").latent_keys == "pre_rope"
    assert TrainConfig(**base, gradient_checkpointing=True).gradient_checkpointing


def test_the_identity_projector_passes_k_and_v_through_and_needs_one_geometry():
    from stage2_train.projector import KVProjector
    p = KVProjector("identity", 3, 2, 8, 2, 8)
    k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    pk, pv = p(2, k, v)
    assert pk is k and pv is v and sum(x.numel() for x in p.parameters()) == 0
    with pytest.raises(ValueError, match=r"same KV heads and head_dim on both sides, got 1 x 16 -> 2 x 32"):
        KVProjector("identity", 1, 1, 16, 2, 32)


@pytest.mark.parametrize("iters", [0, 3])
def test_latent_decoding_equals_a_step_by_step_reference(tok, iters):
    """Batched, padded, cached latent decoding gives the tokens of a reference that runs the
    whole sequence again for every latent and every answer token, one prompt at a time; its
    forward passes are counted as the model runs them."""
    import copy
    from stage2_train.latent import latent_generate
    from stage2_train.latent_data import add_thought_tokens
    tok = copy.deepcopy(tok)
    cfg = tiny.tiny_config("qwen2", len(tok), hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, intermediate=64,
                           tok=tok)
    model = tiny.build_model(cfg, seed=7).eval()
    bot, eot = add_thought_tokens(tok, model)
    torch.manual_seed(1)
    head = LatentHead(32).eval()
    prompts = ["Question: Ava has 3 pens.\nAnswer:", "Question: Ben has 12 stamps and gives 2 away.\nAnswer:"]
    m, max_new = 3, 6
    calls = []
    hook = model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    texts, counts = latent_generate(model, tok, head, prompts, m, iters, max_new, torch.device("cpu"))
    hook.remove()
    emb = model.get_input_embeddings()
    for b, p in enumerate(prompts):
        with torch.no_grad():
            seq = emb(torch.tensor([tok(p)["input_ids"] + [bot]]))
            seq = torch.cat([seq, latents_by_hand(model, head, seq, m), emb(torch.tensor([[eot]]))], 1)
            out = []
            for _ in range(max_new):
                nxt = int(model(inputs_embeds=seq).logits[0, -1].argmax())
                out.append(nxt)
                if nxt == tok.eos_token_id:
                    break
                seq = torch.cat([seq, emb(torch.tensor([[nxt]]))], 1)
        assert texts[b] == tok.decode(out, skip_special_tokens=True), b
        assert counts[b] == (1 + m if iters == 0 else 1 + iters) + len(out)
    assert len(calls) == max(counts)           # the longest answer's passes: the batch runs them all


def test_the_written_sequence_and_its_cross_entropy_by_hand():
    from stage2_train.latent import written_cross_entropy
    from stage2_train.latent_data import collate_latent
    slots = torch.zeros(1, 1, 2, 1)
    items = [{"question": [5, 6, 90], "cot": [7, 8], "suffix": [91, 9, 2], "slots_k": slots, "slots_v": slots,
              "slot_mask": torch.ones(2, dtype=torch.bool), "row": 0},
             {"question": [5, 90], "cot": [], "suffix": [91, 3, 2], "slots_k": slots, "slots_v": slots,
              "slot_mask": torch.ones(2, dtype=torch.bool), "row": 1}]
    b = collate_latent(items, pad_id=0)
    # question without begin-of-thought, the thought, the answer without end-of-thought; right-padded
    assert b["written_ids"].tolist() == [[5, 6, 7, 8, 9, 2], [5, 3, 2, 0, 0, 0]]
    assert b["written_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert b["written_ce"].tolist() == [[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]]
    model, _ = _model()
    with torch.no_grad():
        got = written_cross_entropy(model, b, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
        lp0 = torch.log_softmax(model(input_ids=b["written_ids"][:1]).logits[0], -1)
        lp1 = torch.log_softmax(model(input_ids=b["written_ids"][1:, :3]).logits[0], -1)
    # every predicted token: positions 1..5 of row 0 predict 7 8 9 2 ... from position 1 on; row 1 predicts 3, 2
    terms = [lp0[1, 7], lp0[2, 8], lp0[3, 9], lp0[4, 2], lp1[0, 3], lp1[1, 2]]
    assert float(got) == pytest.approx(float(-sum(terms) / len(terms)), rel=1e-5)
    # where no row predicts from a position (the questions' first tokens) no logits are computed there
    items[1]["question"] = [5, 4, 90]
    b = collate_latent(items, pad_id=0)
    asked = []
    forward = model.forward
    model.forward = lambda *a, **kw: asked.append(kw.get("logits_to_keep")) or forward(*a, **kw)
    with torch.no_grad():
        got = written_cross_entropy(model, b, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
        lp1 = torch.log_softmax(model(input_ids=b["written_ids"][1:, :4]).logits[0], -1)
    assert asked[0].tolist() == [1, 2, 3, 4]
    terms = terms[:4] + [lp1[1, 3], lp1[2, 2]]
    assert float(got) == pytest.approx(float(-sum(terms) / len(terms)), rel=1e-5)


def test_codis_hidden_state_loss_by_hand():
    """One student layer mapped to the second stored teacher layer (teacher layer 2), an
    identity projection: smooth L1 between student and teacher outputs, both over the target's std."""
    import types
    from stage2_train.latent import hidden_loss
    proj = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    with torch.no_grad():
        proj[0].weight.copy_(torch.eye(2))
        proj[0].bias.zero_()
    student = {0: torch.tensor([[1.0, 2.0], [0.0, 0.0]])}
    hidden = torch.zeros(2, 3, 2)                                   # (B, teacher layers, Ht)
    hidden[:, 2] = torch.tensor([[1.0, 4.0], [2.0, 1.0]])
    teacher = types.SimpleNamespace(cache=types.SimpleNamespace(layers=[0, 2]), distilled=[(0, [(1, 1.0)])])
    std = torch.tensor([1.0, 4.0, 2.0, 1.0]).std()
    diffs = [0.0, -2.0, -2.0, -1.0]                                 # student - teacher, per element
    def sl1(d):
        d = abs(d) / float(std)
        return 0.5 * d * d if d < 1 else d - 0.5
    want = sum(sl1(d) for d in diffs) / 4
    assert float(hidden_loss(student, hidden, teacher, proj).detach()) == pytest.approx(want, rel=1e-6)
