"""Taking the teacher's K/V inside its forward pass, straight into the shard buffers."""

from __future__ import annotations

import functools

import torch

from kava_common import KavaError
from kava_common.geometry import KVGeometry


class ForwardDone(Exception):
    """Raised by a capturing cache once the last K/V stage 1 needs are taken: the rest of the
    forward (that layer's attention and MLP, the later layers, the head) computes nothing that
    is stored."""


def teacher_forward(model, ids, mask, pos, cache=None, all_logits: bool = False):
    """The teacher's forward with the K/V cache on; logits only for the last position unless
    `all_logits` (stage 1 with --logits-topk). `cache` None uses the model's own
    DynamicCache; stage 1 passes a `KVCapture.cache`, which may end the forward early (then
    None is returned)."""
    dev = model.device
    try:
        return model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                     use_cache=True, cache=cache, logits_to_keep=0 if all_logits else 1)
    except ForwardDone:
        return None


def capture_topk(logits: torch.Tensor, spans: list[tuple[int, int, int]], k: int, ids_dst: list,
                 lp_dst: list, tokens: torch.Tensor | None = None, token_dst: list | None = None,
                 eos_id: int | None = None) -> None:
    """The top-`k` next-token log-probabilities (float32 log_softmax of the logits) and their
    token ids at each real position of each sample: logits (B, T, V); `spans` per sample
    (batch row, start, length); destinations (n, k) per sample, int32 ids and float32
    log-probs. Position t holds the distribution of token t+1. With `token_dst` ((n,) float32
    per sample), also the log-probability of the actual next token, read from the batch's ids
    `tokens` (B, T), and at the last position that of `eos_id` (0.0 when None). One sample at
    a time, so at most one sample's float32 log-probabilities exist at once."""
    for i, ((b, s, n), ids, lps) in enumerate(zip(spans, ids_dst, lp_dst)):
        lp = logits[b, s:s + n].float().log_softmax(-1)                     # (n, V)
        vals, idx = lp.topk(k, dim=-1)                                      # (n, k), sorted
        lps.copy_(vals)
        ids.copy_(idx)
        if token_dst is not None:
            nxt = tokens[b, s + 1:s + n].to(lp.device)                      # (n-1,) tokens 1..n-1
            last = lp[-1:, eos_id] if eos_id is not None else lp.new_zeros(1)
            token_dst[i].copy_(torch.cat([lp[:-1].gather(1, nxt[:, None])[:, 0], last]))


class KVCapture:
    """Takes each layer's K/V inside the teacher's forward, as attention receives them.

    `cache(spans, batch, width)` gives a transformers `Cache` for one forward. When layer l
    stores its fresh keys and values (B, H, T, D), the real tokens of each sample are copied
    into the shard buffers right there and the tensors go back to attention unchanged: no
    layer keeps its K/V, so the padded batch's K/V of all layers are never held at once and
    the stock DynamicCache's concatenation (one more copy of everything) is skipped. Every
    layer's shapes are checked against the config's geometry before anything is copied.

    With `stop_after` (a layer index), the forward ends (ForwardDone) as soon as that layer's
    K/V are taken, so nothing after them is computed: stage 1 passes its last stored layer
    unless it also needs the logits (--logits-topk).
    """

    def __init__(self, name: str, geometry: KVGeometry, gather: bool | None = None,
                 stop_after: int | None = None):
        """`gather`: first collect a layer's real tokens into one contiguous tensor on the
        model's device, then copy each sample's rows out of it (plain memcpys); None means on
        for a GPU, where copying straight from the padded, strided K/V costs a kernel per
        sample and layer besides the copy. On the CPU the direct copies are as fast or faster
        (docs/benchmarks.md)."""
        self.name, self.geometry, self.gather, self.stop_after = name, geometry, gather, stop_after
        self.dests: dict = {}
        self.spans: list[tuple[int, int, int]] = []
        self.want: tuple = ()
        self.seen = 0
        self._index = None

    def cache(self, dests: dict, spans: list[tuple[int, int, int]], batch: int, width: int):
        """`dests`: {stored layer: (K views, V views)}, one (n, H, D) destination per entry of
        `spans`; `spans`: per sample (batch row, start on the padded time axis, length n)."""
        self.dests, self.spans, self.seen = dests, spans, 0
        self.want = (batch, self.geometry.num_kv_heads, width, self.geometry.head_dim)
        self._index = None
        return _capture_cache_class()(self)

    def take(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        g = self.geometry
        if layer >= g.num_layers or tuple(keys.shape) != self.want or tuple(values.shape) != self.want:
            raise KavaError(
                f"teacher {self.name!r}: its config gives {g.num_layers} layers x {g.num_kv_heads} KV "
                f"heads x head_dim {g.head_dim}, but the model returned keys shaped "
                f"{list(keys.shape)} and values shaped {list(values.shape)} at layer {layer} "
                f"(batch, heads, T, head_dim; expected {list(self.want)})")
        self.seen += 1
        if layer in self.dests:
            self._copy(layer, keys, values)
        if layer == self.stop_after:
            raise ForwardDone

    def _copy(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        gather = self.gather if self.gather is not None else keys.device.type != "cpu"
        if not gather and keys.device.type == "cpu":
            # one call for the batch's K and V: a third less time than a Python loop of copy_ here
            srcs = []
            for t in (keys, values):
                per_row = t.transpose(1, 2).unbind(0)        # (T, H, D) views
                srcs += [per_row[b][s:s + n] for b, s, n in self.spans]
            torch._foreach_copy_([d for dsts in self.dests[layer] for d in dsts], srcs)
            return
        for t, dsts in zip((keys, values), self.dests[layer]):
            if gather:
                b_, h, w, d_ = t.shape
                if self._index is None:     # rows of the real tokens in (B * T), sample by sample
                    self._index = torch.cat([torch.arange(b * w + s, b * w + s + n)
                                             for b, s, n in self.spans]).to(t.device)
                rows = t.transpose(1, 2).reshape(b_ * w, h, d_).index_select(0, self._index)
                rows = rows.to(dsts[0].dtype).split([n for _, _, n in self.spans])
                for dst, src in zip(dsts, rows):
                    dst.copy_(src, non_blocking=True)
            else:
                t = t.to(dsts[0].dtype)                      # cast once on the GPU, then copy out
                for dst, (b, s, n) in zip(dsts, self.spans):
                    dst.copy_(t[b, :, s:s + n].transpose(0, 1), non_blocking=True)

    def check_complete(self) -> None:
        """After a forward: every layer of the config (up to `stop_after`) passed through the
        cache."""
        want = self.geometry.num_layers if self.stop_after is None else self.stop_after + 1
        if self.seen != want:
            raise KavaError(f"teacher {self.name!r}: its config gives {self.geometry.num_layers} "
                            f"layers, but the model stored K/V for {self.seen}")


@functools.cache
def _capture_cache_class():
    """The Cache subclass, built on first use (transformers is imported lazily)."""
    from transformers.cache_utils import Cache, DynamicLayer

    class PassLayer(DynamicLayer):
        """Stores nothing: the forward is a single prefill, nothing is reused."""

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            return key_states, value_states

    class CaptureCache(Cache):
        def __init__(self, capture: KVCapture):
            super().__init__(layer_class_to_replicate=PassLayer)
            self.capture = capture

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            self.capture.take(layer_idx, key_states, value_states)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return CaptureCache


def sample_spans(seqs_len: list[int], width: int, padding_side: str) -> list[int]:
    """Where each sample's real tokens start along the padded time axis."""
    return [0 if padding_side == "right" else width - n for n in seqs_len]




def _decoder_layers(model):
    """The teacher's decoder layers (a causal LM's `get_decoder()`, else its `model`)."""
    return (model.get_decoder() if hasattr(model, "get_decoder") else model.model).layers


class QueryCapture:
    """The teacher's post-RoPE queries at chosen positions of a batch, per layer, as its attention
    computes them: a forward pre-hook on each attention module projects the hidden states of
    those positions alone (`q_proj`) and rotates them with the layer's own cos/sin and its
    module's `apply_rotary_pos_emb`. The forward itself is unchanged, and no attention matrix is
    built (R-KV's importance needs only the answer's queries against the reasoning keys).

    Use: `with QueryCapture(model, layers) as qc: qc.want(index); forward`, then `qc.got[layer]`
    (B, query heads, P, head_dim) for `index` (B, P) long positions along the padded time axis."""

    def __init__(self, model, layers: list[int]):
        self.layers = sorted(layers)
        blocks = _decoder_layers(model)
        self.modules = {l: blocks[l].self_attn for l in self.layers}
        for l, m in self.modules.items():
            if not hasattr(m, "q_proj") or getattr(m, "q_norm", None) is not None:
                raise KavaError(f"layer {l}: {type(m).__name__} has no plain q_proj; R-KV query capture supports "
                                "Qwen2- and Llama-style attention")
        self.index: torch.Tensor | None = None
        self.got: dict[int, torch.Tensor] = {}
        self._handles = []

    def want(self, index: torch.Tensor) -> None:
        """The positions (B, P) whose queries the next forward keeps; clears what it holds."""
        self.index, self.got = index, {}

    def __enter__(self) -> "QueryCapture":
        for l, m in self.modules.items():
            self._handles.append(m.register_forward_pre_hook(functools.partial(self._take, l), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _take(self, layer: int, module, args, kwargs) -> None:
        if self.index is None:
            return
        import sys
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
        idx = self.index.to(hidden.device)
        b, p = idx.shape
        with torch.no_grad():
            h = torch.gather(hidden, 1, idx[..., None].expand(b, p, hidden.shape[-1]))
            hq = module.q_proj.out_features // module.head_dim
            q = module.q_proj(h).view(b, p, hq, module.head_dim).transpose(1, 2)         # (B, Hq, P, D)
            c = torch.gather(cos.expand(b, -1, -1), 1, idx[..., None].expand(b, p, cos.shape[-1]))
            s = torch.gather(sin.expand(b, -1, -1), 1, idx[..., None].expand(b, p, sin.shape[-1]))
            rope = sys.modules[type(module).__module__].apply_rotary_pos_emb
            self.got[layer] = rope(q, q, c, s)[0]


class HiddenCapture:
    """The hidden state every decoder layer outputs (before the final norm) at one position per
    sample of a batch: forward hooks on the layers; `want(index)` with `index` (B,) positions
    along the padded time axis, then `got` (B, layers, hidden) after the forward."""

    def __init__(self, model):
        self.layers = list(_decoder_layers(model))
        self.index: torch.Tensor | None = None
        self._got: list = []
        self._handles = []

    def want(self, index: torch.Tensor) -> None:
        self.index, self._got = index, []

    @property
    def got(self) -> torch.Tensor:
        return torch.stack(self._got, 1)

    def __enter__(self) -> "HiddenCapture":
        self._handles = [m.register_forward_hook(self._take) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _take(self, module, args, output) -> None:
        if self.index is None:
            return
        h = output[0] if isinstance(output, tuple) else output                     # (B, T, hidden)
        idx = self.index.to(h.device)
        self._got.append(h[torch.arange(len(idx), device=h.device), idx].detach())
