"""Latent reasoning steps (stage2_train.latent) on tiny models: sequential, Jacobi, gradients."""

import pytest
import torch

from kava_demo import tiny
from stage2_train.latent import LatentHead, latent_sequence, latents, run_latent


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


def _by_hand(model, head, prefix, m):
    """The step-by-step reference: a full forward per latent, no cache, one sample."""
    seq = prefix
    for _ in range(m):
        h = model(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1]
        seq = torch.cat([seq, head(h[:, -1:])], 1)
    return seq[:, prefix.shape[1]:]


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
            assert torch.allclose(seq[b:b + 1], _by_hand(model, head, alone, m), atol=1e-5), b
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


def test_run_latent_is_the_whole_sequence_in_one_forward():
    model, head = _model()
    prefix, mask = _prefix(model, [[5, 6, 7, 8]])
    suffix = model.get_input_embeddings()(torch.tensor([[2, 30, 31]]))
    with torch.no_grad():
        out, z, where = run_latent(model, head, prefix, mask, suffix, torch.ones(1, 3, dtype=torch.long), 2)
        ref = model(inputs_embeds=torch.cat([prefix, z, suffix], 1)).logits
    assert torch.allclose(out.logits, ref, atol=1e-5) and (where.start, where.stop) == (5, 7)
