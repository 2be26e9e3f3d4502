"""Stage 1's shard writer: the main thread screens and finishes a shard, one background thread
hashes and writes it while the teacher computes the next one."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from kava_common import KavaError, all_finite
from kava_common import cache as kcache
from kava_common.cache import CacheSample, ShardEntry, ShardLayout


class BackgroundWriter:
    """Runs `fn(item)` for each submitted item on one thread, with at most `max_pending` waiting.

    `submit` blocks when the queue is full (the disk is the bottleneck) and re-raises an error
    the writer hit; `close` writes everything already submitted, then re-raises any error.
    """

    def __init__(self, fn: Callable, max_pending: int = 2):
        self._fn = fn
        self._q: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kava-writer", daemon=True)
        self._thread.start()

    def _run(self):
        while (item := self._q.get()) is not None:
            if self._error is None:
                try:
                    self._fn(item)
                except BaseException as e:  # handed to the main thread by submit/close
                    self._error = e

    def _raise(self):
        e = self._error
        if isinstance(e, OSError):        # a full or read-only disk, a vanished folder, ...
            raise KavaError(f"writing {e.filename or 'a shard'} failed: {e.strerror or e}; the shards "
                            "finished before it are kept, run the same command again to resume") from e
        if e is not None:
            raise RuntimeError(f"the shard writer failed: {e}") from e

    def submit(self, item) -> None:
        self._raise()
        self._q.put(item)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        self._raise()


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


@dataclass
class ShardItem:
    """A finished shard on its way from the main thread to the writer thread: either laid out
    in `flat` (written as it is) or `tensors` to serialise (HDF5, or a shard rebuilt without
    bad samples)."""
    entry: ShardEntry                         # bookkeeping; file, bytes and checksum come from the writer
    cache_dir: Path
    format: str
    direct_io: bool
    layout: ShardLayout | None = None
    flat: torch.Tensor | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    release: Callable[[], None] = lambda: None   # hands `flat` back to its pool once written


def suspect_layers(bufs: dict) -> list:
    """Layers whose K or V buffer holds NaN or Inf somewhere (`all_finite`: one aminmax pass in
    the buffer's own dtype, ten times faster than a float32 sum of a float16 buffer)."""
    return [l for l, (k, v) in bufs.items() if not (all_finite(k) and all_finite(v))]


def nonfinite_samples(bufs: dict, offsets: torch.Tensor) -> torch.Tensor:
    """(n,) flags of samples with NaN or Inf anywhere in the K/V of `bufs`, token by token.
    Stage 1 passes only the layers `suspect_layers` flagged."""
    bad_tok = torch.zeros(int(offsets[-1]), dtype=torch.bool)
    for kbuf, vbuf in bufs.values():
        bad_tok |= ~torch.isfinite(kbuf).flatten(1).all(1)
        bad_tok |= ~torch.isfinite(vbuf).flatten(1).all(1)
    cs = torch.cat([torch.zeros(1, dtype=torch.long), bad_tok.long().cumsum(0)])
    return (cs[offsets[1:]] - cs[offsets[:-1]]) > 0


def finish_shard(item: ShardItem, samples: list[CacheSample], meta: dict, views: dict,
                 bufs: dict, per_token: dict | None = None, quant=None) -> ShardItem:
    """Main thread, after a shard's last forward: screen for NaN/Inf and finish the shard's
    tensors, so the writer thread only hashes and writes bytes.

    The writer must run no torch op: with libgomp, a parallel op on a second thread starts a
    second OpenMP team, and once there are more OpenMP threads than cores every thread of the
    forward's team stops spin-waiting and sleeps between parallel regions (a core then sits
    idle for a third of an extraction on 2 cores; docs/benchmarks.md).
    With `quant` (a KVQuant), the K/V are quantized here too, and the shard serialised."""
    item = _screen(item, samples, meta, views, bufs, per_token)
    if quant is not None:
        item.tensors, item.entry.quant = kcache.quantize_shard(item.tensors, list(bufs), quant)
        item.layout = None
    return item


def _screen(item: ShardItem, samples: list[CacheSample], meta: dict, views: dict, bufs: dict,
            per_token: dict | None) -> ShardItem:
    """finish_shard's NaN/Inf screen: the shard's tensors as laid out, or rebuilt without the
    samples whose K/V are not finite."""
    offsets = meta["sample_offsets"]
    suspect = suspect_layers(bufs)
    bad = nonfinite_samples({l: bufs[l] for l in suspect}, offsets).tolist() if suspect \
        else [False] * len(samples)
    e = item.entry
    e.rows = [samples[0].row, samples[-1].row]
    e.bad_samples = [{"row": samples[j].row, "reason": "non-finite K/V (NaN or Inf)"}
                     for j in range(len(samples)) if bad[j]]
    if not any(bad):
        for name, t in meta.items():
            views[name].copy_(t)
        e.num_samples, e.tokens = len(samples), int(offsets[-1])
        item.tensors = views
        return item
    # rebuilt without the bad samples; rare, so plain serialisation is fine
    keep = [j for j in range(len(samples)) if not bad[j]]
    index = torch.cat([torch.arange(int(offsets[j]), int(offsets[j + 1])) for j in keep]) \
        if keep else torch.zeros(0, dtype=torch.long)
    tensors = kcache.shard_tensors([samples[j] for j in keep])
    for l, (k, v) in bufs.items():
        tensors[f"k.{l}"], tensors[f"v.{l}"] = k.index_select(0, index), v.index_select(0, index)
    for name, t in (per_token or {}).items():     # other (N, ...) tensors: the top-K logits
        tensors[name] = t.index_select(0, index)
    e.num_samples, e.tokens = len(keep), int(tensors["sample_offsets"][-1])
    item.layout, item.tensors = None, tensors
    return item


class WriteStats:
    """Bytes written, and the CPU seconds the writer thread spent (what it takes from the
    teacher's forward when cores are few)."""

    def __init__(self):
        self.bytes = 0
        self.cpu = 0.0

    def write(self, item: ShardItem) -> None:
        """Writer thread: write the shard (its laid-out bytes, or serialised) and its sidecar,
        then hand the buffer back."""
        t = time.thread_time()
        tmp = item.cache_dir / (kcache.shard_name(item.entry.index, item.format) + ".tmp")
        try:
            if item.layout is not None and item.format == "safetensors":
                entry = kcache.write_laid_out_shard(item.cache_dir, item.layout, item.flat, item.entry,
                                                    item.direct_io)
            else:
                entry = kcache.write_shard(item.cache_dir, item.format, item.tensors, item.entry)
            self.bytes += entry.bytes
            item.release()
        except OSError:
            tmp.unlink(missing_ok=True)       # nothing half-written stays behind
            raise
        finally:
            self.cpu += time.thread_time() - t
