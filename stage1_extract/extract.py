"""Stage 1: run each teacher once over a data set and write its per-layer K/V to a cache.

Flow per teacher: config + tokenizer (cheap) -> samples through the shared prompt template ->
identity and fingerprint -> cache folder -> size estimate and disk check -> teacher weights ->
for each shard not yet on disk: length-sorted batches through the model, each layer's K/V
captured into the shard buffer (capture.py), screened and handed to a background writer
(writer.py) -> manifest.json last.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kava_common import KavaError, check_output_folder, software_versions
from kava_common import cache as kcache
from kava_common.cache import CacheIdentity, CacheSample, ShardEntry
from kava_common.cache.quant import stored_bytes_per_token
from kava_common.data import Rows, load_rows, pad_id, tokenizer_identity
from kava_common.device import resolve_device
from kava_common.geometry import DTYPES, KVGeometry
from kava_common.prompt import TEMPLATE_ID
from kava_common.rkv import result_tokens, rkv_select, stored_index
from kava_common.vocab import save_teacher_tokenizer

from . import teacher as T
from .capture import HiddenCapture, KVCapture, QueryCapture, capture_topk, sample_spans, teacher_forward
from .config import ExtractConfig
from .samples import collate, length_sorted_batches, plan_shards, prepare_samples
from .writer import BackgroundWriter, BufferPool, ShardItem, WriteStats, finish_shard


@contextlib.contextmanager
def gc_frozen():
    """Set everything alive now aside from Python's garbage collector until the block ends.

    With a model, its tokenizer and transformers loaded there are ~350k tracked objects (tiny
    teacher), and a full collection walks them all (a tenth of a second; docs/benchmarks.md),
    triggered now and then by the many small objects that tokenizing and the forward loop
    allocate. Frozen objects are skipped; new ones are collected as usual. A caller that
    froze objects itself is left alone."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9.]+", "-", Path(name).name if Path(name).exists() else name).strip("-")
    return s[-40:] or "teacher"


def _gb(n: float) -> str:
    """A byte count with a unit that shows it (0.00 GB says nothing about 3 MB)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class TeacherJob:
    """What stage 1 knows about one teacher before it loads the weights."""
    name: str
    geometry: KVGeometry
    layers: list[int]                 # stored teacher layers
    tok: object
    samples: list[CacheSample]
    skipped: list[dict]               # rows left out, with the reason
    stats: dict                       # counts the manifest reports
    quant: dict                       # how the teacher runs
    summary: dict                     # name, architecture, config hash, revision, weights id
    tokenizer: dict
    dataset: dict
    identity: CacheIdentity
    cache_dir: Path
    shards: list[list[int]]           # sample positions per shard, for the whole cache
    mine: list[int]                   # shards this process writes

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint


def plan_teacher(cfg: ExtractConfig, name: str, rows: Rows, model=None, tok=None) -> TeacherJob:
    """Read the teacher's config and tokenizer, prepare the samples, fix the cache's identity
    and its shard plan. Nothing is written and no weights are loaded."""
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
    if cfg.quant:
        cfg.quant.check_geometry(geometry.num_kv_heads, geometry.head_dim)
    tok = tok if tok is not None else T.load_tokenizer(name, cfg.revision)
    with gc_frozen():
        samples, skipped, stats = prepare_samples(rows, tok, cfg.max_length)
    if not samples:
        raise ValueError(f"data set {rows.name!r} split {rows.split!r}: no usable rows "
                         f"({len(skipped)} skipped)")
    if stats["truncated_samples"] == len(samples):
        raise KavaError(f"--max-length {cfg.max_length} cuts every one of the {len(samples)} samples; "
                        "raise it (GSM8K rows are about 220 tokens with the prompt)")
    quant = _describe_loaded(model) if model is not None else \
        T.quantization_settings(cfg.quantize, cfg.quant_type, cfg.double_quant, device, cfg.dtype)
    summary = dict(T.model_summary(name, config), revision=cfg.revision,
                   weights=T.weights_identity(name, config))
    tok_id, data_id = tokenizer_identity(tok), rows.identity()    # each hashes everything once
    identity = CacheIdentity(
        teacher={k: summary[k] for k in ("name", "revision", "weights")}, quantization=dict(quant),
        tokenizer_sha256=tok_id["sha256"], dataset=data_id, prompt_template=TEMPLATE_ID,
        max_length=cfg.max_length, layers=layers, kv_dtype=cfg.kv_dtype, format=cfg.format,
        shard_mb=cfg.shard_mb, logits_topk=cfg.logits_topk, token_logprobs=bool(cfg.logits_topk),
        kv_quant=cfg.quant.describe() if cfg.quant else None, rkv_slots=cfg.rkv_slots,
        rkv_lambda=cfg.rkv_lambda if cfg.rkv_slots else 0.0, rkv_select=cfg.rkv_select, store_hidden=cfg.store_hidden)
    shards = plan_shards(samples, geometry.bytes_per_token(cfg.kv_dtype, layers), cfg.shard_mb * 1e6)
    return TeacherJob(
        name=name, geometry=geometry, layers=layers, tok=tok, samples=samples, skipped=skipped,
        stats=stats, quant=quant, summary=summary, tokenizer=tok_id,
        dataset=dict(data_id, seed=cfg.seed if rows.name.startswith("synthetic") else None),
        identity=identity, cache_dir=Path(cfg.out) / f"{_slug(name)}-{rows.split}-{identity.fingerprint}",
        shards=shards, mine=[i for i in range(len(shards)) if i % cfg.num_shards == cfg.shard_index])


def estimate_and_check_disk(cfg: ExtractConfig, job: TeacherJob, todo: list[int], done: int, log) -> None:
    """Print the cache's size estimate beside the free space; refuse to start when the part
    still to write does not fit (unless --no-disk-check)."""
    g, samples = job.geometry, job.samples
    kv_bpt = g.bytes_per_token(cfg.kv_dtype, job.layers)
    q = cfg.quant

    def kv_bytes(n_tokens: int) -> float:          # one sample's K/V as stored (codes and groups)
        if q is None:
            return n_tokens * kv_bpt
        return n_tokens * stored_bytes_per_token(q, g.num_kv_heads, g.head_dim, len(job.layers),
                                                 tokens_per_sample=n_tokens)

    # R-KV slots per sample: K and V of M slots and their index per stored layer and KV head, and
    # a float32 importance per token, layer and KV head
    rkv_sample = len(job.layers) * g.num_kv_heads * cfg.rkv_slots * (2 * g.head_dim * DTYPES[cfg.kv_dtype].itemsize + 4)
    rkv_token = 4 * len(job.layers) * g.num_kv_heads if cfg.rkv_slots else 0
    if cfg.store_hidden:       # every layer's hidden state at one token per sample
        rkv_sample += g.num_layers * job.summary["hidden_size"] * DTYPES[cfg.kv_dtype].itemsize

    def est(idx):
        return sum(kv_bytes(len(samples[j].ids)) + len(samples[j].ids) * (kcache.META_BYTES_PER_TOKEN
                   + 8 * cfg.logits_topk + 4 * bool(cfg.logits_topk) + rkv_token) + len(samples[j].text.encode())
                   + rkv_sample for i in idx for j in job.shards[i])
    total_est, left_est = est(range(len(job.shards))), est(todo)
    free = shutil.disk_usage(job.cache_dir).free
    n_tokens = sum(len(s.ids) for s in samples)
    log(f"[{job.name}] {len(samples)} samples, {n_tokens} tokens, {g.num_layers} layers "
        f"({len(job.layers)} kept) x {g.num_kv_heads} KV heads x head_dim {g.head_dim}, "
        f"{kv_bpt} B/token as {cfg.kv_dtype}" + (f" (quantized to {cfg.kv_quant})" if q else "")
        + f": estimated cache {_gb(total_est)}, still to write "
        f"{_gb(left_est)}, free {_gb(free)}; {done}/{len(job.shards)} shards already done"
        + (f"; this process takes {len(job.mine)} (part {cfg.shard_index} of {cfg.num_shards})"
           if cfg.num_shards > 1 else "")
        + (f"; {job.stats['truncated_samples']} samples cut at --max-length {cfg.max_length}"
           if job.stats["truncated_samples"] else "")
        + (f"; {len(job.skipped)} rows skipped (listed in the manifest)" if job.skipped else ""))
    if cfg.rkv_slots and cfg.rkv_select == "results":
        none = sum(not result_tokens(s.text, s.offsets, *s.token_segments[1]) for s in samples)
        if none:
            log(f"[{job.name}] --rkv-select results: {none} of {len(samples)} samples have no calculator result "
                "('>>') in their chain of thought; their slots stay empty (masked), so they teach no K/V")
    if cfg.disk_check and left_est > free:
        raise KavaError(f"{job.cache_dir}: the cache needs about {_gb(left_est)} more but only {_gb(free)} "
                        "is free; free space, keep fewer --layers, use a smaller --kv-dtype, or pass "
                        "--no-disk-check to try anyway")


def extract_teacher(cfg: ExtractConfig, name: str, rows: Rows, model=None, tok=None,
                    log=print) -> Path:
    """Write (or complete) the cache of one teacher; returns the cache folder.

    `model`/`tok` may be passed in already loaded (tests, benchmarks); otherwise they are
    loaded here as `cfg` says and freed at the end.
    """
    job = plan_teacher(cfg, name, rows, model, tok)
    if kcache.is_complete(job.cache_dir, job.fingerprint):
        log(f"[{name}] cache complete, nothing to do: {job.cache_dir}")
        return job.cache_dir
    job.cache_dir.mkdir(parents=True, exist_ok=True)
    with part_lock(job.cache_dir, cfg):
        return _extract_locked(cfg, job, model, log)


@contextlib.contextmanager
def part_lock(cache_dir: Path, cfg: ExtractConfig):
    """Hold an exclusive lock on this process's part of the cache: a second process started on
    the same part (the same command twice, or a repeated --shard-index) is refused instead of
    racing the first one's writes and renames. fcntl's flock on POSIX, msvcrt's byte lock on
    Windows, none where neither exists."""
    path = cache_dir / f".lock-part-{cfg.shard_index}-of-{cfg.num_shards}"
    with open(path, "w") as f:
        try:
            _lock(f)
        except OSError:                   # BlockingIOError (flock) or PermissionError (msvcrt)
            raise KavaError(f"{cache_dir}: another stage-1 process is writing part {cfg.shard_index} of "
                            f"{cfg.num_shards} of this cache; wait for it, or give each process its own "
                            "--shard-index") from None
        yield


def _lock(f) -> None:
    """An exclusive, non-blocking lock on open file `f`, held until it is closed."""
    try:
        import fcntl
    except ImportError:
        try:
            import msvcrt
        except ImportError:               # no advisory locks on this platform
            return
        f.write(" ")
        f.flush()
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _extract_locked(cfg: ExtractConfig, job: TeacherJob, model, log) -> Path:
    name = job.name
    kcache.atomic_write_text(job.cache_dir / "identity.json", json.dumps(job.identity.to_dict(), indent=1))
    kcache.remove_partial_files(job.cache_dir, set(job.mine))
    mine = set(job.mine)          # this part's finished shards are re-hashed here, the others' at the end
    done = kcache.completed_shards(job.cache_dir, verify=mine)
    bad = sorted(i for i in (int(p.stem[6:]) for p in job.cache_dir.glob("shard-[0-9]*.json"))
                 if i in mine and i not in done)
    if bad:
        log(f"[{name}] {len(bad)} shard(s) left by an earlier run are incomplete or do not match their "
            f"checksum and are written again: {', '.join(kcache.shard_name(i, cfg.format) for i in bad)}")
    todo = [i for i in job.mine if i not in done]
    estimate_and_check_disk(cfg, job, todo, len(done), log)
    if todo:
        own_model = model is None
        if own_model:
            q = job.quant
            log(f"[{name}] loading teacher ({q['method']}"
                f"{' ' + q.get('quant_type', '') if q['method'] != 'none' else ''}) on {resolve_device(cfg.device)}")
            model = T.load_teacher(name, q, resolve_device(cfg.device), cfg.revision, cfg.cpu_4bit_kernel)
        try:
            with gc_frozen():   # the loop's collections skip the model and the samples
                written = run_shards(cfg, job, model, todo)
            log(f"[{name}] wrote {_gb(written.bytes)} this run; the writer thread used "
                f"{written.cpu:.2f} s of CPU")
        finally:
            if own_model:
                del model
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return finish_cache(cfg, job, log)


def finish_cache(cfg: ExtractConfig, job: TeacherJob, log) -> Path:
    """Write the manifest once every shard of the plan is on disk (the last of several
    processes does it); returns the cache folder."""
    # this process's shards were checked at its start or written by it; other processes' are checked here
    entries = kcache.completed_shards(job.cache_dir, verify=set(range(len(job.shards))) - set(job.mine))
    missing = [i for i in range(len(job.shards)) if i not in entries]
    lost = [i for i in missing if i in job.mine]
    if lost:
        raise KavaError(f"{job.cache_dir}: shards {lost} are missing after extraction")
    if missing:          # other processes' parts: whoever completes the last one writes the manifest
        log(f"[{job.name}] part {cfg.shard_index}/{cfg.num_shards} done; {len(missing)} shards of other "
            f"processes pending; the last process to finish writes the manifest -> {job.cache_dir}")
        return job.cache_dir
    save_teacher_tokenizer(job.tok, job.cache_dir)          # stage 2 compares vocabularies with it
    manifest = kcache.build_manifest(
        job.identity, teacher=dict(job.summary, quantization=job.quant), tokenizer=job.tokenizer,
        dataset=job.dataset, geometry=job.geometry, entries=[entries[i] for i in range(len(job.shards))],
        skipped=job.skipped, stats=job.stats, software=software_versions())
    kcache.write_manifest(job.cache_dir, manifest)
    m = kcache.Manifest.from_dict(manifest)
    nbad = len(m.bad_samples)
    log(f"[{job.name}] done: {m.num_samples} samples, {m.num_tokens} tokens, "
        f"{_gb(m.total_bytes)} in {len(job.shards)} shards"
        f"{f', {nbad} bad samples recorded in the manifest' if nbad else ''} -> {job.cache_dir}")
    return job.cache_dir


def _describe_loaded(model) -> dict:
    """Quantization settings of a model loaded by the caller."""
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and getattr(qc, "load_in_4bit", False):
        return {"method": "bitsandbytes", "bits": 4, "quant_type": qc.bnb_4bit_quant_type,
                "double_quant": qc.bnb_4bit_use_double_quant,
                "compute_dtype": str(qc.bnb_4bit_compute_dtype).replace("torch.", "")}
    return {"method": "none", "dtype": str(model.dtype).replace("torch.", "")}


def _progress_bar(cfg: ExtractConfig, job: TeacherJob, todo: list[int]):
    from tqdm.auto import tqdm
    total = sum(len(job.shards[i]) for i in job.mine)         # this process's part of the plan
    return tqdm(total=total, initial=total - sum(len(job.shards[i]) for i in todo), unit="sample",
                desc=f"stage1 {_slug(job.name)}", disable=not cfg.progress, dynamic_ncols=True,
                ascii=True)


def run_shards(cfg: ExtractConfig, job: TeacherJob, model, todo: list[int]) -> WriteStats:
    """The forward loop over the shards in `todo`: each shard's batches fill its buffer, which
    then goes to the background writer. Shards already computed are written even on Ctrl-C."""
    kv_dtype, samples = DTYPES[cfg.kv_dtype], job.samples
    stats = WriteStats()
    writer = BackgroundWriter(stats.write, cfg.writer_queue)
    bar = _progress_bar(cfg, job, todo)
    # without top-K logits or hidden states nothing after the last stored layer's K/V is needed
    grab = KVCapture(job.name, job.geometry,
                     stop_after=None if cfg.logits_topk or cfg.store_hidden else max(job.layers))
    pin = torch.device(model.device).type == "cuda"
    metas = {i: kcache.shard_tensors([samples[j] for j in job.shards[i]]) for i in todo}
    layouts = {i: kcache.shard_layout(metas[i], job.layers, job.geometry, kv_dtype, cfg.logits_topk,
                                      job.identity.token_logprobs, cfg.rkv_slots,
                                      job.summary["hidden_size"] if cfg.store_hidden else 0) for i in todo}
    pool = BufferPool(max(l.nbytes for l in layouts.values()), pin)
    t0, tokens = time.perf_counter(), 0
    try:
        for index in todo:
            members = job.shards[index]
            flat = pool.take()
            views = layouts[index].views(flat)
            bufs = {l: (views[f"k.{l}"], views[f"v.{l}"]) for l in job.layers}
            topk = (views["topk_ids"], views["topk_logprobs"], views["token_logprobs"]) if cfg.logits_topk else None
            rkv = rkv_views(views, job.layers) if cfg.rkv_slots else None
            hidden = views["hidden"] if cfg.store_hidden else None
            for n_samples, n_tokens in run_batches(cfg, job, model, grab, members, bufs, topk, rkv, hidden):
                tokens += n_tokens
                bar.update(n_samples)
                rate = tokens / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{rate:.0f} tok/s, {stats.bytes / 1e9:.2f} GB written")
            if pin:
                torch.cuda.synchronize(model.device)    # buffers filled before the writer reads
            item = ShardItem(entry=ShardEntry(index=index, fingerprint=job.fingerprint),
                             cache_dir=job.cache_dir, format=cfg.format, direct_io=cfg.direct_io,
                             layout=layouts[index], flat=flat,
                             release=lambda flat=flat: pool.give_back(flat))
            writer.submit(finish_shard(item, [samples[j] for j in members], metas.pop(index), views, bufs,
                                       dict(zip(("topk_ids", "topk_logprobs", "token_logprobs"), topk))
                                       if topk else {},
                                       cfg.quant))
    finally:
        try:
            writer.close()
        finally:
            bar.close()
    return stats


def run_batches(cfg: ExtractConfig, job: TeacherJob, model, grab: KVCapture, members: list[int],
                bufs: dict, topk: tuple | None = None, rkv: dict | None = None,
                hidden: torch.Tensor | None = None):
    """One shard's samples through the teacher in length-sorted batches, each sample's K/V
    captured into its rows of `bufs` ({layer: (K, V)}, (N, H, D) each, samples in data-set
    order), with `topk` ((N, K) ids, (N, K) log-probs, (N,) log-probs) its top-K next-token
    log-probabilities and that of each actual next token, with `rkv` (`rkv_views`) its
    chain of thought's R-KV slots, and with `hidden` ((n, layers, hidden_size)) every layer's
    output at the token before its answer; yields (samples, tokens) per batch."""
    samples, tok = job.samples, job.tok
    pad = pad_id(tok)
    lens = [len(samples[j].ids) for j in members]
    per_sample = {l: (k.split(lens), v.split(lens)) for l, (k, v) in bufs.items()}  # (n, H, D) each
    topk_rows = tuple(t.split(lens) for t in topk) if topk else None     # (n, K), (n, K), (n,) each
    firsts = [0, *itertools.accumulate(lens)]                            # each sample's first row
    queries = QueryCapture(model, job.layers) if rkv is not None else contextlib.nullcontext()
    states = HiddenCapture(model) if hidden is not None else contextlib.nullcontext()
    with torch.inference_mode(), queries, states:
        for batch in length_sorted_batches(samples, members, cfg.batch_size):
            ids, mask, pos = collate([samples[members[p]].ids for p in batch], pad, cfg.padding_side)
            starts = sample_spans([lens[p] for p in batch], ids.shape[1], cfg.padding_side)
            dests = {l: ([ks[p] for p in batch], [vs[p] for p in batch]) for l, (ks, vs) in per_sample.items()}
            spans = [(b, s, lens[p]) for b, (p, s) in enumerate(zip(batch, starts))]
            if rkv is not None:
                queries.want(answer_positions([samples[members[p]] for p in batch], starts))
            if hidden is not None:
                states.want(before_answer([samples[members[p]] for p in batch], starts))
            out = teacher_forward(model, ids, mask, pos, grab.cache(dests, spans, *ids.shape), topk is not None)
            grab.check_complete()
            if topk_rows:
                capture_topk(out.logits, spans, cfg.logits_topk, [topk_rows[0][p] for p in batch],
                             [topk_rows[1][p] for p in batch], ids, [topk_rows[2][p] for p in batch],
                             tok.eos_token_id)
            if rkv is not None:
                if torch.device(model.device).type == "cuda":
                    torch.cuda.synchronize(model.device)      # the K/V copies into the buffers are done
                for b, p in enumerate(batch):
                    store_rkv(rkv, p, samples[members[p]], {l: (ks[p], vs[p]) for l, (ks, vs) in per_sample.items()},
                              {l: q[b] for l, q in queries.got.items()}, cfg.rkv_slots, cfg.rkv_lambda, firsts[p],
                              cfg.rkv_select)
            if hidden is not None:
                got = states.got.to(hidden.device, hidden.dtype)
                for b, p in enumerate(batch):
                    hidden[p] = got[b]
            yield len(batch), int(mask.sum())


def before_answer(batch: list[CacheSample], starts: list[int]) -> torch.Tensor:
    """(B,) the position along the padded time axis of the token before each sample's answer
    (its last token where max_length cut the answer away)."""
    return torch.tensor([st + min(max(s.token_segments[2][0] - 1, 0), len(s.ids) - 1)
                         for s, st in zip(batch, starts)], dtype=torch.long)


def rkv_views(views: dict, layers: list[int]) -> dict:
    """A shard buffer's R-KV tensors by kind and layer; the importance starts at zero (tokens
    outside a chain of thought keep it), as a reused buffer holds an earlier shard's bytes."""
    rkv = {"k": {l: views[f"rkv_k.{l}"] for l in layers}, "v": {l: views[f"rkv_v.{l}"] for l in layers},
           "importance": {l: views[f"rkv_importance.{l}"] for l in layers}, "index": views["rkv_index"],
           "layers": list(layers)}
    for t in rkv["importance"].values():
        t.zero_()
    return rkv


def answer_positions(batch: list[CacheSample], starts: list[int]) -> torch.Tensor:
    """(B, P) positions along the padded time axis of each sample's answer tokens, P the longest
    answer (at least 1); a shorter answer repeats its first position, which `store_rkv` drops."""
    spans = [s.token_segments[2] for s in batch]
    width = max(1, max(b - a for a, b in spans))
    # an answer max_length cut away (start == end == the sample's length) points at its last token
    return torch.tensor([[st + min(a + min(i, max(b - a - 1, 0)), len(s.ids) - 1) for i in range(width)]
                         for (a, b), st, s in zip(spans, starts, batch)], dtype=torch.long)


def store_rkv(rkv: dict, p: int, sample: CacheSample, kv: dict, q: dict, slots: int, lam: float, first: int,
              how: str = "rkv") -> None:
    """Sample p's R-KV selection per stored layer (kava_common.rkv.rkv_select) into the shard's
    views: its reasoning tokens' K/V (from the buffer, as stored) against its answer's queries
    `q` ({layer: (query heads, P, D)}); slot indices become positions in the sample; `first`:
    the sample's first row in the shard."""
    (r0, r1), (a0, a1) = sample.token_segments[1], sample.token_segments[2]
    results = result_tokens(sample.text, sample.offsets, r0, r1) if how == "results" else None
    for li, l in enumerate(rkv["layers"]):
        k, v = kv[l]                                         # (T, H, D)
        sel = rkv_select(q[l][:, :a1 - a0].float().cpu(), k[r0:r1].transpose(0, 1).float(),
                         v[r0:r1].transpose(0, 1).float(), slots, lam, how=how, results=results)
        rkv["k"][l][p] = sel["k"].to(rkv["k"][l].dtype)
        rkv["v"][l][p] = sel["v"].to(rkv["v"][l].dtype)
        rkv["index"][p, li] = stored_index(sel, r0)
        rkv["importance"][l][first + r0:first + r1] = sel["I"].t()


def main(cfg: ExtractConfig) -> list[Path]:
    """Extract one cache per teacher; returns their folders."""
    check_output_folder(cfg.out, "--out")
    rows = load_rows(cfg.dataset, cfg.split, cfg.max_samples, seed=cfg.seed)
    return [extract_teacher(cfg, name, rows) for name in cfg.teachers]
