"""Stage 1: run each teacher once over a data set and write its per-layer K/V to a cache.

Flow per teacher: config + tokenizer (cheap) -> samples through the shared prompt template ->
fingerprint -> cache folder -> size estimate and disk check -> teacher weights -> for each
shard not yet on disk: length-sorted batches through the model with the cache on, padding
stripped per sample, handed to a background writer -> manifest.json last.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import re
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from kava_common import KavaError, software_versions
from kava_common import cache as kcache
from kava_common.data import Rows, load_rows, tokenizer_identity
from kava_common.device import resolve_device
from kava_common.geometry import DTYPES, KVGeometry
from kava_common.prompt import SEGMENTS, TEMPLATE_ID, encode_with_offsets, format_sample, token_spans_batch

from . import teacher as T
from .config import ExtractConfig
from .writer import BackgroundWriter

META_BYTES_PER_TOKEN = 8 + 8  # input_ids int64 + char_offsets 2 x int32


@dataclass
class Sample:
    row: int                          # index in the data set
    text: str
    ids: np.ndarray                   # (T,) int64, after truncation
    offsets: np.ndarray               # (T, 2) int32, character span of each token
    token_segments: list[tuple[int, int]]
    char_segments: tuple[tuple[int, int], ...]
    truncated: bool


def prepare_samples(rows: Rows, tok, max_length: int) -> tuple[list[Sample], list[dict], dict]:
    """Format and tokenize every row; returns samples, skipped rows (with reasons), counts."""
    samples, skipped = [], []
    texts, kept = [], []
    no_final = 0
    for i, (q, a) in enumerate(zip(rows.questions, rows.answers)):
        if not q.strip():
            skipped.append({"row": i, "reason": "empty question"})
            continue
        f = format_sample(q, a)
        no_final += not f.has_final
        texts.append(f.text)
        kept.append((i, f))
    encoded = [(ids[:max_length], offs[:max_length], len(ids) > max_length)
               for ids, offs in encode_with_offsets(tok, texts)]
    spans = token_spans_batch([f.char_spans for _, f in kept], [offs for _, offs, _ in encoded]).tolist()
    for (i, f), (ids, offs, cut), tspans in zip(kept, encoded, spans):
        samples.append(Sample(i, f.text, ids, offs, [tuple(t) for t in tspans], f.char_spans, cut))
    stats = {"rows_without_final_answer": no_final,
             "truncated_samples": sum(s.truncated for s in samples)}
    return samples, skipped, stats


def plan_shards(samples: list[Sample], bytes_per_token: int, shard_bytes: float) -> list[list[int]]:
    """Split samples, in order, into shards of about `shard_bytes`; deterministic, so a resumed
    run finds the same shard boundaries."""
    shards, cur, size = [], [], 0
    for j, s in enumerate(samples):
        cur.append(j)
        size += len(s.ids) * bytes_per_token
        if size >= shard_bytes:
            shards.append(cur)
            cur, size = [], 0
    if cur:
        shards.append(cur)
    return shards


def length_sorted_batches(samples: list[Sample], members: list[int], batch_size: int) -> list[list[int]]:
    """Batches of shard-local positions, longest first, so a batch pads little."""
    order = sorted(range(len(members)), key=lambda p: -len(samples[members[p]].ids))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(seqs: list[list[int]], pad_id: int, padding_side: str = "right"):
    """Pad token lists into (B, T) ids, mask and position ids; real tokens sit at positions
    0..len-1 whatever the padding side (post-RoPE keys depend on position)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)     # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)           # (B, T)
    for b, s in enumerate(seqs):
        sl = slice(0, len(s)) if padding_side == "right" else slice(width - len(s), width)
        ids[b, sl] = torch.as_tensor(s, dtype=torch.long)
        mask[b, sl] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)                            # (B, T)
    return ids, mask, pos


def teacher_forward(model, ids, mask, pos, cache=None):
    """The teacher's forward with the K/V cache on; logits only for the last position.
    `cache` None uses the model's own DynamicCache; stage 1 passes a `KVCapture.cache`."""
    dev = model.device
    return model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                 use_cache=True, cache=cache, logits_to_keep=1)


class KVCapture:
    """Takes each layer's K/V inside the teacher's forward, as attention receives them.

    `cache(spans, batch, width)` gives a transformers `Cache` for one forward. When layer l
    stores its fresh keys and values (B, H, T, D), the real tokens of each sample are copied
    into the shard buffers right there and the tensors go back to attention unchanged: no
    layer keeps its K/V, so the padded batch's K/V of all layers are never held at once and
    the stock DynamicCache's concatenation (one more copy of everything) is skipped. Every
    layer's shapes are checked against the config's geometry before anything is copied.
    """

    def __init__(self, name: str, geometry: KVGeometry, gather: bool | None = None):
        """`gather`: first collect a layer's real tokens into one contiguous tensor on the
        model's device, then copy each sample's rows out of it (plain memcpys); None means on
        for a GPU, where copying straight from the padded, strided K/V costs a kernel per
        sample and layer besides the copy. On the CPU the direct copies are as fast."""
        self.name, self.geometry, self.gather = name, geometry, gather
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
        if layer not in self.dests:
            return
        gather = self.gather if self.gather is not None else keys.device.type != "cpu"
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
            elif t.device.type == "cpu":
                # one call for the batch: a third less time than a Python loop of copy_ here
                per_row = t.transpose(1, 2).unbind(0)        # (T, H, D) views
                torch._foreach_copy_(dsts, [per_row[b][s:s + n] for b, s, n in self.spans])
            else:
                t = t.to(dsts[0].dtype)                      # cast once on the GPU, then copy out
                for dst, (b, s, n) in zip(dsts, self.spans):
                    dst.copy_(t[b, :, s:s + n].transpose(0, 1), non_blocking=True)

    def check_complete(self) -> None:
        """After a forward: every layer of the config passed through the cache."""
        if self.seen != self.geometry.num_layers:
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


class BufferPool:
    """Reusable flat shard buffers, so the forward loop does not page-fault fresh memory for
    every shard. Each buffer holds a whole shard file as `ShardLayout` plans it; K/V are
    captured straight into its views and the writer sends its bytes to disk as they are.
    ALIGN-aligned (for O_DIRECT) and pinned on a GPU run."""

    def __init__(self, capacity: int, pin: bool):
        self.capacity, self.pin = kcache.round_up(capacity), pin
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self) -> torch.Tensor:
        with self._lock:
            flat = self._free.pop() if self._free else None
        return flat if flat is not None else kcache.aligned_bytes(self.capacity, self.pin)

    def give_back(self, flat: torch.Tensor) -> None:
        with self._lock:
            self._free.append(flat)


def shard_meta(samples: list[Sample]) -> dict[str, torch.Tensor]:
    """A shard's tensors other than K/V (see kava_common.cache for their meaning)."""
    texts = [s.text.encode("utf-8") for s in samples]
    return {
        "input_ids": torch.from_numpy(np.concatenate([s.ids for s in samples] or [np.zeros(0, np.int64)])),
        "char_offsets": torch.from_numpy(np.concatenate([s.offsets for s in samples] or [np.zeros((0, 2), np.int32)])),
        "sample_offsets": torch.tensor([0] + [len(s.ids) for s in samples], dtype=torch.long).cumsum(0),
        "rows": torch.tensor([s.row for s in samples], dtype=torch.long),
        "token_segments": torch.tensor([s.token_segments for s in samples], dtype=torch.int32).reshape(-1, 3, 2),
        "char_segments": torch.tensor([s.char_segments for s in samples], dtype=torch.int32).reshape(-1, 3, 2),
        "truncated": torch.tensor([s.truncated for s in samples], dtype=torch.uint8),
        "text_bytes": torch.from_numpy(np.frombuffer(b"".join(texts), dtype=np.uint8).copy()),
        "text_offsets": torch.tensor([0] + [len(t) for t in texts], dtype=torch.long).cumsum(0),
    }


def shard_layout(meta: dict[str, torch.Tensor], layers: list[int], geometry: KVGeometry,
                 kv_dtype: torch.dtype) -> kcache.ShardLayout:
    """The file layout of a shard: its metadata tensors and (N, H, D) K and V per stored layer."""
    n = int(meta["sample_offsets"][-1])
    kv = (n, geometry.num_kv_heads, geometry.head_dim)
    specs = [(k, t.dtype, tuple(t.shape)) for k, t in meta.items()]
    specs += [(f"{kind}.{l}", kv_dtype, kv) for l in layers for kind in ("k", "v")]
    return kcache.ShardLayout(specs, {"kava_schema": str(kcache.SCHEMA_VERSION)})


def suspect_layers(bufs: dict) -> list:
    """Layers whose K or V buffer may hold NaN or Inf. A buffer's minimum and maximum are
    finite exactly when every element is (NaN propagates through both), and one aminmax pass
    costs about 0.1 s per GB in any float dtype (a float32 sum of a float16 buffer, the first
    screen, took 1 s per GB on the CPU)."""
    def finite(t):
        return t.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())
    return [l for l, (k, v) in bufs.items() if not (finite(k) and finite(v))]


def nonfinite_samples(bufs: dict, offsets: torch.Tensor) -> torch.Tensor:
    """(n,) flags of samples with NaN or Inf anywhere in the K/V of `bufs`, token by token.
    Stage 1 passes only the layers `suspect_layers` flagged."""
    bad_tok = torch.zeros(int(offsets[-1]), dtype=torch.bool)
    for kbuf, vbuf in bufs.values():
        bad_tok |= ~torch.isfinite(kbuf).flatten(1).all(1)
        bad_tok |= ~torch.isfinite(vbuf).flatten(1).all(1)
    cs = torch.cat([torch.zeros(1, dtype=torch.long), bad_tok.long().cumsum(0)])
    return (cs[offsets[1:]] - cs[offsets[:-1]]) > 0


def shard_item(samples: list[Sample], meta: dict, layout, flat, views: dict, bufs: dict) -> dict:
    """Main thread, after a shard's last forward: screen for NaN/Inf and finish the shard's
    tensors, so the writer thread only hashes and writes bytes.

    The writer must run no torch op: with libgomp, a parallel op on a second thread starts a
    second OpenMP team, and once there are more OpenMP threads than cores every thread of the
    forward's team stops spin-waiting and sleeps between parallel regions (measured here,
    2 cores, tiny teacher: one core idle for ~3.5 s of a ~11 s extraction, +15-30% wall)."""
    offsets = meta["sample_offsets"]
    suspect = suspect_layers(bufs)
    bad = nonfinite_samples({l: bufs[l] for l in suspect}, offsets).tolist() if suspect \
        else [False] * len(samples)
    item = {"rows": [samples[0].row, samples[-1].row],
            "bad_samples": [{"row": samples[j].row, "reason": "non-finite K/V (NaN or Inf)"}
                            for j in range(len(samples)) if bad[j]]}
    if not any(bad):
        for name, t in meta.items():
            views[name].copy_(t)
        item.update(num_samples=len(samples), tokens=int(offsets[-1]), layout=layout, flat=flat,
                    tensors=views)
    else:        # rebuilt without the bad samples; rare, so plain serialisation is fine
        keep = [j for j in range(len(samples)) if not bad[j]]
        index = torch.cat([torch.arange(int(offsets[j]), int(offsets[j + 1])) for j in keep]) \
            if keep else torch.zeros(0, dtype=torch.long)
        tensors = shard_meta([samples[j] for j in keep])
        for l, (k, v) in bufs.items():
            tensors[f"k.{l}"], tensors[f"v.{l}"] = k.index_select(0, index), v.index_select(0, index)
        item.update(num_samples=len(keep), tokens=int(tensors["sample_offsets"][-1]), layout=None,
                    tensors=tensors)
    return item


@contextlib.contextmanager
def gc_frozen():
    """Set everything alive now aside from Python's garbage collector until the block ends.

    With a model, its tokenizer and transformers loaded there are ~350k tracked objects (tiny
    teacher), and a full collection walks them all: 0.07-0.12 s on this project's test
    machine, triggered now and then by the many small objects that tokenizing and the
    forward loop allocate. Frozen objects are skipped; new ones are collected as usual. A
    caller that froze objects itself is left alone."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _Counter:
    """Bytes written, and the CPU seconds the writer thread spent (what it takes from the
    teacher's forward when cores are few)."""

    def __init__(self):
        self.bytes = 0
        self.cpu = 0.0
        self.lock = threading.Lock()

    def add(self, n):
        with self.lock:
            self.bytes += n


def _timed_write(item: dict, counter: _Counter) -> None:
    t = time.thread_time()
    try:
        _write_shard_item(item, counter)
    finally:
        counter.cpu += time.thread_time() - t


def _write_shard_item(item: dict, counter: _Counter) -> None:
    """Writer thread: write the shard (its laid-out bytes, or serialised) and its sidecar,
    then hand the buffer back."""
    entry = {"index": item["index"], "fingerprint": item["fingerprint"], "rows": item["rows"],
             "bad_samples": item["bad_samples"], "num_samples": item["num_samples"],
             "tokens": item["tokens"]}
    if item["layout"] is not None and item["format"] == "safetensors":
        entry = kcache.write_laid_out_shard(item["dir"], item["index"], item["layout"],
                                            item["flat"], entry, item["direct_io"])
    else:
        entry = kcache.write_shard(item["dir"], item["index"], item["format"], item["tensors"], entry)
    counter.add(entry["bytes"])
    item["release"]()


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9.]+", "-", Path(name).name if Path(name).exists() else name).strip("-")
    return s[-40:] or "teacher"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def extract_teacher(cfg: ExtractConfig, name: str, rows: Rows, model=None, tok=None,
                    log=print) -> Path:
    """Write (or complete) the cache of one teacher; returns the cache folder.

    `model`/`tok` may be passed in already loaded (tests, benchmarks); otherwise they are
    loaded here as `cfg` says and freed at the end.
    """
    from transformers import AutoConfig
    device = resolve_device(cfg.device) if model is None else model.device
    try:
        config = model.config if model is not None else AutoConfig.from_pretrained(name, revision=cfg.revision)
    except OSError as e:
        raise KavaError(f"teacher {name!r}: no model config found (a local folder or a hub id "
                        f"reachable from here is needed): {e}") from e
    geometry = KVGeometry.from_config(config)
    layers = list(range(geometry.num_layers)) if cfg.layers is None else list(cfg.layers)
    bad_layers = [l for l in layers if not 0 <= l < geometry.num_layers]
    if bad_layers:
        raise ValueError(f"--layers {bad_layers}: teacher {name!r} has layers 0..{geometry.num_layers - 1}")
    tok = tok if tok is not None else T.load_tokenizer(name, cfg.revision)
    with gc_frozen():
        samples, skipped, stats = prepare_samples(rows, tok, cfg.max_length)
    if not samples:
        raise ValueError(f"data set {rows.name!r} split {rows.split!r}: no usable rows "
                         f"({len(skipped)} skipped)")
    if model is not None:
        quant = _describe_loaded(model)
    else:
        quant = T.quantization_settings(cfg.quantize, cfg.quant_type, cfg.double_quant, device, cfg.dtype)
    teacher_info = dict(T.model_summary(name, config), revision=cfg.revision,
                        weights=T.weights_identity(name, config))
    tok_id, data_id = tokenizer_identity(tok), rows.identity()    # each hashes everything once
    identity = {"schema_version": kcache.SCHEMA_VERSION, "teacher": {
        k: teacher_info[k] for k in ("name", "revision", "weights")}, "quantization": dict(quant),
        "tokenizer_sha256": tok_id["sha256"], "dataset": data_id,
        "prompt_template": TEMPLATE_ID, "max_length": cfg.max_length, "layers": layers,
        "kv_dtype": cfg.kv_dtype, "format": cfg.format, "shard_mb": cfg.shard_mb}
    fp = kcache.fingerprint(identity)
    cache_dir = Path(cfg.out) / f"{_slug(name)}-{rows.split}-{fp}"
    if _finished(cache_dir, fp):
        log(f"[{name}] cache complete, nothing to do: {cache_dir}")
        return cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    kcache.atomic_write_text(cache_dir / "identity.json", json.dumps(identity, indent=1))
    kcache.remove_partial_files(cache_dir)

    kv_bpt = geometry.bytes_per_token(cfg.kv_dtype, layers)
    plan = plan_shards(samples, kv_bpt, cfg.shard_mb * 1e6)
    done = kcache.completed_shards(cache_dir)
    mine = [i for i in range(len(plan)) if i % cfg.num_shards == cfg.shard_index]
    todo = [i for i in mine if i not in done]
    est = lambda idx: sum(len(samples[j].ids) * (kv_bpt + META_BYTES_PER_TOKEN) + len(samples[j].text.encode())
                          for i in idx for j in plan[i])
    total_est, left_est = est(range(len(plan))), est(todo)
    free = shutil.disk_usage(cache_dir).free
    n_tokens = sum(len(s.ids) for s in samples)
    log(f"[{name}] {len(samples)} samples, {n_tokens} tokens, {geometry.num_layers} layers "
        f"({len(layers)} kept) x {geometry.num_kv_heads} KV heads x head_dim {geometry.head_dim}, "
        f"{kv_bpt} B/token as {cfg.kv_dtype}: estimated cache {_gb(total_est)}, still to write "
        f"{_gb(left_est)}, free {_gb(free)}; {len(done)}/{len(plan)} shards already done"
        + (f"; this process takes {len(mine)} (part {cfg.shard_index} of {cfg.num_shards})"
           if cfg.num_shards > 1 else ""))
    if cfg.disk_check and left_est > free:
        raise KavaError(f"{cache_dir}: the cache needs about {_gb(left_est)} more but only {_gb(free)} "
                      "is free; free space, keep fewer --layers, use a smaller --kv-dtype, or pass "
                      "--no-disk-check to try anyway")

    if todo:
        own_model = model is None
        if own_model:
            log(f"[{name}] loading teacher ({quant['method']}"
                f"{' ' + quant.get('quant_type', '') if quant['method'] != 'none' else ''}) on {device}")
            model = T.load_teacher(name, quant, device, cfg.revision, cfg.cpu_4bit_kernel)
        try:
            with gc_frozen():   # the loop's collections skip the model and the samples
                written = _run(cfg, name, model, tok, geometry, layers, samples, plan, mine, todo, cache_dir, fp)
            log(f"[{name}] wrote {_gb(written.bytes)} this run; the writer thread used "
                f"{written.cpu:.2f} s of CPU")
        finally:
            if own_model:
                del model
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    entries = kcache.completed_shards(cache_dir)
    missing = [i for i in range(len(plan)) if i not in entries]
    lost = [i for i in missing if i in mine]
    if lost:
        raise KavaError(f"{cache_dir}: shards {lost} are missing after extraction")
    if missing:          # other processes' parts: whoever completes the last one writes the manifest
        log(f"[{name}] part {cfg.shard_index}/{cfg.num_shards} done; {len(missing)} shards of other "
            f"processes pending; the last process to finish writes the manifest -> {cache_dir}")
        return cache_dir
    shards, first = [], 0
    for i in range(len(plan)):
        e = dict(entries[i], first_sample=first)
        first += e["num_samples"]
        shards.append(e)
    manifest = {
        "schema_version": kcache.SCHEMA_VERSION, "fingerprint": fp,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "teacher": dict(teacher_info, quantization=quant),
        "tokenizer": tok_id,
        "dataset": dict(data_id, seed=cfg.seed if rows.name.startswith("synthetic") else None),
        "prompt_template": TEMPLATE_ID, "segments": list(SEGMENTS), "max_length": cfg.max_length,
        "format": cfg.format,
        "num_layers": geometry.num_layers, "layers": layers, "num_kv_heads": geometry.num_kv_heads,
        "num_attention_heads": geometry.num_attention_heads, "head_dim": geometry.head_dim,
        "kv_dtype": cfg.kv_dtype, "kv_bytes_per_token": kv_bpt, "rope": geometry.rope,
        "keys_post_rope": True, "positions": "0..T-1 per sample, no padding stored",
        "num_samples": first, "num_tokens": sum(s["tokens"] for s in shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "skipped_rows": skipped, "bad_samples": [b for s in shards for b in s["bad_samples"]],
        **stats,
        "shards": shards,
        "software": software_versions(),
    }
    kcache.write_manifest(cache_dir, manifest)
    nbad = len(manifest["bad_samples"])
    log(f"[{name}] done: {first} samples, {manifest['num_tokens']} tokens, "
        f"{_gb(manifest['total_bytes'])} in {len(shards)} shards"
        f"{f', {nbad} bad samples recorded in the manifest' if nbad else ''} -> {cache_dir}")
    return cache_dir


def _finished(cache_dir: Path, fp: str) -> bool:
    """A readable manifest with this fingerprint means the cache is complete."""
    try:
        return json.loads((cache_dir / kcache.MANIFEST).read_text()).get("fingerprint") == fp
    except (OSError, ValueError):
        return False


def _describe_loaded(model) -> dict:
    """Quantization settings of a model loaded by the caller."""
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and getattr(qc, "load_in_4bit", False):
        return {"method": "bitsandbytes", "bits": 4, "quant_type": qc.bnb_4bit_quant_type,
                "double_quant": qc.bnb_4bit_use_double_quant,
                "compute_dtype": str(qc.bnb_4bit_compute_dtype).replace("torch.", "")}
    return {"method": "none", "dtype": str(model.dtype).replace("torch.", "")}


def _run(cfg, name, model, tok, geometry, layers, samples, plan, mine, todo, cache_dir, fp):
    from tqdm.auto import tqdm
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    kv_dtype = DTYPES[cfg.kv_dtype]
    counter = _Counter()
    writer = BackgroundWriter(lambda item: _timed_write(item, counter), cfg.writer_queue)
    total = sum(len(plan[i]) for i in mine)         # this process's part of the plan
    bar = tqdm(total=total, initial=total - sum(len(plan[i]) for i in todo), unit="sample",
               desc=f"stage1 {_slug(name)}", disable=not cfg.progress, dynamic_ncols=True,
               ascii=True)
    grab = KVCapture(name, geometry)
    pin = torch.device(model.device).type == "cuda"
    metas = {i: shard_meta([samples[j] for j in plan[i]]) for i in todo}
    layouts = {i: shard_layout(metas[i], layers, geometry, kv_dtype) for i in todo}
    pool = BufferPool(max(l.nbytes for l in layouts.values()), pin)
    t0, tokens = time.perf_counter(), 0
    try:
        for index in todo:
            members = plan[index]
            lens = [len(samples[j].ids) for j in members]
            flat = pool.take()
            views = layouts[index].views(flat)
            bufs = {l: (views[f"k.{l}"], views[f"v.{l}"]) for l in layers}
            # each sample's (n, H, D) rows in the shard, samples in data-set order
            per_sample = {l: (k.split(lens), v.split(lens)) for l, (k, v) in bufs.items()}
            with torch.inference_mode():
                for batch in length_sorted_batches(samples, members, cfg.batch_size):
                    ids, mask, pos = collate([samples[members[p]].ids for p in batch], pad_id,
                                             cfg.padding_side)
                    starts = sample_spans([lens[p] for p in batch], ids.shape[1], cfg.padding_side)
                    dests = {l: ([ks[p] for p in batch], [vs[p] for p in batch])
                             for l, (ks, vs) in per_sample.items()}
                    teacher_forward(model, ids, mask, pos, grab.cache(
                        dests, [(b, s, lens[p]) for b, (p, s) in enumerate(zip(batch, starts))],
                        *ids.shape))
                    grab.check_complete()
                    tokens += int(mask.sum())
                    bar.update(len(batch))
                    rate = tokens / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"{rate:.0f} tok/s, {counter.bytes / 1e9:.2f} GB written")
            if pin:
                torch.cuda.synchronize(model.device)    # buffers filled before the writer reads
            item = shard_item([samples[j] for j in members], metas.pop(index), layouts[index],
                              flat, views, bufs)
            writer.submit(dict(item, dir=cache_dir, index=index, format=cfg.format, fingerprint=fp,
                               direct_io=cfg.direct_io, release=lambda flat=flat: pool.give_back(flat)))
    finally:
        try:
            writer.close()  # shards already computed are written even on Ctrl-C
        finally:
            bar.close()
    return counter


def main(cfg: ExtractConfig) -> list[Path]:
    """Extract one cache per teacher; returns their folders."""
    rows = load_rows(cfg.dataset, cfg.split, cfg.max_samples, seed=cfg.seed)
    return [extract_teacher(cfg, name, rows) for name in cfg.teachers]
