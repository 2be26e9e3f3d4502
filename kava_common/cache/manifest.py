"""A cache's identity, its fingerprint and its manifest.

`CacheIdentity` holds every field that decides what a cache contains; its fingerprint names the
cache folder, so other settings give another folder and never a mix. `ShardEntry` is one
shard's record (in its sidecar while stage 1 runs, in the manifest's `shards` at the end).
`build_manifest` assembles manifest.json, written last: a cache is complete exactly when a
manifest with its fingerprint exists. `Manifest` is manifest.json read back as fields
(`KVCache.meta`): what the stages read of a cache, by name rather than by key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from ..geometry import KVGeometry
from .format import MANIFEST, SCHEMA_VERSION


def fingerprint(identity: dict) -> str:
    """A short hash of the fields that decide a cache's contents."""
    blob = json.dumps(identity, sort_keys=True, ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class CacheIdentity:
    """Everything that decides a cache's tensors; equal identities give equal caches."""
    teacher: dict                 # name, revision, weights (a hash of local weight files or the hub commit)
    quantization: dict            # how the teacher ran (bitsandbytes settings or an unquantized dtype)
    tokenizer_sha256: str
    dataset: dict                 # name, split, rows, content hash
    prompt_template: str
    max_length: int
    layers: list[int]             # stored teacher layers
    kv_dtype: str
    format: str                   # safetensors | hdf5
    shard_mb: float
    schema_version: int = SCHEMA_VERSION
    logits_topk: int = 0          # top-K next-token log-probs stored beside the K/V (0: none)
    kv_quant: dict | None = None  # KVQuant.describe() of quantized K/V (None: kv_dtype as is)
    token_logprobs: bool = False  # the log-probability of each actual next token stored too
    rkv_slots: int = 0            # R-KV slots of the reasoning K/V per layer and KV head (0: none)
    rkv_lambda: float = 0.0       # R-KV's weight of importance against redundancy
    rkv_select: str = "rkv"       # how the slots are chosen: rkv, even (evenly spaced, an ablation) or results
    store_hidden: bool = False    # every layer's hidden state at the token before the answer stored

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("logits_topk", "kv_quant", "token_logprobs", "rkv_slots", "store_hidden"):   # caches without
            if not d[key]:                                              # them keep their fingerprint
                del d[key]
        if not self.rkv_slots:
            del d["rkv_lambda"]
        if not self.rkv_slots or self.rkv_select == "rkv":            # the default keeps its fingerprint
            del d["rkv_select"]
        return d

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.to_dict())


@dataclass
class ShardEntry:
    """One shard's record: what it holds, and (once written) its file, size and checksum."""
    index: int
    fingerprint: str = ""
    rows: list[int] = field(default_factory=list)          # first and last data-set row
    bad_samples: list[dict] = field(default_factory=list)  # {"row", "reason"}: left out of the shard
    num_samples: int = 0
    tokens: int = 0
    file: str = ""
    bytes: int = 0
    checksum: str = ""                                     # "ALGORITHM:hex" of the whole file
    first_sample: int | None = None                        # set in the manifest
    quant: dict = field(default_factory=dict)              # --kv-quant: K/V bytes, reconstruction cosines

    @classmethod
    def from_json(cls, text: str) -> "ShardEntry":
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def build_manifest(identity: CacheIdentity, *, teacher: dict, tokenizer: dict, dataset: dict,
                   geometry: KVGeometry, entries: list[ShardEntry], skipped: list[dict],
                   stats: dict, software: dict) -> dict:
    """manifest.json of a finished cache. `teacher` is the model summary with its quantization,
    `entries` every shard in order; sample numbers run on across shards."""
    from ..prompt import SEGMENTS
    shards, first = [], 0
    for e in entries:
        shards.append(dict(asdict(e), first_sample=first))
        first += e.num_samples
    fp = identity.fingerprint
    return {
        "schema_version": identity.schema_version, "fingerprint": fp, "identity": identity.to_dict(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "teacher": teacher, "tokenizer": tokenizer, "dataset": dataset,
        "prompt_template": identity.prompt_template, "segments": list(SEGMENTS),
        "max_length": identity.max_length, "format": identity.format, "shard_mb": identity.shard_mb,
        "num_layers": geometry.num_layers, "layers": list(identity.layers),
        "num_kv_heads": geometry.num_kv_heads, "num_attention_heads": geometry.num_attention_heads,
        "head_dim": geometry.head_dim, "kv_dtype": identity.kv_dtype, "kv_quant": _quant_summary(identity, entries),
        "logits_topk": identity.logits_topk, "token_logprobs": identity.token_logprobs,
        "rkv_slots": identity.rkv_slots, "rkv_lambda": identity.rkv_lambda if identity.rkv_slots else None,
        "rkv_select": identity.rkv_select if identity.rkv_slots else None,
        "store_hidden": identity.store_hidden,
        "logits_layout": ({"topk_ids": "int32 (tokens, K)", "topk_logprobs": "float32 (tokens, K), "
                           "log_softmax of the teacher's logits at position t, for token t+1",
                           **({"token_logprobs": "float32 (tokens,), the teacher's log-probability of "
                               "token t+1 at position t; at a sample's last position, of the EOS token "
                               "(0.0 where the tokenizer has none)"} if identity.token_logprobs else {})}
                          if identity.logits_topk else None),
        "kv_bytes_per_token": geometry.bytes_per_token(identity.kv_dtype, identity.layers),
        "rope": geometry.rope, "keys_post_rope": True,
        "positions": "0..T-1 per sample, no padding stored",
        "num_samples": first, "num_tokens": sum(e.tokens for e in entries),
        "total_bytes": sum(e.bytes for e in entries),
        "skipped_rows": skipped, "bad_samples": [b for e in entries for b in e.bad_samples],
        **stats,
        "shards": shards,
        "software": software,
    }


def _quant_summary(identity: CacheIdentity, entries: list[ShardEntry]) -> dict | None:
    """The quantization scheme with what it gave over all shards: K/V bytes per token (codes
    and groups) and the token-weighted reconstruction cosines of K and V."""
    if not identity.kv_quant:
        return None
    done = [e for e in entries if e.quant]
    tokens = max(sum(e.tokens for e in done), 1)
    return dict(identity.kv_quant, bytes_per_token=round(sum(e.quant["kv_bytes"] for e in done) / tokens, 2),
                **{c: round(sum(e.quant[c] * e.tokens for e in done) / tokens, 6) for c in ("k_cosine", "v_cosine")})


def is_complete(cache_dir: Path, fp: str) -> bool:
    """A readable manifest with this fingerprint means the cache is complete."""
    try:
        return json.loads((Path(cache_dir) / MANIFEST).read_text()).get("fingerprint") == fp
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class DatasetRef:
    """The data set a cache was made from: name, split, row count and a hash of its content."""
    name: str
    split: str
    rows: int
    content_sha256: str


@dataclass(frozen=True)
class TokenizerRef:
    """The teacher's tokenizer: its name, a hash of its whole definition, its BOS and EOS ids
    (None where it has none, or where an older cache did not record them)."""
    name: str
    sha256: str
    vocab_size: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None


@dataclass(frozen=True)
class Manifest:
    """manifest.json as fields. Settings a cache made by an older kava lacks take the value
    that cache implies (no top-K logits, no token_logprobs, unquantized K/V). `raw` is the
    JSON object itself, for the cache's own tools (recompress, info)."""
    fingerprint: str
    schema_version: int
    prompt_template: str
    max_length: int
    format: str
    num_layers: int
    layers: list[int]               # the teacher's stored layers
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: str
    num_samples: int
    num_tokens: int
    total_bytes: int
    teacher: dict                   # the model summary: name, architecture, quantization, vocab_size
    dataset: DatasetRef
    tokenizer: TokenizerRef
    shards: list[dict]
    kv_quant: dict | None = None
    logits_topk: int = 0
    token_logprobs: bool = False
    rkv_slots: int = 0              # R-KV slots per layer and KV head (rkv_k/rkv_v/rkv_index); 0: none
    rkv_lambda: float | None = None
    rkv_select: str | None = None   # rkv | even | results
    store_hidden: bool = False      # `hidden` (n, num_layers, hidden_size): each layer's output before the answer
    bad_samples: list[dict] = field(default_factory=list)   # {"row", "reason"}: left out by stage 1
    skipped_rows: list[dict] = field(default_factory=list)  # data-set rows with nothing to learn from
    truncated_samples: int = 0      # samples max_length cut
    kv_bytes_per_token: int = 0     # stored K/V bytes per token, all stored layers (before --kv-quant)
    rope: dict = field(default_factory=dict)    # the teacher's RoPE settings (keys are stored after RoPE)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, m: dict) -> "Manifest":
        def pick(kind, d: dict):
            return kind(**{f.name: d[f.name] for f in fields(kind) if f.name in d})
        simple = {f.name: m[f.name] for f in fields(cls)
                  if f.name in m and f.name not in ("dataset", "tokenizer", "raw")}
        return cls(**dict(simple, logits_topk=m.get("logits_topk") or 0, rkv_slots=m.get("rkv_slots") or 0,
                          store_hidden=bool(m.get("store_hidden")),
                          token_logprobs=bool(m.get("token_logprobs")), dataset=pick(DatasetRef, m["dataset"]),
                          tokenizer=pick(TokenizerRef, m["tokenizer"]), raw=m))

    @property
    def teacher_vocab_size(self) -> int | None:
        """The teacher's output rows (its embedding may have more rows than its tokenizer has
        tokens); None where the cache does not record them."""
        return self.teacher.get("vocab_size")
