"""Reading one shard file: a lazy handle that memory-maps a safetensors shard (or opens an HDF5
one) and checks the whole file against its manifest entry the first time a process opens it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .. import KavaError
from .format import expected_checksum, map_safetensors, shard_problem


# (path, checksum, size, mtime) of shards already checked; DataLoader workers forked after a
# check inherit it
_VERIFIED: set[tuple] = set()


def check_shard(path: Path, entry: dict) -> None:
    """Raise KavaError, naming the file, when a shard is missing or its size or checksum is not
    the manifest's (`shard_problem`). A shard is hashed once while its file stays as it was."""
    key = None
    if path.is_file():
        st = path.stat()
        key = (str(path.resolve()), expected_checksum(entry), st.st_size, st.st_mtime_ns)
        if key in _VERIFIED:
            return
    problem = shard_problem(path, entry)
    if problem:
        raise KavaError(f"{path}: {problem}; the shard is not read (it changed, was cut short or "
                        "removed after stage 1 wrote it; python -m kava_common.info CACHE --verify "
                        "lists every bad shard)")
    _VERIFIED.add(key)


class Shard:
    """Lazy handle on one shard file; safe to use after fork (reopened per process).

    A safetensors shard is memory-mapped and read through its header: a slice of a tensor is
    a view of the mapped bytes (nothing is read until used), which costs a few microseconds
    where `safe_open(...).get_slice` costs tens, and stage 2 reads L x 2 slices per sample.
    The mapping is private (copy-on-write), so a caller writing into a view never changes the
    file.
    """

    def __init__(self, path: Path, fmt: str, entry: dict | None = None):
        """`entry`: the shard's manifest entry, to check the whole file against its size and
        checksum when it is first opened in a process; None opens it unchecked."""
        self.path, self.fmt, self.entry = path, fmt, entry
        self._pid = None
        self._f = None
        self._index: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        self.meta: dict[str, np.ndarray] = {}

    def _open(self):
        if self._pid != os.getpid():
            if self.entry is not None:
                check_shard(self.path, self.entry)
            if self.fmt == "safetensors":
                self._f, self._index = map_safetensors(self.path)
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

    def names(self) -> list[str]:
        """The names of the shard's tensors."""
        f = self._open()
        return list(self._index) if self.fmt == "safetensors" else list(f.keys())

    def small(self, name: str) -> np.ndarray:
        """A per-sample metadata tensor, read once per process and kept."""
        self._open()
        if name not in self.meta:
            self.meta[name] = self.read(name).numpy()
        return self.meta[name]
