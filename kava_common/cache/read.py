"""Reading a cache: `open_cache(path)` gives samples as torch tensors, files opened lazily."""

from __future__ import annotations

import bisect
import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import KavaError
from .format import MANIFEST, READABLE_SCHEMAS
from .manifest import Manifest
from .shard import Shard, check_shard
from .verify import manifest_problems, shape_problems
from .quant import PACKED, KVQuant, dequantize_k, dequantize_v, read_packed


class KVCache:
    """Read a cache directory written by stage 1.

    `len(cache)` samples; `cache.manifest` the manifest dict; `cache[i]` a dict with
    `input_ids` (LongTensor [T]) and `k`, `v` ([len(layers), kv_heads, T, head_dim], stored
    dtype, or float16 dequantized from a --kv-quant cache; with `packed`, a quantized cache gives
    `kq` instead: its codes and groups as stored, see `kv`), plus `row`, `text`, `char_offsets` [T, 2], `token_segments` and `char_segments`
    {name: (start, end)}, `truncated`. Files open on first use in each process, so DataLoader workers can share it.
    """

    def __init__(self, path: str | os.PathLike, layers: list[int] | None = None, verify: bool = False,
                 kv_dtype: torch.dtype | None = None, packed: bool = False):
        self.path = Path(path)
        mf = self.path / MANIFEST
        if not mf.is_file():
            raise FileNotFoundError(f"{self.path}: no {MANIFEST}; not a kava cache, or stage 1 has "
                                    "not finished (re-run the same stage-1 command to complete it)")
        self.manifest: dict[str, Any] = json.loads(mf.read_text())
        if self.manifest.get("schema_version") not in READABLE_SCHEMAS:
            raise ValueError(f"{mf}: schema version {self.manifest.get('schema_version')}, "
                             f"this kava reads {', '.join(map(str, READABLE_SCHEMAS))}")
        stored = self.manifest["layers"]
        self.layers = list(stored) if layers is None else list(layers)
        missing = [l for l in self.layers if l not in stored]
        if missing:
            raise ValueError(f"{self.path}: layers {missing} are not stored; it holds {stored}")
        self.kv_quant = KVQuant.from_manifest(self.manifest.get("kv_quant"))
        self.kv_dtype = kv_dtype or torch.float16
        self.packed = packed and self.kv_quant is not None
        fmt = self.manifest["format"]
        self._shards = [Shard(self.path / s["file"], fmt, s if verify else None)
                        for s in self.manifest["shards"]]
        self._starts = [s["first_sample"] for s in self.manifest["shards"]]

    @functools.cached_property
    def meta(self) -> Manifest:
        """The manifest as fields (`manifest` is the JSON object)."""
        return Manifest.from_dict(self.manifest)

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def __len__(self) -> int:
        return self.manifest["num_samples"]

    def verify(self) -> int:
        """Check the manifest's counts and geometry, and every shard against the manifest's
        size, checksum and tensor shapes, now (KavaError naming the first problem); returns
        the bytes checked."""
        problems = manifest_problems(self.path / MANIFEST, self.manifest)
        for sh, entry in zip(self._shards, self.manifest["shards"]):
            check_shard(sh.path, entry)
            problems = problems or shape_problems(sh.path, self.manifest, entry)
        if problems:
            raise KavaError(problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
        return sum(s["bytes"] for s in self.manifest["shards"])

    def locate(self, i: int) -> tuple[Shard, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for cache of {len(self)} samples")
        i %= len(self)
        s = bisect.bisect_right(self._starts, i) - 1
        return self._shards[s], i - self._starts[s]

    def rows(self) -> np.ndarray:
        """The data-set row of every sample, read from the shards' small metadata."""
        return np.concatenate([sh.small("rows") for sh in self._shards] or [np.zeros(0, np.int64)])

    def shards(self) -> list[tuple["Shard", dict]]:
        """Every shard's reader (`read(name)`, `names()`, `small(name)`) beside its manifest entry,
        in order: for tools that rewrite a cache shard by shard (recompress)."""
        return list(zip(self._shards, self.manifest["shards"]))

    def token_segments(self) -> np.ndarray:
        """(n, 3, 2) [start, end) token spans of question, reasoning and answer, every sample."""
        return np.concatenate([sh.small("token_segments") for sh in self._shards]
                              or [np.zeros((0, 3, 2), np.int32)])

    def tokens(self, i: int) -> torch.Tensor:
        """Token ids of sample i, without reading any K/V."""
        shard, j = self.locate(i)
        off = shard.small("sample_offsets")
        return shard.read("input_ids", int(off[j]), int(off[j + 1]))

    def kv(self, i: int) -> dict:
        """Only what a training step needs of sample i: `input_ids`, `k` and `v`, and in a cache
        made with --logits-topk `topk_ids` (LongTensor [T, K]) and `topk_logprobs` ([T, K]
        float32, for the token after each position), and in one whose manifest says
        token_logprobs, `token_logprobs` ([T] float32: the log-probability of token t+1 at
        position t, of EOS at the last). A quantized cache opened `packed` gives no
        `k`, `v` but `kq`: {name: (L, ...)} for the names of quant.PACKED, each layer's tensors as
        `quant.read_packed` returns them, for `quant.dequantize_batch` on the device."""
        shard, j = self.locate(i)
        off = shard.small("sample_offsets")
        a, b = int(off[j]), int(off[j + 1])
        out = {"input_ids": shard.read("input_ids", a, b).long()}
        if self.kv_quant is None:
            out["k"] = torch.stack([shard.read(f"k.{l}", a, b).transpose(0, 1) for l in self.layers])  # (L, H, T, D)
            out["v"] = torch.stack([shard.read(f"v.{l}", a, b).transpose(0, 1) for l in self.layers])
        else:
            g = shard.small("k_group_offsets")
            per_layer = [read_packed(shard.read, l, (a, b), (int(g[j]), int(g[j + 1])), self.kv_quant)
                         for l in self.layers]
            if self.packed:
                out["kq"] = {name: torch.stack([t[name] for t in per_layer]) for name in PACKED
                             if name in per_layer[0]}
            else:              # dequantized here, into kv_dtype (float16 unless the caller asked)
                q, dt = self.kv_quant, self.kv_dtype
                out["k"] = torch.stack([dequantize_k(t["k_codes"], t["k_scale"], t["k_low"], q, dt).transpose(0, 1)
                                        for t in per_layer])
                out["v"] = torch.stack([dequantize_v(t["v_codes"], t["v_scale"], t.get("v_low"), q, dt).transpose(0, 1)
                                        for t in per_layer])
        if self.manifest.get("logits_topk"):
            out["topk_ids"] = shard.read("topk_ids", a, b).long()                              # (T, K)
            out["topk_logprobs"] = shard.read("topk_logprobs", a, b)                           # (T, K)
        if self.manifest.get("token_logprobs"):
            out["token_logprobs"] = shard.read("token_logprobs", a, b)                         # (T,)
        return out

    def rkv(self, i: int) -> dict:
        """Sample i's R-KV slots (a cache made with --rkv-slots M), for the layers this reader
        opened: `k`, `v` (L, H, M, D) in the stored dtype, `index` (L, H, M) long, the position in
        the sample of each slot's token (-1: an empty slot, where the chain of thought had fewer
        than M tokens; its K/V are zeros), `mask` (L, H, M) bool, the slots that hold a token, and
        `importance` (L, H, T) float32, R-KV's importance of each token (0 outside the reasoning)."""
        if not self.manifest.get("rkv_slots"):
            raise KavaError(f"{self.path}: made without --rkv-slots; it holds no R-KV slots")
        shard, j = self.locate(i)
        off = shard.small("sample_offsets")
        a, b = int(off[j]), int(off[j + 1])
        where = [self.manifest["layers"].index(l) for l in self.layers]
        index = shard.read("rkv_index", j, j + 1)[0][where].long()                               # (L, H, M)
        return {"k": torch.stack([shard.read(f"rkv_k.{l}", j, j + 1)[0] for l in self.layers]),
                "v": torch.stack([shard.read(f"rkv_v.{l}", j, j + 1)[0] for l in self.layers]),
                "index": index, "mask": index >= 0,
                "importance": torch.stack([shard.read(f"rkv_importance.{l}", a, b).t() for l in self.layers])}

    def hidden(self, i: int) -> torch.Tensor:
        """Sample i's hidden state of every teacher layer (its output, before the final norm) at
        the token before the answer: (num_layers, hidden_size), in a cache made with --store-hidden."""
        if not self.manifest.get("store_hidden"):
            raise KavaError(f"{self.path}: made without --store-hidden; it holds no hidden states")
        shard, j = self.locate(i)
        return shard.read("hidden", j, j + 1)[0]

    def text(self, i: int) -> dict:
        """Sample i's text, segments and row, without reading any K/V: `row`, `text`,
        `token_segments` and `char_segments` ({segment: (start, end)}), `truncated`."""
        shard, j = self.locate(i)
        toff = shard.small("text_offsets")
        names = self.manifest["segments"]
        return {
            "row": int(shard.small("rows")[j]),
            "text": bytes(shard.small("text_bytes")[toff[j]:toff[j + 1]]).decode("utf-8"),
            "token_segments": {n: (int(s), int(e)) for n, (s, e) in zip(names, shard.small("token_segments")[j])},
            "char_segments": {n: (int(s), int(e)) for n, (s, e) in zip(names, shard.small("char_segments")[j])},
            "truncated": bool(shard.small("truncated")[j]),
        }

    def __getitem__(self, i: int) -> dict:
        shard, j = self.locate(i)
        off = shard.small("sample_offsets")
        a, b = int(off[j]), int(off[j + 1])
        return {**self.kv(i), **self.text(i), "char_offsets": shard.read("char_offsets", a, b)}


def open_cache(path: str | os.PathLike, layers: list[int] | None = None, verify: bool = False,
               kv_dtype: torch.dtype | None = None, packed: bool = False) -> KVCache:
    """Open a finished cache directory; `layers` selects a subset of the stored teacher layers.
    With `verify`, each shard is checked against the manifest's size and checksum when a
    process first reads from it (stage 2 opens its caches this way). A cache with quantized
    K/V (stage 1 --kv-quant) reads back dequantized into `kv_dtype` (default float16), or with
    `packed` as stored, to be dequantized where the step runs."""
    return KVCache(path, layers, verify, kv_dtype, packed)

