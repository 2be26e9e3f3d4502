"""The student: loading (optionally with LoRA) and capturing its own K/V with gradients.

Transformers drops the K/V cache under gradient checkpointing, so the student's K/V are taken
with hooks instead: V is the output of `v_proj`; K is the output of `k_proj` rotated with the
(cos, sin) the attention layer receives, i.e. post-RoPE like the teacher keys in the cache.
`StudentKV.check` compares both against the model's own cache once at start-up.
"""

from __future__ import annotations

from functools import partial

import torch

from kava_common import KavaError, no_hf_progress_bars
from kava_common.data import load_fast_tokenizer
from kava_common.geometry import KVGeometry
from kava_common.rope import rotate_half


def decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    if not hasattr(inner, "layers"):
        raise ValueError(f"student {type(base).__name__}: no decoder `layers` found; kava supports "
                         "Llama-style decoders (Llama, Qwen2, Mistral, ...)")
    return inner.layers


class StudentKV:
    """Capture post-RoPE K and V of chosen layers during a forward pass.

    with cap: out = model(...)
    k, v = cap.kv(layer)      # (B, kv_heads, T, head_dim) each, with gradients
    """

    def __init__(self, model, layers: list[int], geometry: KVGeometry):
        self.geometry, self.layers = geometry, list(layers)
        self.active = False
        self._k, self._v, self._rope = {}, {}, {}
        self._handles = []
        blocks = decoder_layers(model)
        for i in self.layers:
            attn = blocks[i].self_attn
            self._handles += [
                attn.register_forward_pre_hook(partial(self._pre, i), with_kwargs=True),
                attn.k_proj.register_forward_hook(partial(self._store, self._k, i)),
                attn.v_proj.register_forward_hook(partial(self._store, self._v, i))]

    def _pre(self, i, module, args, kwargs):
        if self.active:
            self._rope[i] = kwargs.get("position_embeddings")

    def _store(self, into, i, module, inp, out):
        if self.active:      # not during the recomputation of gradient checkpointing
            into[i] = out

    def __enter__(self):
        self._k.clear(), self._v.clear(), self._rope.clear()
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False

    def _heads(self, x):                                         # (B, T, H*D) -> (B, H, T, D)
        b, t, _ = x.shape
        return x.view(b, t, self.geometry.num_kv_heads, self.geometry.head_dim).transpose(1, 2)

    def kv(self, layer: int, rotated: bool = True):
        """K after RoPE (as attention used it; `rotated` False: before it) and V of `layer`."""
        k, v = self._heads(self._k[layer]), self._heads(self._v[layer])
        if not rotated:
            return k, v
        rope = self._rope.get(layer)
        if rope is None:
            raise RuntimeError("the attention layer got no position_embeddings; this student "
                               "architecture is not supported")
        cos, sin = (x.unsqueeze(1).to(k.dtype) for x in rope)   # (B, 1, T, D)
        return k * cos + rotate_half(k) * sin, v

    @torch.no_grad()
    def check(self, model, input_ids, attention_mask) -> float:
        """Max abs difference between captured K/V and the model's own cache (eval mode)."""
        was = model.training
        model.eval()
        with self:
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        model.train(was)
        worst = 0.0
        for l in self.layers:
            k, v = self.kv(l)
            worst = max(worst, (k - out.cache.layers[l].keys).abs().max().item(),
                        (v - out.cache.layers[l].values).abs().max().item())
        return worst

    def remove(self):
        for h in self._handles:
            h.remove()


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing (its transformers 5 name, or the older one)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_student(name: str, device: torch.device, dtype: torch.dtype, lora_r: int = 0,
                 lora_alpha: int = 16, gradient_checkpointing: bool = False):
    from transformers import AutoModelForCausalLM
    tok = load_fast_tokenizer(name, "student")
    with no_hf_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa")
    model.to(device)
    if gradient_checkpointing:
        enable_checkpointing(model)
        model.config.use_cache = False
    if lora_r:
        import warnings
        from peft import LoraConfig, get_peft_model
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing` alias on every
            # get_peft_model; the warning is about peft's code, not about this call
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = get_peft_model(model, LoraConfig(
                r=lora_r, lora_alpha=lora_alpha, task_type="CAUSAL_LM",
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model, tok


def check_capture(cap: StudentKV, model, probe: dict, dtype: torch.dtype, name: str) -> None:
    """The K/V the hooks capture must equal the student's own cache on one sample (`probe`, a
    batch of one); KavaError naming the student otherwise."""
    device = next(model.parameters()).device
    worst = cap.check(model, probe["input_ids"].to(device), probe["attention_mask"].to(device))
    if worst > (1e-3 if dtype == torch.float32 else 5e-2):
        raise KavaError(f"student {name!r}: K/V captured by hooks differ from the model's cache by {worst:.2e}; "
                        "this architecture's attention is not supported")
