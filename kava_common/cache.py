"""The K/V cache on disk: the contract between stage 1 (writer) and stage 2 (reader).

One directory per (teacher, data set, split, extraction settings):

    manifest.json              written last, atomically; see `build_manifest`
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

Time-major storage keeps one sample's K/V for one layer contiguous on disk, so a reader maps
only the bytes of the layers and samples it asks for. Keys are stored post-RoPE, as the model
returned them; the manifest records the RoPE settings and that positions run 0..T-1.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCHEMA_VERSION = 2          # 2: shard checksums are xxh3_128 ("checksum"); 1 had "sha256"
READABLE_SCHEMAS = (1, 2)
CHECKSUM = "xxh3_128"       # ~11 GB/s on one core here, sha256 ~1.4 GB/s; not a security hash
MANIFEST = "manifest.json"
FORMATS = {"safetensors": ".safetensors", "hdf5": ".h5"}
_STORED_AS_INT16 = (torch.bfloat16,)  # HDF5 has no bfloat16: stored as its bits, viewed back


# --- small helpers ------------------------------------------------------------------------------

def atomic_write_text(path: Path, text: str, sync: bool = False) -> None:
    """Write `text` to `path` through a temporary file and a rename (fsync'd when `sync`)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(text)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


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


def fingerprint(identity: dict) -> str:
    """A short hash of the fields that decide a cache's contents."""
    blob = json.dumps(identity, sort_keys=True, ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def shard_name(index: int, fmt: str) -> str:
    return f"shard-{index:05d}{FORMATS[fmt]}"


# --- writing ------------------------------------------------------------------------------------

def write_shard(cache_dir: Path, index: int, fmt: str, tensors: dict[str, torch.Tensor],
                entry: dict) -> dict:
    """Write one shard under a temporary name, rename it, then write its sidecar.

    `entry` holds the shard's bookkeeping (samples, tokens, bad samples); file, bytes and
    checksum are added here. Returns the completed entry.
    """
    name = shard_name(index, fmt)
    tmp = cache_dir / (name + ".tmp")
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp),
                  metadata={"kava_schema": str(SCHEMA_VERSION)})
    else:
        import h5py
        with h5py.File(tmp, "w") as f:
            f.attrs["kava_schema"] = SCHEMA_VERSION
            for k, t in tensors.items():
                arr = t.contiguous()
                if arr.dtype in _STORED_AS_INT16:
                    f.create_dataset(k, data=arr.view(torch.int16).numpy()).attrs["torch_dtype"] = "bfloat16"
                else:
                    f.create_dataset(k, data=arr.numpy())
    return _finish_shard(cache_dir, index, name, tmp, entry, checksum_file(tmp))


def _finish_shard(cache_dir: Path, index: int, name: str, tmp: Path, entry: dict, checksum: str) -> dict:
    """fsync the finished shard, rename it into place, then write its sidecar.

    The rename alone is atomic against a killed process; the fsync makes a shard that its
    sidecar calls complete survive an OS crash or power loss too. It runs on stage 1's writer
    thread, where waiting on the disk costs the teacher nothing, and it leaves the manifest's
    own fsync at the end of a run almost nothing to flush (on this project's test machine the
    shards' writes sat in the disk's cache and one fsync at the end took 0.2-0.5 s)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    entry = dict(entry, file=name, bytes=tmp.stat().st_size, checksum=checksum)
    os.replace(tmp, cache_dir / name)
    atomic_write_text(cache_dir / f"shard-{index:05d}.json", json.dumps(entry, indent=1))
    return entry


# --- safetensors shards laid out before they are filled -----------------------------------------

ALIGN = 4096  # O_DIRECT wants buffer address, file offset and length in multiples of the block size
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}


def round_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


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


def aligned_bytes(n: int, pin: bool = False) -> torch.Tensor:
    """A uint8 buffer of `n` bytes whose address is a multiple of ALIGN."""
    raw = torch.empty(n + ALIGN, dtype=torch.uint8, pin_memory=pin)
    shift = (-raw.data_ptr()) % ALIGN
    return raw[shift: shift + n]


def write_bytes(path: Path, buf: np.ndarray, n: int, direct: bool = True) -> bool:
    """Write buf[:n] to a new file at `path`; returns whether the page cache was bypassed.

    With `direct`, an ALIGN-aligned `buf` and room to round `n` up to ALIGN, the file is
    written with O_DIRECT (rounded up, then truncated to n): the writer spends almost no CPU,
    which on a machine with few cores is CPU the teacher's forward keeps, and a cache of
    hundreds of GB does not evict everything else from memory. File systems without O_DIRECT
    (tmpfs, some network mounts) get a plain buffered write.
    """
    flag = getattr(os, "O_DIRECT", 0)
    m = round_up(n)
    if direct and flag and buf.ctypes.data % ALIGN == 0 and len(buf) >= m:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
        except OSError:
            fd = None
        if fd is not None:
            try:
                view, done = memoryview(buf)[:m], 0
                while done < m:
                    done += os.write(fd, view[done: done + (1 << 30)])
                os.ftruncate(fd, n)
                return True
            except OSError:
                pass                                   # e.g. EINVAL: fall back below
            finally:
                os.close(fd)
    with open(path, "wb") as f:
        f.write(memoryview(buf)[:n])
    return False


def write_laid_out_shard(cache_dir: Path, index: int, layout: ShardLayout, flat: torch.Tensor,
                         entry: dict, direct: bool = True) -> dict:
    """Write a safetensors shard whose tensors were filled in place in `flat` (see ShardLayout)."""
    arr = flat.numpy()          # numpy, not torch: stage 1 calls this from its writer thread
    arr[:len(layout.prefix)] = np.frombuffer(layout.prefix, dtype=np.uint8)
    checksum = checksum_bytes(memoryview(arr)[:layout.nbytes])
    name = shard_name(index, "safetensors")
    tmp = cache_dir / (name + ".tmp")
    write_bytes(tmp, arr, layout.nbytes, direct)
    return _finish_shard(cache_dir, index, name, tmp, entry, checksum)


def completed_shards(cache_dir: Path) -> dict[int, dict]:
    """Sidecar entries of shards that were fully written (file present, size as recorded)."""
    done = {}
    for side in sorted(cache_dir.glob("shard-[0-9][0-9][0-9][0-9][0-9].json")):
        try:
            entry = json.loads(side.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        f = cache_dir / entry.get("file", "")
        if f.is_file() and f.stat().st_size == entry.get("bytes"):
            done[int(entry["index"])] = entry
    return done


def remove_partial_files(cache_dir: Path) -> list[str]:
    """Delete leftovers of an interrupted run (temporary files); returns their names."""
    gone = []
    for p in cache_dir.glob("*.tmp"):
        p.unlink()
        gone.append(p.name)
    return gone


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    atomic_write_text(cache_dir / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=True), sync=True)


# --- reading ------------------------------------------------------------------------------------

class _Shard:
    """Lazy handle on one shard file; safe to use after fork (reopened per process).

    A safetensors shard is memory-mapped and read through its header: a slice of a tensor is
    a view of the mapped bytes (nothing is read until used), which costs a few microseconds
    where `safe_open(...).get_slice` costs tens, and stage 2 reads L x 2 slices per sample.
    The mapping is private (copy-on-write), so a caller writing into a view never changes the
    file.
    """

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt = path, fmt
        self._pid = None
        self._f = None
        self._index: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        self.meta: dict[str, np.ndarray] = {}

    def _open(self):
        if self._pid != os.getpid():
            if self.fmt == "safetensors":
                self._f, self._index = _map_safetensors(self.path)
            else:
                import h5py
                self._f = h5py.File(self.path, "r")
            self._pid = os.getpid()
            self.meta = {}
        return self._f

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        f = self._open()
        if self.fmt == "safetensors":
            if name not in self._index:
                raise KeyError(f"{self.path}: no tensor {name!r}")
            dtype, shape, pos, per_row = self._index[name]
            a, b = slice(start, stop).indices(shape[0] if shape else 1)[:2]
            b = max(a, b)
            count = (b - a) * per_row
            if count == 0:
                return torch.empty((b - a, *shape[1:]), dtype=dtype)
            t = torch.frombuffer(f, dtype=dtype, count=count, offset=pos + a * per_row * dtype.itemsize)
            return t.view(b - a, *shape[1:]) if shape else t.view(())
        ds = f[name]
        arr = ds[()] if start is None else ds[start:stop]
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if ds.attrs.get("torch_dtype") == "bfloat16":
            t = t.view(torch.bfloat16)
        return t

    def small(self, name: str) -> np.ndarray:
        """A per-sample metadata tensor, read once per process and kept."""
        self._open()
        if name not in self.meta:
            self.meta[name] = self.read(name).numpy()
        return self.meta[name]


_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}


def _map_safetensors(path: Path):
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


class KVCache:
    """Read a cache directory written by stage 1.

    `len(cache)` samples; `cache.manifest` the manifest dict; `cache[i]` a dict with
    `input_ids` (LongTensor [T]) and `k`, `v` ([len(layers), kv_heads, T, head_dim], stored
    dtype), plus `row`, `text`, `char_offsets` [T, 2], `token_segments` and `char_segments`
    {name: (start, end)}, `truncated`. Files open on first use in each process, so DataLoader workers can share it.
    """

    def __init__(self, path: str | os.PathLike, layers: list[int] | None = None):
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
        fmt = self.manifest["format"]
        self._shards = [_Shard(self.path / s["file"], fmt) for s in self.manifest["shards"]]
        self._starts = [s["first_sample"] for s in self.manifest["shards"]]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def __len__(self) -> int:
        return self.manifest["num_samples"]

    def locate(self, i: int) -> tuple[_Shard, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for cache of {len(self)} samples")
        i %= len(self)
        s = bisect.bisect_right(self._starts, i) - 1
        return self._shards[s], i - self._starts[s]

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
        """Only `input_ids`, `k` and `v` of sample i (what a training step needs)."""
        shard, j = self.locate(i)
        off = shard.small("sample_offsets")
        a, b = int(off[j]), int(off[j + 1])
        return {
            "input_ids": shard.read("input_ids", a, b).long(),
            "k": torch.stack([shard.read(f"k.{l}", a, b).transpose(0, 1) for l in self.layers]),  # (L, H, T, D)
            "v": torch.stack([shard.read(f"v.{l}", a, b).transpose(0, 1) for l in self.layers]),  # (L, H, T, D)
        }

    def __getitem__(self, i: int) -> dict:
        shard, j = self.locate(i)
        off = shard.small("sample_offsets")
        a, b = int(off[j]), int(off[j + 1])
        toff = shard.small("text_offsets")
        text = bytes(shard.small("text_bytes")[toff[j]:toff[j + 1]]).decode("utf-8")
        segs = shard.small("token_segments")[j]
        csegs = shard.small("char_segments")[j]
        names = self.manifest["segments"]
        return {
            **self.kv(i),
            "row": int(shard.small("rows")[j]),
            "text": text,
            "char_offsets": shard.read("char_offsets", a, b),
            "token_segments": {n: (int(s), int(e)) for n, (s, e) in zip(names, segs)},
            "char_segments": {n: (int(s), int(e)) for n, (s, e) in zip(names, csegs)},
            "truncated": bool(shard.small("truncated")[j]),
        }


def open_cache(path: str | os.PathLike, layers: list[int] | None = None) -> KVCache:
    """Open a finished cache directory; `layers` selects a subset of the stored teacher layers."""
    return KVCache(path, layers)


def verify_cache(path: str | os.PathLike) -> list[str]:
    """Re-hash every shard; returns one line per problem (empty when the cache is intact)."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    problems = []
    for s in manifest["shards"]:
        f = path / s["file"]
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != s["bytes"]:
            problems.append(f"{f}: size {f.stat().st_size} bytes, manifest says {s['bytes']}")
        else:
            want = expected_checksum(s)
            algorithm = want.split(":")[0]
            if checksum_file(f, algorithm) != want:
                problems.append(f"{f}: {algorithm} checksum does not match the manifest")
    return problems
