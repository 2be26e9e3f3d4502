"""What a kava cache holds: the tensors of a shard, their layout on disk, names and checksums.

One directory per (teacher, data set, split, extraction settings):

    manifest.json              written last, atomically; see kava_common.cache.manifest
    shard-00000.safetensors    (or .h5) samples packed along time, one tensor per layer
    shard-00000.json           sidecar: the shard's manifest entry, written after the shard;
                               a shard counts as complete when both exist and sizes agree

Tensors in a shard (n samples, N tokens in all; H kv heads, D head_dim):

    k.{layer}, v.{layer}   (N, H, D)  stored dtype; `layer` is the teacher's layer index
    input_ids              (N,)       int64
    char_offsets           (N, 2)     int32, character span of each token in the sample text
    sample_offsets         (n+1,)     int64, sample j holds tokens [off[j], off[j+1])
    rows                   (n,)       int64, row index in the data set
    token_segments         (n, 3, 2)  int32, [start, end) per segment (question, reasoning, answer)
    char_segments          (n, 3, 2)  int32, the same in characters
    truncated              (n,)       uint8, 1 where max_length cut the sample
    text_bytes             (B,)       uint8, UTF-8 texts packed; text_offsets (n+1,) int64
    topk_ids, topk_logprobs (N, K)    int32 / float32, with --logits-topk K only: the teacher's
                                      K most likely next tokens at each position (for token t+1)
    token_logprobs (N,)               float32, with --logits-topk (caches whose identity says
                                      token_logprobs): the teacher's log-probability of the
                                      actual next token, token t+1, at position t; at a sample's
                                      last position, of its EOS token (0.0 without one)

Time-major storage keeps one sample's K/V for one layer contiguous on disk, so a reader maps
only the bytes of the layers and samples it asks for. Keys are stored post-RoPE, as the model
returned them; the manifest records the RoPE settings and that positions run 0..T-1.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..geometry import KVGeometry

SCHEMA_VERSION = 2          # 2: shard checksums are xxh3_128 ("checksum"); 1 had "sha256"
READABLE_SCHEMAS = (1, 2)
CHECKSUM = "xxh3_128"       # ~11 GB/s on one core, sha256 ~1.4 GB/s; not a security hash
MANIFEST = "manifest.json"
FORMATS = {"safetensors": ".safetensors", "hdf5": ".h5"}
META_BYTES_PER_TOKEN = 8 + 8  # input_ids int64 + char_offsets 2 x int32
ALIGN = 4096  # O_DIRECT wants buffer address, file offset and length in multiples of the block size
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}


_STORED_AS_INT16 = (torch.bfloat16,)  # HDF5 has no bfloat16: stored as its bits, viewed back


def shard_name(index: int, fmt: str) -> str:
    return f"shard-{index:05d}{FORMATS[fmt]}"


def sidecar_name(index: int) -> str:
    return f"shard-{index:05d}.json"


def round_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


# --- checksums ----------------------------------------------------------------------------------

def _hasher(algorithm: str):
    if algorithm == "xxh3_128":
        import xxhash
        return xxhash.xxh3_128()
    return hashlib.new(algorithm)


def checksum_bytes(data, algorithm: str = CHECKSUM) -> str:
    """"ALGORITHM:hex" of a bytes-like object (the form a shard entry's `checksum` takes)."""
    h = _hasher(algorithm)
    h.update(data)
    return f"{algorithm}:{h.hexdigest()}"


def checksum_file(path: Path, algorithm: str = CHECKSUM, chunk: int = 1 << 22) -> str:
    h = _hasher(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return f"{algorithm}:{h.hexdigest()}"


def expected_checksum(entry: dict) -> str:
    """A shard entry's checksum as "ALGORITHM:hex"; schema-1 entries hold a bare "sha256"."""
    return entry["checksum"] if "checksum" in entry else f"sha256:{entry['sha256']}"


# --- the samples of a shard ---------------------------------------------------------------------

@dataclass
class CacheSample:
    """One sample as a shard stores it (everything but its K/V)."""
    row: int                          # index in the data set
    text: str
    ids: np.ndarray                   # (T,) int64, after truncation
    offsets: np.ndarray               # (T, 2) int32, character span of each token
    token_segments: list[tuple[int, int]]
    char_segments: tuple[tuple[int, int], ...]
    truncated: bool


def shard_tensors(samples: list[CacheSample]) -> dict[str, torch.Tensor]:
    """A shard's tensors other than K/V (see the table at the top of this module)."""
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


# --- safetensors shards laid out before they are filled -----------------------------------------

class ShardLayout:
    """The bytes of a safetensors shard, planned before its tensors are filled.

    The safetensors format is a little-endian u64 header length, a JSON header giving each
    tensor's dtype, shape and [begin, end) in the data area, then the data area without gaps
    (https://github.com/huggingface/safetensors#format). Knowing every shape before the
    teacher runs, stage 1 lays the whole file out in one flat buffer, copies K/V straight into
    its views, and writes the buffer as it is: no serialisation copy, and the checksum is
    taken from memory. Tensors are ordered by descending element size, then name (as safetensors
    does), so each starts aligned to its element size.
    """

    def __init__(self, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict[str, Any] = {"__metadata__": metadata}
        self.places: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}  # pos, bytes, ...
        pos = 0
        for name, dtype, shape in sorted(specs, key=lambda s: (-s[1].itemsize, s[0])):
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
            self.places[name] = (pos, n, dtype, tuple(shape))
            pos += n
        blob = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
        blob += b" " * ((-8 - len(blob)) % 8)        # data area starts 8-byte aligned
        self.prefix = len(blob).to_bytes(8, "little") + blob
        self.nbytes = len(self.prefix) + pos

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each tensor as a view of `flat` (uint8, at least `nbytes` long)."""
        base = len(self.prefix)
        out = {}
        for name, (pos, n, dtype, shape) in self.places.items():
            out[name] = flat[base + pos: base + pos + n].view(dtype).view(shape)
        return out


def shard_layout(meta: dict[str, torch.Tensor], layers: list[int], geometry: KVGeometry,
                 kv_dtype: torch.dtype, logits_topk: int = 0, token_logprobs: bool = False,
                 rkv_slots: int = 0, hidden_size: int = 0) -> ShardLayout:
    """The file layout of a shard: its metadata tensors, (N, H, D) K and V per stored layer,
    with `logits_topk` K the (N, K) `topk_ids` (int32) and `topk_logprobs` (float32), with
    `token_logprobs` the (N,) float32 log-probabilities of the actual next tokens, and with
    `rkv_slots` M per stored layer the (n, H, M, D) `rkv_k`/`rkv_v`, the (N, H) float32
    `rkv_importance`, and the (n, L, H, M) int32 `rkv_index` (n samples, L stored layers); with
    `hidden_size` the (n, num_layers, hidden_size) `hidden` in the K/V dtype."""
    n = int(meta["sample_offsets"][-1])
    h, d = geometry.num_kv_heads, geometry.head_dim
    specs = [(k, t.dtype, tuple(t.shape)) for k, t in meta.items()]
    specs += [(f"{kind}.{l}", kv_dtype, (n, h, d)) for l in layers for kind in ("k", "v")]
    if logits_topk:
        specs += [("topk_ids", torch.int32, (n, logits_topk)), ("topk_logprobs", torch.float32, (n, logits_topk))]
    if token_logprobs:
        specs.append(("token_logprobs", torch.float32, (n,)))
    if rkv_slots:
        ns = len(meta["rows"])
        specs += [(f"{kind}.{l}", kv_dtype, (ns, h, rkv_slots, d)) for l in layers for kind in ("rkv_k", "rkv_v")]
        specs += [(f"rkv_importance.{l}", torch.float32, (n, h)) for l in layers]
        specs.append(("rkv_index", torch.int32, (ns, len(layers), h, rkv_slots)))
    if hidden_size:
        specs.append(("hidden", kv_dtype, (len(meta["rows"]), geometry.num_layers, hidden_size)))
    return ShardLayout(specs, {"kava_schema": str(SCHEMA_VERSION)})


_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}


def map_safetensors(path: Path):
    """A private memory map of a safetensors file and {name: (dtype, shape, byte offset,
    elements per row)}."""
    import mmap
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        n = int.from_bytes(mm[:8], "little")
        header = json.loads(mm[8:8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    index = {}
    for name, h in header.items():
        if h["dtype"] not in _FROM_ST:
            raise ValueError(f"{path}: tensor {name!r} has dtype {h['dtype']}, which a kava cache never holds")
        shape = list(h["shape"])
        index[name] = (_FROM_ST[h["dtype"]], shape, 8 + n + h["data_offsets"][0],
                       int(np.prod(shape[1:], dtype=np.int64)))
    return mm, index


def shard_problem(f: Path, entry: dict) -> str | None:
    """What is wrong with shard file `f` against its manifest entry (presence, size, checksum;
    the whole file is hashed), or None."""
    if not f.is_file():
        return "missing (the manifest lists it)"
    size = f.stat().st_size
    if size != entry["bytes"]:
        return f"{size} bytes, the manifest says {entry['bytes']}"
    want = expected_checksum(entry)
    algorithm = want.split(":")[0]
    if checksum_file(f, algorithm) != want:
        return f"{algorithm} checksum does not match the manifest"
    return None
