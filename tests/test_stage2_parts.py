import math

import pytest
import torch

from kava_demo import tiny
from kava_common.geometry import KVGeometry
from stage2_train.align import (linear_alignment, overlap_alignment, parse_layer_map,
                                proportional_layer_map, segment_alignment)
from stage2_train.losses import (answer_cross_entropy, answer_positions, cosine_loss, l1_loss,
                                 mean_cosine, mercator_loss, mse_loss)
from stage2_train.projector import KVProjector, head_mix_init, make_projector
from stage2_train.student import StudentKV, enable_checkpointing
from stage2_train.build import lr_factor, sparse_tied_embedding
from stage2_train.data import epoch_batches


def bhtd(rows):
    """[[token vectors]] for one head -> (1, 1, T, D)."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


P = bhtd([[2.0, 0.0], [0.0, 1.0]])     # norms 2, 1
T = bhtd([[1.0, 0.0], [1.0, 0.0]])     # norms 1, 1; cos(P, T) = [1, 0]
ALL = torch.tensor([[True, True]])
FIRST = torch.tensor([[True, False]])


def test_losses_by_hand():
    assert cosine_loss(P, T, ALL).item() == pytest.approx(0.5)
    assert mercator_loss(P, T, ALL, 1.0, 0.01).item() == pytest.approx((1 + 0.01 * math.log(2) ** 2) / 2)
    assert mercator_loss(P, T, ALL, 2.0, 1.0).item() == pytest.approx((2 + math.log(2) ** 2) / 2)
    P3 = bhtd([[3.0, 0.0], [0.0, 1.0]])
    assert mse_loss(P3, T, ALL).item() == pytest.approx((4 + 0 + 1 + 1) / 4)
    assert l1_loss(P3, T, ALL).item() == pytest.approx((2 + 0 + 1 + 1) / 4)


def test_masked_positions_change_nothing_and_all_masked_is_zero():
    junk = P.clone()
    junk[0, 0, 1] = torch.tensor([1e6, -3e5])
    for f in (cosine_loss, mercator_loss, mse_loss, l1_loss):
        assert f(junk, T, FIRST).item() == f(P, T, FIRST).item()
        z = f(P.clone().requires_grad_(), T, torch.zeros(1, 2, dtype=torch.bool))
        assert z.item() == 0.0 and z.requires_grad
    assert mean_cosine(P, T, ALL) == pytest.approx(0.5)
    assert mean_cosine(P, T, FIRST) == pytest.approx(1.0)


def test_losses_equal_their_definition_over_gathered_items():
    """The masked-mean losses against a direct computation over the gathered unmasked items."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 2, 7, 5, generator=g), torch.randn(3, 2, 7, 5, generator=g)
    pred.requires_grad_()
    mask = torch.rand(3, 7, generator=g) > 0.4
    mask[2] = False                                   # a row with nothing to compare
    p, t = pred.transpose(1, 2)[mask], target.transpose(1, 2)[mask]   # (N, H, D)
    cos = torch.nn.functional.cosine_similarity(p, t, dim=-1, eps=1e-8)
    logn = (torch.log(p.norm(dim=-1) + 1e-8) - torch.log(t.norm(dim=-1) + 1e-8)) ** 2
    want = {cosine_loss: (1 - cos).mean(), mse_loss: ((p - t) ** 2).mean(), l1_loss: (p - t).abs().mean(),
            mercator_loss: (0.7 * (1 - cos) + 0.3 * logn).mean()}
    for f, w in want.items():
        got = f(pred, target, mask, 0.7, 0.3) if f is mercator_loss else f(pred, target, mask)
        assert torch.allclose(got, w, rtol=1e-6, atol=0), (f.__name__, got, w)
        (g1,) = torch.autograd.grad(got, pred)
        (g2,) = torch.autograd.grad(w, pred, retain_graph=True)   # the items are shared
        assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-9), f.__name__
        assert g1[2].abs().sum() == 0                 # masked positions get no gradient


def test_losses_in_fp32_from_bf16():
    assert cosine_loss(P.bfloat16(), T.bfloat16(), ALL).dtype == torch.float32


def test_answer_cross_entropy_by_hand():
    logits = torch.zeros(1, 3, 4)
    logits[0, 1, 2] = math.log(3.0)             # position 1 predicts token 2 with p = 3/6
    ids = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[False, False, True]])  # only target token 2 (predicted from position 1)
    assert answer_cross_entropy(logits, ids, mask).item() == pytest.approx(-math.log(0.5))
    assert answer_cross_entropy(logits, ids, torch.zeros(1, 3, dtype=torch.bool)).item() == 0.0


def assert_same_grads(ga, gb):
    """Two lists of parameter gradients agree: the same ones missing, the rest close."""
    for a, b in zip(ga, gb, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_answer_logits_only_equal_full_logits(tok):
    """Logits at the answer positions alone give the same cross-entropy and gradients as
    logits everywhere; the model then computes (B, P, V) logits, P = positions needed."""
    model = tiny.build_model(tiny.tiny_config("qwen2", len(tok), hidden=32, layers=2, heads=4, kv_heads=2,
                                              head_dim=8, intermediate=64, tok=tok), seed=3)
    ids = torch.randint(3, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 5:7] = True                              # targets 5, 6 -> predicted from 4, 5
    mask[1, 3] = True                                # target 3 -> predicted from 2
    pos = answer_positions(mask)
    assert pos.tolist() == [2, 4, 5]
    full = answer_cross_entropy(model(input_ids=ids, attention_mask=attn).logits, ids, mask)
    g_full = torch.autograd.grad(full, list(model.parameters()), allow_unused=True)
    out = model(input_ids=ids, attention_mask=attn, logits_to_keep=pos)
    assert out.logits.shape == (2, 3, len(tok))
    part = answer_cross_entropy(out.logits, ids, mask, pos)
    assert part.item() == pytest.approx(full.item(), rel=1e-6)
    assert_same_grads(g_full, torch.autograd.grad(part, list(model.parameters()), allow_unused=True))


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_chunked_cross_entropy_equals_whole(tok, chunk):
    """Cross-entropy over chunks of answer tokens (logits recomputed in the backward) gives the
    value and gradients of the whole at once, tied output head included; 3 targets here."""
    from stage2_train.losses import chunked_answer_cross_entropy
    model = tiny.build_model(tiny.tiny_config("qwen2", len(tok), hidden=32, layers=2, heads=4, kv_heads=2,
                                              head_dim=8, intermediate=64, tok=tok), seed=3)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = torch.randint(3, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 5:7] = True
    mask[1, 3] = True
    pos = answer_positions(mask)
    whole = answer_cross_entropy(model(input_ids=ids, attention_mask=attn, logits_to_keep=pos).logits,
                                 ids, mask, pos)
    g_whole = torch.autograd.grad(whole, list(model.parameters()), allow_unused=True)
    hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
    part = chunked_answer_cross_entropy(model.get_output_embeddings(), hidden[:, pos], ids, mask, pos, chunk)
    assert part.item() == pytest.approx(whole.item(), rel=1e-6)
    assert_same_grads(g_whole, torch.autograd.grad(part, list(model.parameters()), allow_unused=True))
    none = chunked_answer_cross_entropy(model.get_output_embeddings(), hidden[:, pos], ids,
                                        torch.zeros_like(mask), pos, chunk)
    assert none.item() == 0.0


@pytest.mark.parametrize("with_ce", [True, False])
def test_sparse_tied_embedding_gradients_equal_dense(tok, with_ce):
    """With the tied embedding's gradient sparse, every parameter's accumulated gradient (two
    micro-batches) is dense and equal to the all-dense one, with and without cross-entropy
    (without it the head is in the graph only through a zero-weight term, as in train_step)."""
    cfg = tiny.tiny_config("qwen2", len(tok), hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8,
                           intermediate=64, tok=tok)
    dense, sparse = tiny.build_model(cfg, seed=3), tiny.build_model(cfg, seed=3)
    assert sparse_tied_embedding(sparse) and sparse.get_input_embeddings().sparse
    ids = torch.randint(3, len(tok), (2, 2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, 5:8] = True
    pos = answer_positions(mask)
    for model in (dense, sparse):
        for micro in ids:                              # two micro-batches accumulate into .grad
            out = model(input_ids=micro, logits_to_keep=pos if with_ce else 1, output_hidden_states=True)
            ce = answer_cross_entropy(out.logits, micro, mask, pos) if with_ce else out.logits.sum() * 0.0
            (ce + out.hidden_states[-1].pow(2).mean()).backward()
    for (name, a), b in zip(dense.named_parameters(), sparse.parameters(), strict=True):
        assert b.grad.layout == torch.strided, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    emb_grad = sparse.get_input_embeddings().weight.grad
    used = torch.zeros(len(tok), dtype=torch.bool)
    used[ids.flatten()] = True
    assert emb_grad[used].abs().sum() > 0
    if not with_ce:          # no head term: only the rows of the batch's tokens have a gradient
        assert emb_grad[~used].abs().sum() == 0


def test_sparse_tied_embedding_leaves_untied_and_frozen_embeddings_dense(tok):
    cfg = tiny.tiny_config("qwen2", len(tok), hidden=32, layers=1, heads=4, kv_heads=2, tok=tok)
    frozen = tiny.build_model(cfg, seed=3)
    frozen.get_input_embeddings().requires_grad_(False)
    cfg.tie_word_embeddings = False
    untied = tiny.build_model(cfg, seed=3)
    assert untied.get_output_embeddings().weight is not untied.get_input_embeddings().weight
    for model in (frozen, untied):
        assert not sparse_tied_embedding(model) and not model.get_input_embeddings().sparse


@pytest.mark.parametrize("kind", ["linear", "head", "mlp"])
@pytest.mark.parametrize("hin,din,hout,dout", [(12, 16, 2, 8), (28, 8, 4, 16), (4, 8, 2, 8),
                                               (2, 8, 4, 16), (32, 4, 8, 8)])
def test_projector_shapes(kind, hin, din, hout, dout):
    x = torch.randn(3, hin, 5, din)
    assert make_projector(kind, hin, din, hout, dout)(x).shape == (3, hout, 5, dout)


def test_head_projector_starts_as_group_average():
    assert head_mix_init(4, 2).tolist() == [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]
    assert head_mix_init(2, 4).tolist() == [[1, 0], [1, 0], [0, 1], [0, 1]]
    p = make_projector("head", 6, 3, 2, 3)
    with torch.no_grad():
        p.dim.weight.copy_(torch.eye(3))
        p.dim.bias.zero_()
    x = torch.arange(6.0)[None, :, None, None].expand(1, 6, 2, 3)   # head h holds the value h
    y = p(x)
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([1.0, 4.0]))  # means of (0,1,2) and (3,4,5)
    shared = KVProjector("linear", 3, 2, 4, 1, 4, shared=True)     # 3 layers, one K/V pair
    k, v = shared(2, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    assert len(shared.k) == len(shared.v) == 1 and k.shape == v.shape == (1, 1, 5, 4)


def test_overlap_alignment_by_hand():
    # text "ab cd": teacher tokens "a","b"," cd"; student tokens [BOS], "ab", " c", "d"
    teacher = [(0, 1), (1, 2), (2, 5)]
    student = [(0, 0), (0, 2), (2, 4), (4, 5)]
    A, valid = overlap_alignment(student, teacher)
    assert valid.tolist() == [False, True, True, True]
    assert A.tolist() == [[0, 0, 0], [0.5, 0.5, 0], [0, 0, 1], [0, 0, 1]]


def test_linear_alignment_edge_lengths():
    A, valid = linear_alignment(3, 5)                         # positions 0, 2, 4
    assert A.tolist() == [[1, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 1]]
    A, valid = linear_alignment(2, 3)                         # 0 and 2
    assert A.tolist() == [[1, 0, 0], [0, 0, 1]]
    A, valid = linear_alignment(3, 2)                         # 0, 0.5, 1
    assert A.tolist() == [[1, 0], [0.5, 0.5], [0, 1]] and valid.all()
    A, valid = linear_alignment(1, 3)                         # the middle
    assert A.tolist() == [[0, 1, 0]]
    A, valid = linear_alignment(2, 1)
    assert A.tolist() == [[1], [1]]
    A, valid = linear_alignment(2, 0)
    assert A.shape == (2, 0) and not valid.any()
    assert linear_alignment(0, 4)[0].shape == (0, 4)


def test_segment_alignment_keeps_segments_apart():
    # student segments (0,2),(2,3),(3,3 empty); teacher (0,1),(1,4),(4,5)
    A, valid = segment_alignment(4, 5, [(0, 2), (2, 3), (3, 3)], [(0, 1), (1, 4), (4, 5)])
    assert A.tolist() == [[1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]
    assert valid.tolist() == [True, True, True, False]


def test_layer_maps():
    assert proportional_layer_map(4, 28, list(range(28))) == [[(0, 1.0)], [(9, 1.0)], [(18, 1.0)], [(27, 1.0)]]
    stored = [0, 7, 14, 21, 27]
    assert proportional_layer_map(3, 28, stored) == [[(0, 1.0)], [(2, 1.0)], [(4, 1.0)]]
    assert parse_layer_map([None, 7, {"14": 0.25, "21": 0.75}], 3, 28, stored) == \
        [[], [(1, 1.0)], [(2, 0.25), (3, 0.75)]]
    with pytest.raises(ValueError, match="student layer 1 wants teacher layer 8, which the cache does not store"):
        parse_layer_map([0, 8, 14], 3, 28, stored)
    with pytest.raises(ValueError, match="one entry per student layer"):
        parse_layer_map([0], 3, 28, stored)


def test_schedule_and_epochs():
    assert lr_factor(0, 4, 20, 0.1) == 0.25 and lr_factor(3, 4, 20, 0.1) == 1.0
    assert lr_factor(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, 0.1) == pytest.approx(0.55)
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    a = epoch_batches(10, 3, seed=0, epoch=0)
    assert a == epoch_batches(10, 3, 0, 0) and a != epoch_batches(10, 3, 0, 1)
    assert len(a) == 3 and all(len(b) == 3 for b in a) and len({i for b in a for i in b}) == 9


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_student_hooks_match_the_models_cache_and_keep_gradients(arch, tok):
    cfg = tiny.tiny_config(arch, len(tok), hidden=32, layers=2, heads=4, kv_heads=2, head_dim=16, tok=tok)
    model = tiny.build_model(cfg, seed=0)
    geo = KVGeometry.from_config(cfg)
    cap = StudentKV(model, [0, 1], geo)
    ids = torch.randint(0, len(tok), (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    assert cap.check(model, ids, mask) < 1e-5
    model.train()

    def grads(gc):
        if gc:
            enable_checkpointing(model)
        model.zero_grad()
        with cap:
            model(input_ids=ids, attention_mask=mask)
        k, v = cap.kv(1)
        (k.square().sum() + v.sum()).backward()
        g = model.model.layers[0].self_attn.k_proj.weight.grad.clone()
        if gc:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        return g
    plain, checkpointed = grads(False), grads(True)
    assert plain.abs().sum() > 0 and torch.allclose(plain, checkpointed, atol=1e-6)


def test_memory_estimate_by_hand():
    from stage2_train.memory import Shape, estimate
    s = Shape(layers=2, hidden=4, intermediate=8, heads=2, kv_heads=1, head_dim=2, vocab=10, params=1000)
    e = estimate(s, (1, 1, 2), batch=1, seq=3, precision="bf16", optimizer="adamw", cuda_context=0)
    assert e["weights"] == 2000 and e["gradients"] == 2000 and e["optimizer"] == 8000
    assert e["projector"] == 2 * 1 * (1 * 2 + 1) * 1 * 2 * 16          # K and V linear, fp32 x 4
    assert e["activations"] == 2 * 3 * (6 * 4 + 2 * 2 + 4 * 8) * 2 + 2 * 3 * 2 * 4 * 2
    assert e["logits"] == 1 * 3 * 10 * (2 + 4 + 4)                      # every position by default
    assert e["teacher_kv"] == 2 * 3 * 1 * 2 * 1 * 2 * 4
    assert e["total"] == 13404
    assert estimate(s, (1, 1, 2), 1, 3, cuda_context=0, freeze="embeddings")["total"] == 13404 - 40 * 10
    assert estimate(s, (1, 1, 2), 1, 3, cuda_context=0, freeze="all")["total"] == 13404 - 10000
    long = estimate(s, (1, 1, 2), batch=2, seq=512, cuda_context=0, answer_tokens=8)
    assert long["logits"] == 2 * (2 * 8) * 10 * 10                      # answer positions only
    assert estimate(s, (1, 1, 2), batch=2, seq=512, cuda_context=0)["logits"] == 2 * 512 * 10 * 10
    assert estimate(s, (1, 1, 2), batch=2, seq=512, cuda_context=0, ce_chunk=64)["logits"] == 64 * 10 * 10
    assert estimate(s, (1, 1, 2), batch=2, seq=512, cuda_context=0, ce_chunk=64,
                    answer_tokens=8)["logits"] == 16 * 10 * 10          # fewer targets than a chunk
    # logit distillation: its fp32 log-softmax and that one's gradient, 8 more bytes a logit
    assert estimate(s, (1, 1, 2), batch=2, seq=512, cuda_context=0, answer_tokens=8,
                    kd=True)["logits"] == 2 * (2 * 8) * 10 * (10 + 8)
    # under torchrun a tied, trainable embedding's dense gradient: vocab x hidden x 2 bytes (bf16)
    ddp = estimate(s, (1, 1, 2), 1, 3, cuda_context=0, dense_tied_embedding=True)
    assert ddp["embedding_gradient"] == 10 * 4 * 2 and ddp["total"] == 13404 + 80
    assert "embedding_gradient" not in estimate(s, (1, 1, 2), 1, 3, cuda_context=0, dense_tied_embedding=True,
                                                freeze="embeddings")


def test_memory_estimate_of_a_latent_run_by_hand():
    """A latent run keeps the latents' forwards in its graph (Jacobi: the question once, then T
    times question and latents; one after another: one position per latent over the cache, or
    under checkpointing the whole prefix per latent), the written sequence with its cross-entropy;
    its logits are the suffix's, its teacher K/V the M slots."""
    from types import SimpleNamespace
    import numpy as np
    from stage2_train.build import latent_tokens
    from stage2_train.memory import Latent, Shape, estimate
    s = Shape(layers=2, hidden=4, intermediate=8, heads=2, kv_heads=1, head_dim=2, vocab=10, params=1000)
    jacobi = Latent(question=5, steps=3, suffix=2, written=0, iters=2)
    assert jacobi.seq == 10 and jacobi.pass_tokens(False) == jacobi.pass_tokens(True) == 5 + 2 * 8
    assert Latent(5, 3, 2, 0, iters=0).pass_tokens(False) == 5 + 3
    assert Latent(5, 3, 2, 0, iters=0).pass_tokens(True) == 5 + 6 + 7
    per_token_layer = (6 * 4 + 2 * 2 + 4 * 8) * 2                              # bf16
    captured = 2 * 10 * 2 * 4 * 2                                             # the main forward's K/V, fp32
    e = estimate(s, (1, 1, 2), batch=1, seq=512, cuda_context=0, latent=jacobi)
    assert e["activations"] == 2 * (10 + 21) * per_token_layer + captured
    assert e["logits"] == 2 * 10 * (2 + 4 + 4)                                # the suffix's positions
    assert e["teacher_kv"] == 2 * 3 * 2 * 2 * 4                          # 3 slots of K and V (width 2), and the copy
    seq_ckpt = estimate(s, (1, 1, 2), batch=1, seq=512, cuda_context=0, gradient_checkpointing=True,
                        latent=Latent(5, 3, 2, written=20, iters=0))
    graph = 10 + 18 + 20                          # layer inputs of every forward; one layer of the largest
    assert seq_ckpt["activations"] == 2 * graph * 4 * 2 + 20 * per_token_layer + captured
    assert seq_ckpt["logits"] == (2 + 20) * 10 * (2 + 4 + 4)
    read = estimate(s, (1, 1, 2), batch=1, seq=512, cuda_context=0, latent=Latent(5, 3, 2, 20, 0, written_logits=16))
    assert read["logits"] == (2 + 16) * 10 * (2 + 4 + 4)                     # the written targets' logits alone
    # the token counts from the cache's segments (question, reasoning, answer), in teacher tokens
    cache = SimpleNamespace(token_segments=lambda: np.array([[[0, 8], [9, 40], [40, 44]],
                                                             [[0, 12], [12, 30], [30, 36]]]))
    cfg = SimpleNamespace(latent=8, jacobi_iters=3, latent_cot_weight=0.0)
    assert latent_tokens(cfg, SimpleNamespace(cache=cache)) == Latent(13, 8, 8, 0, 3)
    cfg.latent_cot_weight = 1.0                   # written: up to 44 + EOS; read from the 9th position on
    assert latent_tokens(cfg, SimpleNamespace(cache=cache)) == Latent(13, 8, 8, 45, 3, written_logits=36)


def test_memory_estimate_counts_every_position_when_a_loss_covers_every_token():
    from types import SimpleNamespace
    from stage2_train.build import every_token_logits
    cfg = lambda **kw: SimpleNamespace(**{"ce_weight": 1.0, "ce_tokens": "answer", "kd_weight": 0.0,
                                         "kd_tokens": "answer", **kw})
    assert not every_token_logits(cfg())
    assert every_token_logits(cfg(ce_tokens="all")) and not every_token_logits(cfg(ce_tokens="all", ce_weight=0.0))
    assert every_token_logits(cfg(kd_weight=1.0, kd_tokens="all"))
    assert not every_token_logits(cfg(kd_tokens="all"))                   # no distillation, no extra logits


def test_save_pretrained_prints_no_unicode_progress_bar(tok, tmp_path, capfd):
    """transformers draws a Unicode progress bar on every save and load; kava's print nothing,
    leave transformers' setting as it was, and the folder loads back."""
    from transformers.utils import logging as hf_logging
    from kava_common import save_pretrained
    from stage2_train.student import load_student
    model = tiny.build_model(tiny.tiny_config("qwen2", len(tok), hidden=32, layers=1, heads=4, kv_heads=2,
                                              tok=tok), seed=1)
    assert hf_logging.is_progress_bar_enabled()
    capfd.readouterr()
    save_pretrained(model, tok, tmp_path / "m")
    out, err = capfd.readouterr()
    assert "Writing" not in out + err and (out + err).isascii(), out + err
    assert hf_logging.is_progress_bar_enabled()
    back, _ = load_student(str(tmp_path / "m"), torch.device("cpu"), torch.float32)   # loads quietly too
    out, err = capfd.readouterr()
    assert "Loading" not in out + err and (out + err).isascii(), out + err
    assert torch.equal(back.get_input_embeddings().weight, model.get_input_embeddings().weight)


# --- the relation loss -------------------------------------------------------------------------

def test_relation_loss_by_hand():
    """One head, head_dim 1, two positions: the first query sees only itself (KL 0); the second
    sees both keys: teacher scores [1*2, 2*2] = [2, 4], student [1, 1]."""
    from stage2_train.losses import relation_loss
    t = torch.tensor([1.0, 2.0]).view(1, 1, 2, 1)
    s = torch.tensor([1.0, 1.0]).view(1, 1, 2, 1)
    p = torch.softmax(torch.tensor([2.0, 4.0]), 0)
    want = float((p * (p.log() - math.log(0.5))).sum()) / 2            # mean over the two queries
    assert relation_loss(t, s, torch.ones(1, 2, dtype=torch.bool)).item() == pytest.approx(want, rel=1e-6)
    # a masked key is not seen and a masked query does not count: only query 0 is left
    assert relation_loss(t, s, torch.tensor([[True, False]])).item() == pytest.approx(0.0, abs=1e-7)
    assert relation_loss(t, s, torch.zeros(1, 2, dtype=torch.bool)).item() == 0.0


def test_relation_loss_is_zero_for_equal_relations_of_any_geometry():
    from stage2_train.losses import relation_loss
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 2, 5, 4, generator=g)                                # (B, 2 heads, T, 4)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert relation_loss(t, t.clone(), mask, heads=2).item() == pytest.approx(0.0, abs=1e-6)
    # the same 8 values per position as one head of 8: same concatenation, same relations
    one_head = t.transpose(1, 2).reshape(2, 5, 1, 8).transpose(1, 2)
    assert relation_loss(t, one_head, mask, heads=2).item() == pytest.approx(0.0, abs=1e-6)
    assert relation_loss(t, one_head, mask, heads=1).item() == pytest.approx(0.0, abs=1e-6)
    # twice the width, every value repeated and scaled so that X X^T / sqrt(d) is unchanged
    x = t.transpose(1, 2).reshape(2, 5, 8)
    c = (8 ** 0.5 / (2 * 4 ** 0.5)) ** 0.5                                 # 2 c^2 / sqrt(16) = 1 / sqrt(8)
    wide = torch.cat([x, x], -1).mul(c).view(2, 5, 4, 4).transpose(1, 2)   # (B, 4 heads, T, 4)
    assert relation_loss(t, wide, mask, heads=1).item() == pytest.approx(0.0, abs=1e-5)
    assert relation_loss(t, torch.randn(2, 4, 5, 4, generator=g), mask, heads=1).item() > 0.01


def test_relation_loss_gives_gradients_to_the_student_only():
    from stage2_train.losses import relation_loss
    g = torch.Generator().manual_seed(1)
    t = torch.randn(1, 2, 4, 3, generator=g, requires_grad=True)
    s = torch.randn(1, 1, 4, 6, generator=g, requires_grad=True)
    relation_loss(t, s, torch.ones(1, 4, dtype=torch.bool), heads=2).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="do not split into 4 relation heads"):
        relation_loss(t, torch.randn(1, 1, 4, 6), torch.ones(1, 4, dtype=torch.bool), heads=4)


# --- logit distillation from cached top-K ------------------------------------------------------

def test_topk_kd_loss_by_hand():
    """Vocabulary of 4, teacher [0.5, 0.3, 0.15, 0.05] known by its top 2 (tail 0.2), student
    uniform: KL = 0.5 ln(0.5/0.25) + 0.3 ln(0.3/0.25) + 0.2 ln(0.2/0.5)."""
    from stage2_train.losses import topk_kd_loss
    ids = torch.tensor([[[0, 1]]])
    lps = torch.tensor([[[math.log(0.5), math.log(0.3)]]])
    uniform = torch.zeros(1, 1, 4)
    want = 0.5 * math.log(2) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    one = torch.ones(1, 1, dtype=torch.bool)
    assert topk_kd_loss(uniform, ids, lps, one).item() == pytest.approx(want, rel=1e-6)
    # zero when the student matches the teacher on the top-K and in the tail's total
    same = torch.log(torch.tensor([[[0.5, 0.3, 0.1, 0.1]]]))
    assert topk_kd_loss(same, ids, lps, one).item() == pytest.approx(0.0, abs=1e-6)
    assert topk_kd_loss(uniform, ids, lps, torch.zeros(1, 1, dtype=torch.bool)).item() == 0.0
    # temperature 2: student logits / 2; teacher top-2 tempered and renormalised to their mass 0.8
    p = torch.softmax(torch.tensor([math.log(0.5), math.log(0.3)]) / 2, 0) * 0.8
    want2 = 4 * (float((p * (p.log() - math.log(0.25))).sum()) + 0.2 * math.log(0.2 / 0.5))
    assert topk_kd_loss(uniform, ids, lps, one, temperature=2.0).item() == pytest.approx(want2, rel=1e-6)


def test_bottleneck_shapes_and_the_original_parameter_count():
    from stage2_train.projector import BottleneckKV, BottleneckProjector, bottleneck_params
    with torch.device("meta"):                           # 147M parameters: shapes only
        big = BottleneckProjector(28, 2, 128, 24, 2, 64)
    n = sum(p.numel() for p in big.parameters())
    # LayerNorm(7168) + Linear(7168, 14336) + Linear(14336, 3072)
    assert n == 2 * 7168 + 7168 * 14336 + 14336 + 14336 * 3072 + 3072 == 146_832_384
    assert bottleneck_params(7168, 3072) == n
    for dims_in, dims_out in (((4, 2, 32), (2, 1, 16)), ((3, 4, 8), (5, 2, 24)), ((2, 1, 16), (4, 2, 32))):
        kv = BottleneckKV(dims_in, dims_out, hidden=40)
        x = torch.randn(3, *dims_in[:2], 7, dims_in[2])
        k, v = kv(x, x)
        assert k.shape == v.shape == (3, dims_out[0], dims_out[1], 7, dims_out[2])
    shared = BottleneckKV((2, 1, 16), (2, 1, 16), shared=True)
    assert shared.k is shared.v and sum(p.numel() for p in shared.parameters()) == bottleneck_params(32, 32)


@pytest.mark.slow
def test_bottleneck_learns_a_cross_layer_mix_that_a_one_to_one_map_cannot():
    from stage2_train.align import proportional_layer_map
    from stage2_train.projector import BottleneckProjector, LinearProjector
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 1, 6, 8, generator=g)              # (B, teacher layers 4, H 1, T 6, D 8)
    mix = torch.tensor([[0.5, 0.0, 0.0, 0.5], [0.0, 1.0, -1.0, 0.0]])   # student layer j = sum_c mix[j, c] x_c
    y = torch.einsum("jc,bchtd->bjhtd", mix, x)             # (B, 2, 1, 6, 8)
    torch.manual_seed(0)
    bott = BottleneckProjector(4, 1, 8, 2, 1, 8, hidden=64, dropout=0.0)
    one = [c for ((c, _),) in proportional_layer_map(2, 4, [0, 1, 2, 3])]     # student 0 <- 0, 1 <- 3
    per_layer = torch.nn.ModuleList(LinearProjector(1, 8, 1, 8) for _ in one)

    def fit(params, predict, steps=600):
        opt = torch.optim.Adam(params, lr=1e-2)
        for _ in range(steps):
            loss = ((predict() - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return float(((predict() - y) ** 2).mean() / (y ** 2).mean())   # relative squared error
    err_b = fit(bott.parameters(), lambda: bott(x))
    err_1 = fit(per_layer.parameters(), lambda: torch.stack([p(x[:, c]) for p, c in zip(per_layer, one)], 1))
    # measured: bottleneck 0.005, one-to-one 0.87 (student layer 0 sees teacher layer 0 only, so
    # half its mix is out of reach; layer 1 sees teacher layer 3, which its mix does not use)
    assert err_b < 0.02 and err_1 > 0.3, (err_b, err_1)


def test_graph_parameters_are_the_leaves_a_backward_reaches():
    from stage2_train.ranks import graph_parameters
    a, b, c = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
    frozen = torch.ones(2)
    loss = (a * 2).sum() + (a * b).sum() + (frozen * 3).sum()
    assert graph_parameters(loss) == {id(a), id(b)}                     # c is in no op; frozen needs no grad


def _rank_accumulates(rank: int, world: int, init: str, out: str, find_unused: bool) -> None:
    """One gloo rank of Trainer.accumulate under DistributedDataParallel, 2 micro-batches per
    step; rank 1's last micro-batch has no sample left (`empty`). find_unused: rank 0 uses
    `a` twice, rank 1 uses `a` and `b` in its first micro-batch, `c` is in no rank's graph;
    otherwise every micro-batch uses `a` and `b`, and DDP looks for no unused parameter."""
    import types
    import weakref
    import torch.distributed as dist
    from kava_common.launch import end_distributed
    from stage2_train.checkpoint import Progress
    from stage2_train.ranks import ranks_for
    from stage2_train.trainer import Trainer
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    sizes = (("a", 3), ("b", 2), ("c", 4)) if find_unused else (("a", 3), ("b", 2))
    model = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.ones(n)) for k, n in sizes})

    def forward(batch):
        x = batch["x"]
        loss = (model["a"] * x).sum() + (model["b"].sum() * x[0] if batch.get("use_b") or not find_unused else 0.0)
        return loss, {"loss_kv": 1.0, "loss_ce": float(x[0]), "loss_kd": 0.0}

    said = []
    me = types.SimpleNamespace(cfg=types.SimpleNamespace(grad_accum=2), device=torch.device("cpu"), bad_rows=set(),
                               echo=said.append, params=list(model.values()), forward=forward, model=model,
                               distiller=torch.nn.Module(), prog=Progress())
    me.ranks = ranks_for(me.device)
    assert (me.ranks.rank, me.ranks.world) == (rank, world)
    me.note_bad_rows = lambda rows: Trainer.note_bad_rows(me, rows)
    me.fwd = me.ranks.wrap(me, in_graph=[model["a"], model["b"]])
    assert me.fwd.find_unused_parameters == find_unused
    mask = torch.ones(1, 5)
    if rank == 0:
        batches = [{"x": torch.tensor([1.0, 2, 3]), "bad_rows": [], "attention_mask": mask},
                   {"x": torch.tensor([4.0, 5, 6]), "bad_rows": [], "attention_mask": mask}]
    else:
        batches = [{"x": torch.tensor([10.0, 20, 30]), "use_b": True, "bad_rows": [], "attention_mask": mask},
                   {"empty": True, "bad_rows": [7]}]
    parts, tokens = Trainer.accumulate(me, batches)
    ddp = weakref.ref(me.fwd)
    Trainer.close(me)
    end_distributed()
    ended = {"ddp_freed": ddp() is None, "group_ended": not dist.is_initialized(), "bad_rows": sorted(me.bad_rows),
             "said": said}
    if rank == 0:
        torch.save({"grads": {k: p.grad for k, p in model.items()}, "parts": parts, "tokens": tokens}, out)
    torch.save(ended, f"{out}.ended{rank}")


def test_ranks_are_dealt_an_epochs_micro_batches_round_robin_and_too_few_are_refused():
    from kava_common import KavaError
    from stage2_train.ranks import Alone, deal
    every = epoch_batches(10, 3, 3, 0)              # 3 micro-batches of 3 (one sample left over)
    assert len(every) == 3 and Alone().deal(every, 10, 3) == every
    # 2 ranks: the third micro-batch would give rank 0 one more, so it is left out
    assert deal(every, 0, 2, 10, 3) == [every[0]]
    assert deal(every, 1, 2, 10, 3) == [every[1]]
    with pytest.raises(KavaError, match=r"4 training samples make 1 micro-batch\(es\) of --batch-size 4, fewer "
                                        r"than the 2 torchrun ranks"):
        deal(epoch_batches(4, 4, 3, 0), 1, 2, 4, 4)


@pytest.mark.parametrize("cuda", [True, False])
def test_init_distributed_starts_nccl_on_the_ranks_gpu_or_gloo_and_nothing_alone(monkeypatch, cuda):
    import torch.distributed as dist
    from kava_common.launch import init_distributed
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: any(c[0] == "init" for c in calls))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, device_id=None: calls.append(
        ("init", backend, device_id)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("auto") == (0, 1, "auto") and calls == []          # a lone process starts nothing
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    if cuda:    # NCCL bound to this rank's GPU (LOCAL_RANK)
        assert init_distributed("auto") == (1, 2, "cuda:1")
        assert calls == [("set_device", 1), ("init", "nccl", torch.device("cuda:1"))]
    else:
        assert init_distributed("auto") == (1, 2, "cpu") and calls == [("init", "gloo", None)]
    init_distributed("auto")                                                    # started once
    assert len([c for c in calls if c[0] == "init"]) == 1


def test_end_distributed_waits_for_every_rank_then_ends_the_group_and_does_nothing_alone(monkeypatch):
    import torch.distributed as dist
    from kava_common.launch import end_distributed
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: "destroy" not in calls)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    end_distributed()
    assert calls == ["barrier", "destroy"]
    end_distributed()                                   # ended: nothing more
    assert calls == ["barrier", "destroy"]


def test_the_trainers_collectives_reduce_tensors_on_its_device(monkeypatch):
    """NCCL reduces CUDA tensors only: the stop flag and the logged losses go to all_reduce on
    the trainer's device (here `meta`, which no CPU default would give)."""
    import torch.distributed as dist
    from stage2_train.ranks import Torchrun
    seen = []

    class Reduced(Exception):
        pass

    def all_reduce(t, op=None):
        seen.append(t.device)
        raise Reduced

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    ranks = Torchrun(torch.device("meta"))
    with pytest.raises(Reduced):
        ranks.any(True)
    with pytest.raises(Reduced):
        ranks.combine({"loss": 1.0, "loss_kv": 0.5, "loss_ce": 0.5, "loss_kd": 0.0, "loss_cot": 0.0, "loss_hidden": 0.0},
                      {"tokens": 7, "samples": 1, "kd_dropped": 0, "kd_skipped": 0}, [], [3])
    assert seen == [torch.device("meta")] * 2


@pytest.mark.slow
@pytest.mark.parametrize("find_unused", [True, False])
def test_accumulate_under_ddp_averages_over_micro_batches_and_ranks_with_an_empty_last_batch(tmp_path, find_unused):
    import torch.multiprocessing as mp
    init, out = f"file://{tmp_path / 'store'}", str(tmp_path / "rank0.pt")
    mp.spawn(_rank_accumulates, args=(2, init, out, find_unused), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    for rank in range(2):   # DDP (in a reference cycle with the trainer) freed, then the group ended
        # rank 1's left-out sample 7 is noted (and reported) by both ranks, so rank 0 counts it
        assert torch.load(f"{out}.ended{rank}", weights_only=True) == {
            "ddp_freed": True, "group_ended": True, "bad_rows": [7],
            "said": ["left out sample row 7: its teacher K/V hold NaN or Inf (1 such samples so far)"]}
    # a: (rank 0 (x1 + x2) / 2 micro-batches + rank 1 x / 2) / 2 ranks, per channel
    assert torch.equal(got["grads"]["a"], torch.tensor([3.75, 6.75, 9.75]))
    assert got["parts"]["loss_kv"] == 0.75 and got["parts"]["loss_ce"] == 3.75 and got["tokens"] == 15
    if find_unused:
        assert torch.equal(got["grads"]["b"], torch.tensor([2.5, 2.5]))   # rank 1's 10 / 2 / 2
        assert got["grads"]["c"] is None                                   # in no rank's graph
        # loss: rank 0 (6 + 15) / 2, rank 1 (60 + 2 x 10) / 2 (its empty batch counts nothing), averaged
        assert got["parts"]["loss"] == 25.25
    else:   # b: (rank 0 (1 + 4) / 2 + rank 1 10 / 2) / 2; loss (rank 0 (8 + 23) / 2 + rank 1 80 / 2) / 2
        assert torch.equal(got["grads"]["b"], torch.tensor([3.75, 3.75])) and got["parts"]["loss"] == 27.75


def test_a_runs_saved_settings_are_its_train_config_fields_and_a_bad_file_is_named(tmp_path):
    """stage2_train.config.saved_settings, which evaluate, sweep and bench/latent_readout.py read
    a run's config.yaml through: TrainConfig's fields only; a missing, unparsable or non-mapping
    file is a KavaError naming it."""
    from kava_common import KavaError
    from stage2_train.config import saved_settings
    (tmp_path / "config.yaml").write_text("latent: 8\njacobi_iters: 0\ncache_fingerprints: [abc]\n")
    assert saved_settings(tmp_path) == {"latent": 8, "jacobi_iters": 0}
    for text, why in (("latent: [8\n", "missing or unreadable"), ("- 8\n", "not a mapping of settings")):
        (tmp_path / "config.yaml").write_text(text)
        with pytest.raises(KavaError, match=f"{tmp_path / 'config.yaml'}: {why}"):
            saved_settings(tmp_path)
    with pytest.raises(KavaError, match=f"{tmp_path / 'nothing' / 'config.yaml'}: missing or unreadable"):
        saved_settings(tmp_path / "nothing")
