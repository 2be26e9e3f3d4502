"""A peak-memory estimate for a stage-2 run, from configs alone (nothing is loaded).

Terms (bytes): student weights; gradients and optimizer state of what trains (AdamW: two fp32
moments; 8-bit AdamW: two 1-byte moments; LoRA: only the adapters train); projector weights,
gradients and AdamW state in fp32; activations kept for the backward pass (every layer without
gradient checkpointing, one layer's worth plus each layer's input with it); the logits and
their fp32 cross-entropy copies (and with logit distillation its fp32 log-softmax and
gradient), at the answer positions only (reasoning and final answer; the union over the batch
of `answer_tokens` per sample, bounded by batch x answer_tokens; stage 2 asks the model for no
other logits, and passes the longest answer in its caches, or every position when
cross-entropy or distillation covers every token);
the teacher K/V batch
in fp32 with its aligned copy; and the CUDA context. It is an estimate: allocator fragmentation
and kernel workspaces come on top.

A latent run (`Latent`) keeps more in its graph: besides the forward over [question, bot, M
latents, eot, answer], the forwards that made the latents (`Latent.pass_tokens`) and, with the
written chain of thought's cross-entropy, a forward over question, chain of thought and answer,
each with its activations counted as the main forward's are; its logits are the suffix's (and
the written sequence's), its teacher K/V the M slots per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1024 ** 3


@dataclass
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int

    @classmethod
    def from_config(cls, c, params: int | None = None) -> "Shape":
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        if params is None:
            attn = c.hidden_size * hd * (c.num_attention_heads * 2 + kv * 2)
            mlp = 3 * c.hidden_size * c.intermediate_size
            emb = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
            params = c.num_hidden_layers * (attn + mlp) + emb
        return cls(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                   kv, hd, c.vocab_size, params)


@dataclass
class Latent:
    """A latent run's token counts per sample (the longest): `question` (question and bot),
    `steps` (M), `suffix` (eot, answer, EOS), `written` (question, chain of thought, answer; 0
    without its cross-entropy) and the positions of it whose logits that cross-entropy reads
    (`written_logits`, the chain of thought and answer; all of it if not given), and its Jacobi
    passes (`iters`, 0: one latent after another)."""
    question: int
    steps: int
    suffix: int
    written: int = 0
    iters: int = 3
    written_logits: int | None = None

    @property
    def seq(self) -> int:
        """The positions of the forward the losses read."""
        return self.question + self.steps + self.suffix

    def pass_tokens(self, gradient_checkpointing: bool) -> int:
        """Positions the latents' own forwards keep for the backward: Jacobi, one over the
        question and T over question and latents; one after another, the question and one
        position per latent over the cache, or, under checkpointing (no cache), a forward over
        the question and the latents before it for each latent."""
        q, m = self.question, self.steps
        if self.iters:
            return q + self.iters * (q + m)
        return m * q + m * (m - 1) // 2 if gradient_checkpointing else q + m


def activations(s: Shape, batch: int, seq: int, wb: int, gradient_checkpointing: bool,
                latent: Latent | None = None) -> int:
    """Bytes the backward keeps of the forwards: every one it goes through (the main one of `seq`
    positions, and a latent run's others), each layer's activations, or under checkpointing each
    layer's input and one layer of the largest forward recomputed at a time; and the captured
    student K/V of the main forward, upcast for the loss."""
    tokens, kv_dim = batch * seq, s.kv_heads * s.head_dim
    graph = tokens + (batch * (latent.pass_tokens(gradient_checkpointing) + latent.written) if latent else 0)
    largest = batch * max(seq, latent.question + latent.steps, latent.written) if latent else tokens
    per_token_layer = (6 * s.hidden + 2 * kv_dim + 4 * s.intermediate) * wb
    acts = (s.layers * graph * s.hidden * wb + largest * per_token_layer) if gradient_checkpointing \
        else s.layers * graph * per_token_layer
    return acts + 2 * tokens * kv_dim * 4 * s.layers


def estimate(student: Shape, teacher_kv: tuple[int, int, int], batch: int, seq: int,
             precision: str = "bf16", optimizer: str = "adamw", lora_r: int = 0,
             gradient_checkpointing: bool = False, projector_params: int | None = None,
             cuda_context: float = 0.5 * GB, answer_tokens: int | None = None,
             freeze: str = "none", ce_chunk: int = 0, kd: bool = False,
             dense_tied_embedding: bool = False, latent: Latent | None = None) -> dict[str, float]:
    """Bytes per term and `total`. teacher_kv = (distilled layers, teacher KV heads, head_dim);
    freeze: none | embeddings (input embeddings fixed) | all (projector alone); answer_tokens:
    cross-entropy targets per sample (None: every position, the bound for long answers);
    ce_chunk: with chunked cross-entropy, the logits of one chunk of targets at a time; kd:
    logit distillation, whose fp32 log-softmax of the logits and its gradient come on top;
    dense_tied_embedding: a trainable input embedding tied to the head passes a dense
    vocab x hidden gradient (under torchrun), held beside the head's until they are summed.
    latent: a latent run's token counts, in place of `seq` and `answer_tokens`."""
    answer_tokens = seq if answer_tokens is None else answer_tokens
    wb = 2 if precision == "bf16" else 4
    s = student
    if freeze == "all":
        trainable = 0
    elif lora_r:
        trainable = s.layers * lora_r * 2 * (2 * s.hidden + 2 * s.heads * s.head_dim
                                             + 2 * s.kv_heads * s.head_dim)
    else:
        trainable = s.params - (s.vocab * s.hidden if freeze == "embeddings" else 0)
    opt_b = {"adamw": 8, "adamw8bit": 2}[optimizer]
    lt, ht, dt = teacher_kv
    if projector_params is None:       # linear K and V projectors per distilled layer
        projector_params = 2 * lt * (ht * dt + 1) * s.kv_heads * s.head_dim
    if latent:
        seq = latent.seq
    acts = activations(s, batch, seq, wb, gradient_checkpointing, latent)
    logit_bytes = s.vocab * (wb + 4 + 4 + (8 if kd else 0))
    if latent:          # the suffix's logits, and the written sequence's for its cross-entropy
        written = latent.written if latent.written_logits is None else min(latent.written, latent.written_logits)
        logits = batch * (latent.suffix + written) * logit_bytes
    elif ce_chunk:
        logits = min(ce_chunk, batch * answer_tokens) * logit_bytes
    else:
        logits = batch * min(seq, batch * answer_tokens) * logit_bytes
    out = {
        "weights": s.params * wb + (trainable * wb if lora_r else 0),
        "gradients": trainable * wb,
        "optimizer": trainable * opt_b,
        "projector": projector_params * 4 * 4,         # weights, grads, two AdamW moments
        "activations": acts,
        "logits": logits,
        # fp32 K and V, plus the aligned (or mixed) copy: every position's, or a latent run's M slots
        "teacher_kv": 2 * batch * (latent.steps if latent else seq) * lt * 2 * ht * dt * 4,
        "cuda_context": cuda_context,
    }
    if dense_tied_embedding and freeze == "none" and not lora_r:
        out["embedding_gradient"] = s.vocab * s.hidden * wb
    out["total"] = sum(out.values())
    return out


def describe(est: dict[str, float]) -> str:
    parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in est.items() if k != "total")
    return f"estimated peak memory {est['total'] / GB:.2f} GB ({parts})"
