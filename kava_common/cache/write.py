"""Writing a cache: shards under temporary names, renamed into place, then their sidecars.

Every write goes to a temporary name and is renamed, so a killed process leaves either a whole
file or a `.tmp` that the next run deletes (`remove_partial_files`)."""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .format import (ALIGN, MANIFEST, SCHEMA_VERSION, _STORED_AS_INT16, ShardLayout, checksum_bytes,
                     checksum_file, round_up, shard_name, sidecar_name)
from .manifest import ShardEntry
from .format import shard_problem


def atomic_write_text(path: Path, text: str, sync: bool = False) -> None:
    """Write `text` to `path` through a temporary file and a rename (fsync'd when `sync`). The
    temporary name carries the process id, so processes writing one cache never share one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(text)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)



def write_shard(cache_dir: Path, fmt: str, tensors: dict[str, torch.Tensor],
                entry: ShardEntry) -> ShardEntry:
    """Write one shard by serialising `tensors`, rename it into place, then write its sidecar.

    `entry` holds the shard's bookkeeping (index, samples, tokens, bad samples); file, bytes
    and checksum are filled in here. Returns the completed entry.
    """
    index = entry.index
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
    return _finish_shard(cache_dir, name, tmp, entry, checksum_file(tmp))


def _finish_shard(cache_dir: Path, name: str, tmp: Path, entry: ShardEntry, checksum: str) -> ShardEntry:
    """fsync the finished shard, rename it into place, then write its sidecar.

    The rename alone is atomic against a killed process; the fsync makes a shard that its
    sidecar calls complete survive an OS crash or power loss too. It runs on stage 1's writer
    thread, where waiting on the disk costs the teacher nothing, and it leaves the manifest's
    own fsync at the end of a run almost nothing to flush (otherwise all the shards' writes can
    sit in the disk's cache until that one fsync)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    entry = replace(entry, file=name, bytes=tmp.stat().st_size, checksum=checksum)
    os.replace(tmp, cache_dir / name)
    atomic_write_text(cache_dir / sidecar_name(entry.index), entry.to_json())
    return entry



def aligned_bytes(n: int, pin: bool = False) -> torch.Tensor:
    """A uint8 buffer of `n` bytes whose address is a multiple of ALIGN.

    Pinned (`pin`, for copies from a GPU) it comes from torch. Otherwise it is an anonymous
    memory map of ordinary pages: torch's allocator would ask for transparent huge pages
    (kava sets THP_MEM_ALLOC_ENABLE), and a shard buffer is filled once, front to back, so
    huge pages save little there while their first touch can wait on the kernel's page
    compaction, in the middle of the teacher's forward (docs/benchmarks.md)."""
    if pin:
        raw = torch.empty(n + ALIGN, dtype=torch.uint8, pin_memory=True)
        shift = (-raw.data_ptr()) % ALIGN
        return raw[shift: shift + n]
    # private (not shared: no shmem pages) and populated by the kernel in one call: a fault per
    # page inside the capture's small copies cost twice as much (docs/benchmarks.md)
    if hasattr(mmap, "MAP_PRIVATE"):
        m = mmap.mmap(-1, max(n, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0))
    else:                                                 # Windows: no flags
        m = mmap.mmap(-1, max(n, 1))
    buf = torch.frombuffer(m, dtype=torch.uint8)[:n]      # page-aligned
    assert buf.data_ptr() % ALIGN == 0
    return buf


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


def write_laid_out_shard(cache_dir: Path, layout: ShardLayout, flat: torch.Tensor,
                         entry: ShardEntry, direct: bool = True) -> ShardEntry:
    """Write a safetensors shard whose tensors were filled in place in `flat` (see ShardLayout)."""
    arr = flat.numpy()          # numpy, not torch: stage 1 calls this from its writer thread
    arr[:len(layout.prefix)] = np.frombuffer(layout.prefix, dtype=np.uint8)
    checksum = checksum_bytes(memoryview(arr)[:layout.nbytes])
    name = shard_name(entry.index, "safetensors")
    tmp = cache_dir / (name + ".tmp")
    write_bytes(tmp, arr, layout.nbytes, direct)
    return _finish_shard(cache_dir, name, tmp, entry, checksum)


def completed_shards(cache_dir: Path, verify=()) -> dict[int, ShardEntry]:
    """Sidecar entries of shards that were fully written (file present, size as recorded);
    the shards whose index is in `verify` must also match their checksum, else they do not
    count (a resumed run writes them again)."""
    done = {}
    for side in sorted(cache_dir.glob("shard-[0-9][0-9][0-9][0-9][0-9].json")):
        try:
            entry = ShardEntry.from_json(side.read_text())
        except (ValueError, TypeError, OSError):    # unreadable, or not a sidecar of this schema
            continue
        f = cache_dir / entry.file
        if entry.file and f.is_file() and f.stat().st_size == entry.bytes:
            if entry.index in verify and shard_problem(f, {"bytes": entry.bytes, "checksum": entry.checksum}):
                continue
            done[entry.index] = entry
    return done


def remove_partial_files(cache_dir: Path, shards) -> list[str]:
    """Delete what an interrupted run left half-written: the temporary files of the shards in
    `shards` (the part of the cache this process writes) and those of processes no longer
    running. Another live process's files are left alone. Returns the names removed."""
    gone = []
    for p in cache_dir.glob("*.tmp"):
        owner = p.name.split(".")[-2]                      # NAME.PID.tmp: written by process PID
        mine = p.name.startswith("shard-") and p.name[6:11].isdigit() and int(p.name[6:11]) in shards \
            and not owner.isdigit()
        if mine or (owner.isdigit() and not _alive(int(owner))):
            p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone


def _alive(pid: int) -> bool:
    """Whether process `pid` is running. On Windows os.kill would end the process, so the
    process is opened by id instead (one that cannot be opened for another reason counts as
    running: its files are kept)."""
    if os.name == "nt":
        import ctypes
        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)   # PROCESS_QUERY_LIMITED_INFORMATION
        if handle:
            code = ctypes.c_ulong()
            ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            ctypes.windll.kernel32.CloseHandle(handle)
            return code.value == 259                                          # STILL_ACTIVE
        return ctypes.windll.kernel32.GetLastError() != 87                    # 87: no such process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    atomic_write_text(cache_dir / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=True), sync=True)

