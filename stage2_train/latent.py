"""Latent reasoning steps (CODI / PCCoT style, as KaVa trains them): instead of writing its chain
of thought, the student reads the question and a begin-of-thought token, then takes M continuous
steps, each one's input embedding made from the previous position's last hidden state through a
small projection (`LatentHead`), and then the end-of-thought token and the answer.

Two ways to compute the M latents:
- `iters` 0: one after another, each a forward of one position over the cached prefix;
- `iters` T > 0 (PCCoT's Jacobi iterations): all M at once, T times, each time every latent made
  from the hidden state before it in the previous pass (the first pass starting from the
  question's last hidden state). Attention is causal, so after T passes the first T + 1 latents
  equal the sequential ones, and T >= M - 1 gives them all; fewer passes trade exactness for
  fewer sequential forwards.

Either way `latent_sequence` then runs the whole sequence once more, [question, bot, latents, eot,
answer], so that the answer's logits and the K/V at the latent positions (what the K/V loss
compares with the teacher's compressed slots) come from one forward with the gradient through
every latent step.

Under gradient checkpointing transformers drops the K/V cache of every layer it checkpoints, so
the sequential latents run without one there: each latent from a forward over the prefix and the
latents before it (M forwards, the same values). The Jacobi passes use no cache and run as they
are. The K/V the loss compares are captured in the last forward only, never from the backward's
recomputation (`StudentKV.active`).

Batches are left-padded in the question, so that every sample's bot, latents and eot sit at the
same positions; position ids count real tokens only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .student import decoder_layers


class LatentHead(torch.nn.Module):
    """The last layer's hidden state -> the next latent input embedding: a two-layer MLP and a
    LayerNorm, as CODI projects its continuous thoughts."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.LayerNorm(hidden))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _last_hidden(model, embeds: torch.Tensor, mask: torch.Tensor, **kw):
    # only the hidden states are read: the vocabulary's logits of the last position alone
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask),
                output_hidden_states=True, logits_to_keep=1, **kw)
    return out, out.hidden_states[-1]


def checkpointing(model) -> bool:
    """Whether a forward of `model` now runs under gradient checkpointing (which drops the
    K/V cache): its decoder layers checkpoint, it trains and autograd records."""
    return model.training and torch.is_grad_enabled() and \
        any(getattr(layer, "gradient_checkpointing", False) for layer in decoder_layers(model))


def latents(model, head: LatentHead, prefix: torch.Tensor, mask: torch.Tensor, m: int, iters: int = 0) -> torch.Tensor:
    """The M latent embeddings (B, M, hidden) after `prefix` (B, Tp, hidden: the question's
    embeddings, left-padded, then bot's) with attention `mask` (B, Tp)."""
    if m < 1:
        raise ValueError(f"--latent must be >= 1, got {m}")
    if iters < 0:
        raise ValueError(f"--jacobi-iters must be >= 0, got {iters}")
    b, tp, _ = prefix.shape
    ones = mask.new_ones(b, 1)
    if iters == 0 and checkpointing(model):   # no cache survives checkpointing: the whole prefix each time
        seq, full = prefix, mask
        for _ in range(m):
            _, h = _last_hidden(model, seq, full, use_cache=False)
            seq, full = torch.cat([seq, head(h[:, -1:])], 1), torch.cat([full, ones], 1)
        return seq[:, tp:]
    if iters == 0:                      # one after another, over the cached prefix
        out, h = _last_hidden(model, prefix, mask, use_cache=True)
        cache, full, steps = out.cache, mask, []
        for _ in range(m):
            e = head(h[:, -1:])
            steps.append(e)
            full = torch.cat([full, ones], 1)
            out = model(inputs_embeds=e, attention_mask=full, position_ids=_positions(full)[:, -1:],
                        cache=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)
            cache, h = out.cache, out.hidden_states[-1]
        return torch.cat(steps, 1)
    # Jacobi: every latent from the position before it, all at once; the first pass starts
    # from the prefix's last hidden state repeated (what the first latent will be)
    full = torch.cat([mask, mask.new_ones(b, m)], 1)
    _, h = _last_hidden(model, prefix, mask, use_cache=False)
    z = head(h[:, -1:]).expand(b, m, -1)
    for _ in range(iters):
        _, h = _last_hidden(model, torch.cat([prefix, z], 1), full, use_cache=False)
        z = head(h[:, tp - 1:tp - 1 + m])
    return z


def latent_sequence(prefix: torch.Tensor, mask: torch.Tensor, z: torch.Tensor, suffix: torch.Tensor,
                    suffix_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, slice]:
    """The whole input [prefix, latents, suffix] as embeddings and its attention mask, and the
    slice of the latent positions along time. `suffix` (B, Ts, hidden): eot and the answer,
    right-padded (`suffix_mask`)."""
    b, tp, m = prefix.shape[0], prefix.shape[1], z.shape[1]
    embeds = torch.cat([prefix, z, suffix], 1)
    full = torch.cat([mask, mask.new_ones(b, m), suffix_mask], 1)
    return embeds, full, slice(tp, tp + m)


def latent_kv_loss(student: dict[int, tuple[torch.Tensor, torch.Tensor]], slots_k: torch.Tensor,
                   slots_v: torch.Tensor, mask: torch.Tensor, distilled: list, projector, loss: str = "mercator",
                   alpha: float = 1.0, beta: float = 0.01, normalize: bool = False,
                   contrast: float = 0.0) -> torch.Tensor:
    """The K/V loss at the M latent positions against the teacher's compressed slots, averaged
    over the distilled student layers.

    student: {student layer: (K, V)}, (B, Hs, M, Ds) each, the student's K/V at its latent
    positions; slots_k, slots_v: (B, L, Ht, M, Dt), the teacher's R-KV slots of the L stored
    layers (`KVCache.rkv`); mask (B, M): the slots that hold a token; `distilled`: per student
    layer, (s, [(teacher layer index, weight), ...]), as for the full-sequence loss; `projector`:
    a KVProjector taking the student's K/V into the teacher's space (student_to_teacher).
    normalize: both sides divided by the teacher's standard deviation over the batch's filled
    slots, per layer and for K and V apart, so that layers of larger K/V do not outweigh the rest.
    contrast > 0: `contrastive_kv` at that temperature in place of `loss`.
    """
    from .losses import kv_loss
    total = 0.0
    for pi, (s, row) in enumerate(distilled):
        tk, tv = mixed(slots_k, row), mixed(slots_v, row)                    # (B, Ht, M, Dt)
        sk, sv = student[s]
        pk, pv = projector(pi, sk.float(), sv.float())
        if contrast:
            total = total + contrastive_kv(pk, tk, mask, contrast) + contrastive_kv(pv, tv, mask, contrast)
            continue
        if normalize:
            pk, tk = _by_teacher_std(pk, tk, mask)
            pv, tv = _by_teacher_std(pv, tv, mask)
        total = total + kv_loss(loss, pk, tk, mask, alpha, beta) + kv_loss(loss, pv, tv, mask, alpha, beta)
    return total / max(len(distilled), 1)


def contrastive_kv(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE across the batch's problems, per KV head and slot: pred and target (B, H, M, D),
    mask (B, M) the filled slots. Problem b's prediction at (head, slot) scores every problem's
    filled target there by cosine / temperature; the loss is the cross-entropy of picking its
    own, averaged over the (problem, head, slot) rows that have another problem to be told from.
    A component every problem's slot shares scores all alike, so only what tells this problem's
    slot from the others' lowers the loss."""
    p = torch.nn.functional.normalize(pred.float(), dim=-1, eps=1e-8)
    t = torch.nn.functional.normalize(target.float(), dim=-1, eps=1e-8)
    sim = torch.einsum("bhmd,chmd->hmbc", p, t) / temperature                 # (H, M, B, B)
    filled = mask.bool().t()                                                   # (M, B)
    logp = torch.log_softmax(sim.masked_fill(~filled[None, :, None, :], float("-inf")), -1)
    own = logp.diagonal(dim1=-2, dim2=-1)                                      # (H, M, B)
    rows = (filled & (filled.sum(1, keepdim=True) >= 2))[None].expand_as(own)  # others to be told from
    if not rows.any():
        return pred.sum() * 0.0
    return -own[rows].mean()


def mixed(per_layer: torch.Tensor, row: list) -> torch.Tensor:
    """The teacher's target for one student layer: its stored layers (axis 1 of `per_layer`)
    mixed by the layer map's (index, weight) pairs, in float32."""
    return sum(w * per_layer[:, ci].float() for ci, w in row)


def _std(x: torch.Tensor) -> torch.Tensor:
    """The standard deviation of `x`'s values, without gradient (1 for a single value)."""
    return x.std().detach().clamp(min=1e-6) if x.numel() > 1 else x.new_tensor(1.0)


def _by_teacher_std(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor):
    """Both divided by the target's standard deviation over the filled slots (no gradient)."""
    std = _std(target.transpose(1, 2)[mask.bool()])                             # over (N, H, D)
    return pred / std, target / std


def _latent_forward(model, cap, head, batch: dict, cfg, device, autocast):
    """The whole latent sequence once, its K/V captured: (output, latent slice, suffix ids, mask).
    The output's logits are those of the suffix's positions alone (B, Ts, vocab: end-of-thought
    and the answer, index j predicting suffix token j + 1), the rest are never computed. With
    --latent-hidden-weight the output also holds `layer_outputs` {student layer: (B, hidden)},
    each distilled layer's output at end-of-thought (before the final norm, as the teacher's)."""
    emb = model.get_input_embeddings()
    q, qm = batch["question_ids"].to(device), batch["question_mask"].to(device)
    s, sm = batch["suffix_ids"].to(device), batch["suffix_mask"].to(device)
    with autocast():
        prefix, suffix = emb(q), emb(s)
        z = latents(model, head, prefix, qm, cfg.latent, cfg.jacobi_iters)
        embeds, full, where = latent_sequence(prefix, qm, z, suffix, sm)
        grabbed, hooks = {}, []
        if cfg.latent_hidden_weight:
            blocks = decoder_layers(model)
            for layer in cap.layers:
                hooks.append(blocks[layer].register_forward_hook(
                    lambda mod, args, o, layer=layer: grabbed.__setitem__(layer, (o[0] if isinstance(o, tuple) else o)[
                        :, where.stop])))
        try:
            with cap:                 # the K/V of this forward only, not of the latent passes
                out = model(inputs_embeds=embeds, attention_mask=full, position_ids=_positions(full), use_cache=False,
                            logits_to_keep=s.shape[1])
        finally:
            for h in hooks:
                h.remove()
    out.layer_outputs = grabbed
    return out, where, s, sm


def _answer_ce(logits: torch.Tensor, s: torch.Tensor, sm: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer after the latents: the positions of end-of-thought and the
    answer (`logits`, those of the suffix `s` as `_latent_forward` keeps them) predict the
    answer's tokens and EOS."""
    pred = logits[:, :s.shape[1] - 1]
    keep = sm[:, 1:].bool()
    return torch.nn.functional.cross_entropy(pred[keep].float(), s[:, 1:][keep])


def _latent_pairs(cap, teacher, where: slice, keys: str = "post_rope") -> dict:
    """{distilled student layer: (K, V)} at the latent positions, K before or after RoPE (`keys`)."""
    return {l: tuple(x[:, :, where] for x in cap.kv(l, rotated=keys == "post_rope")) for l, _ in teacher.distilled}


def latent_train_step(model, cap, distiller, batch: dict, cfg, device, autocast):
    """One micro-batch of a latent run (--latent M): the answer's cross-entropy after the M
    latent steps plus kv_weight times the K/V loss at the latent positions against the teacher's
    R-KV slots; returns the loss and its parts, as `distiller.train_step` does."""
    out, where, s, sm = _latent_forward(model, cap, distiller.latent_head, batch, cfg, device, autocast)
    ce = _answer_ce(out.logits, s, sm)
    kv = 0.0
    if cfg.kv_weight:
        t = distiller.teachers[0]
        with autocast():
            kv = latent_kv_loss(_latent_pairs(cap, t, where, cfg.latent_keys), batch["slots_k"].to(device),
                                batch["slots_v"].to(device), batch["slot_mask"].to(device), t.distilled,
                                distiller.proj[0], cfg.loss, cfg.alpha, cfg.beta, cfg.latent_normalize,
                                cfg.latent_contrast)
    cot = written_cross_entropy(model, batch, device, autocast) if cfg.latent_cot_weight else 0.0
    hid = hidden_loss(out.layer_outputs, batch["hidden"].to(device), distiller.teachers[0], distiller.hidden_proj) \
        if cfg.latent_hidden_weight else 0.0
    loss = cfg.kv_weight * kv + cfg.ce_weight * ce + cfg.latent_cot_weight * cot + cfg.latent_hidden_weight * hid
    return loss, {"loss_kv": _num(kv), "loss_ce": _num(ce), "loss_kd": 0.0, "loss_cot": _num(cot), "loss_hidden": _num(hid)}


def _num(x) -> float:
    return float(x.detach()) if torch.is_tensor(x) else float(x)


def hidden_loss(student: dict[int, torch.Tensor], hidden: torch.Tensor, teacher, proj) -> torch.Tensor:
    """CODI's hidden-state loss: per distilled student layer s, its output at end-of-thought
    (`student[s]`, (B, Hs)) projected into the teacher's width against the teacher's layer
    outputs at the token before its answer (`hidden`, (B, teacher layers, Ht), as stage 1's
    --store-hidden stores them) mixed as the layer map mixes K/V; smooth L1 with both sides
    divided by the target's standard deviation over the batch, averaged over the layers."""
    layers = teacher.cache.layers                       # the stored layers the map indexes
    total = 0.0
    for pi, (s, row) in enumerate(teacher.distilled):
        target = mixed(hidden[:, layers], row)                                       # (B, Ht)
        pred, std = proj[pi](student[s].float()), _std(target)
        total = total + torch.nn.functional.smooth_l1_loss(pred / std, target / std)
    return total / max(len(teacher.distilled), 1)


def written_cross_entropy(model, batch: dict, device, autocast) -> torch.Tensor:
    """The student's cross-entropy on the written chain of thought and answer after the question
    (no thought tokens, no latents): what keeps its teacher mode."""
    from .losses import answer_cross_entropy, answer_positions
    ids, mask = batch["written_ids"].to(device), batch["written_mask"].to(device)
    target = batch["written_ce"].to(device)
    pos = answer_positions(target)        # logits only where some row has a target (not the question)
    with autocast():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=pos).logits
    return answer_cross_entropy(logits, ids, target, pos)


@torch.no_grad()
def latent_evaluate(model, cap, distiller, loader, cfg, device, autocast) -> dict:
    """Held-out metrics of a latent run: the cosine of the projected student K (V) at the latent
    positions to the teacher's slots, beside the same against shuffled slots, over filled slots,
    and the answer's cross-entropy after the latents (`eval_loss_ce`)."""
    from .losses import mean_cosine
    was = model.training
    model.eval()
    distiller.eval()
    g = torch.Generator().manual_seed(1234)
    sums = {"cos_k": [], "cos_v": [], "cos_k_shuffled": [], "cos_v_shuffled": [], "eval_loss_ce": []}
    t = distiller.teachers[0]
    for batch in loader:
        out, where, s, sm = _latent_forward(model, cap, distiller.latent_head, batch, cfg, device, autocast)
        sums["eval_loss_ce"].append(float(_answer_ce(out.logits, s, sm)))
        mask, pairs = batch["slot_mask"].to(device), _latent_pairs(cap, t, where, cfg.latent_keys)
        for pi, (layer, row) in enumerate(t.distilled):
            sk, sv = pairs[layer]
            pk, pv = distiller.proj[0](pi, sk.float(), sv.float())
            for key, pred, slots in (("k", pk, batch["slots_k"]), ("v", pv, batch["slots_v"])):
                tgt = mixed(slots.to(device), row)
                sums[f"cos_{key}"].append(mean_cosine(pred, tgt, mask))
                sums[f"cos_{key}_shuffled"].append(mean_cosine(pred, tgt, mask, shuffle=g))
    model.train(was)
    distiller.train(was)
    return {k: sum(v) / len(v) if v else float("nan") for k, v in sums.items()} | {"bad_eval_samples": 0,
                                                                                     "bad_eval_rows": []}


@torch.no_grad()
def latent_generate(model, tok, head: LatentHead, prompts: list[str], m: int, iters: int, max_new_tokens: int,
                    device) -> tuple[list[str], list[int]]:
    """Greedy answers after M latent steps, for a batch of prompts: (texts, forward passes per
    prompt). A prompt reads begin-of-thought, the M latents, end-of-thought, then generates until
    EOS. Forward passes: the latents' (1 + M one after another, 1 + T with Jacobi passes), one
    over [prompt, latents, end-of-thought] that gives the first answer token, one per further
    token."""
    from kava_common.data import pad_id
    from .latent_data import BOT, EOT, pad_ids
    bot, eot = tok.convert_tokens_to_ids([BOT, EOT])
    if tok.unk_token_id is not None and tok.unk_token_id in (bot, eot):
        raise ValueError("the model's tokenizer has no begin/end-of-thought tokens: not a latent student")
    ids = [tok(p, add_special_tokens=True)["input_ids"] + [bot] for p in prompts]
    q, qm = (x.to(device) for x in pad_ids(ids, pad_id(tok), left=True))
    emb = model.get_input_embeddings()
    prefix = emb(q)
    z = latents(model, head, prefix, qm, m, iters)
    passes = (1 + m) if iters == 0 else (1 + iters)
    full = torch.cat([qm, qm.new_ones(len(ids), m + 1)], 1)
    out = model(inputs_embeds=torch.cat([prefix, z, emb(torch.full_like(q[:, :1], eot))], 1), attention_mask=full,
                position_ids=_positions(full), use_cache=True, logits_to_keep=1)
    cache, nxt = out.cache, out.logits[:, -1].argmax(-1)
    tokens, done = [[] for _ in ids], torch.zeros(len(ids), dtype=torch.bool, device=device)
    counts = [passes + 1] * len(ids)
    for step in range(max_new_tokens):
        for b in range(len(ids)):
            if not done[b]:
                tokens[b].append(int(nxt[b]))
        done |= nxt == tok.eos_token_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        for b in range(len(ids)):
            counts[b] += not bool(done[b])
        full = torch.cat([full, full.new_ones(len(ids), 1)], 1)
        out = model(input_ids=nxt[:, None], attention_mask=full, position_ids=_positions(full)[:, -1:], cache=cache,
                    use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1].argmax(-1)
    return [tok.decode(x, skip_special_tokens=True) for x in tokens], counts


def load_latent_head(model_path: str, hidden: int, device) -> LatentHead:
    """The LatentHead saved beside a latent student (`RUN/final/projector.safetensors`)."""
    from safetensors.torch import load_file
    from kava_common import KavaError
    f = Path(model_path).parent / "projector.safetensors"
    weights = {k[len("latent_head."):]: v for k, v in (load_file(str(f)).items() if f.is_file() else ())
               if k.startswith("latent_head.")}
    if not weights:
        raise KavaError(f"--latent: {f} holds no latent head; give the student a latent run saved "
                        "(RUN/final/student, beside RUN/final/projector.safetensors)")
    head = LatentHead(hidden)
    head.load_state_dict(weights)
    return head.to(device).eval()
