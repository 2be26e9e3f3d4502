"""python -m kava_common.recompress CACHE --kv-quant int4 [--layers 0,5] [--kv-dtype D] [--out ROOT]

Derive a smaller cache from an existing one without the teacher: quantize its K/V (int8/int4),
keep a subset of its layers, or store them in another dtype. The new cache is what stage 1
would have written with those settings (same fingerprint, the same shard files where the
parent's float K/V are the ones stage 1 would quantize), and its manifest names the parent's
fingerprint. Shard by shard, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import KavaError, software_versions
from . import cache as kc
from .cache.quant import KV_QUANT, KV_TENSORS, V_SPANS, KVQuant
from .cli import command, setting
from .geometry import DTYPES, KVGeometry
from .rkv import SELECTS, choose, result_tokens, stored_index
from .vocab import TOKENIZER_DIR, save_teacher_tokenizer


@dataclass
class RecompressArgs:
    """Settings of `python -m kava_common.recompress` (kava_common.cli)."""
    cache: str = setting("", "the parent cache folder", positional=True)
    out: str | None = setting(None, "root folder of the new cache (default: the parent's root)")
    kv_quant: str = setting("none", "int8 or int4 codes in groups (kava_common.cache.quant)", choices=KV_QUANT)
    kv_quant_group: int = setting(128, "tokens per key group and channels per value group")
    kv_quant_v_span: str = setting("token", "a value group spans a token's KV heads or stays in one head",
                                   choices=V_SPANS)
    kv_quant_v_symmetric: bool = setting(False, "value groups store a scale only, codes centred on zero")
    layers: list[int] | None = setting(None, "stored layers to keep, e.g. 0,2,5 (default: all)")
    kv_dtype: str | None = setting(None, "float K/V dtype (default: the parent's)", choices=tuple(DTYPES))
    rkv_slots: int | None = setting(None, "R-KV slots per layer and KV head, chosen again from the parent's stored "
                                    "importance and keys (default: the parent's; 0 drops them)")
    rkv_lambda: float | None = setting(None, "R-KV's weight of importance against redundancy (default: the parent's)")
    rkv_select: str | None = setting(None, "rkv, even (evenly spaced slots) or results (the calculator results' "
                                     "tokens); default: the parent's", choices=SELECTS)
    progress: bool = setting(True, "show a progress bar")


def parent_identity(m: dict) -> kc.CacheIdentity:
    """The identity stage 1 gave the parent (recorded in its manifest, or rebuilt from the
    manifest of a cache written before it was recorded), checked against its fingerprint."""
    if "identity" in m:
        ident = kc.CacheIdentity(**{**m["identity"], "logits_topk": m["identity"].get("logits_topk", 0),
                                    "kv_quant": m["identity"].get("kv_quant"),
                                    "token_logprobs": m["identity"].get("token_logprobs", False)})
        if ident.fingerprint == m["fingerprint"]:
            return ident
    t = m["teacher"]
    quant = {k: v for k, v in t["quantization"].items() if k not in ("cpu_kernel", "cpu_plain_modules")}
    ident = kc.CacheIdentity(
        teacher={k: t.get(k) for k in ("name", "revision", "weights")}, quantization=quant,
        tokenizer_sha256=m["tokenizer"]["sha256"], dataset={k: v for k, v in m["dataset"].items() if k != "seed"},
        prompt_template=m["prompt_template"], max_length=m["max_length"], layers=list(m["layers"]),
        kv_dtype=m["kv_dtype"], format=m["format"], shard_mb=m.get("shard_mb", 128.0),   # the default, if unrecorded
        schema_version=m["schema_version"], logits_topk=m.get("logits_topk") or 0, kv_quant=_scheme(m.get("kv_quant")))
    if ident.fingerprint != m["fingerprint"]:
        raise KavaError(f"cannot rebuild the identity of the cache with fingerprint {m['fingerprint']} from its "
                        "manifest (written by another kava?); re-extract it with stage 1 instead")
    return ident


def _scheme(q: dict | None) -> dict | None:
    """The identity part of a manifest's kv_quant (without what was measured)."""
    return {k: v for k, v in q.items() if k not in ("bytes_per_token", "k_cosine", "v_cosine")} if q else None


def rkv_settings(a: RecompressArgs, m: dict) -> tuple[int, float]:
    """The new cache's R-KV slots and lambda. Choosing slots again needs the parent's stored
    importance and the float keys stage 1 chose from: a parent with R-KV slots, its K/V not
    quantized, the float dtype kept (the importance was computed from keys in it)."""
    has = m.get("rkv_slots") or 0
    slots = has if a.rkv_slots is None else a.rkv_slots
    lam = (m.get("rkv_lambda") if a.rkv_lambda is None else a.rkv_lambda) if slots else 0.0
    if slots < 0 or not 0.0 <= (lam or 0.0) <= 1.0:
        raise KavaError(f"--rkv-slots must be >= 0 and --rkv-lambda in [0, 1], got {slots} and {lam}")
    if slots and not has:
        raise KavaError(f"--rkv-slots {slots}: {a.cache} was made without --rkv-slots, so it holds no importance "
                        "to choose slots from; run stage 1 with --rkv-slots")
    if slots and m.get("kv_quant"):
        raise KavaError(f"{a.cache}: its K/V are quantized, and R-KV slots are chosen from the float keys stage 1 "
                        "saw; give --rkv-slots 0, or recompress from the float parent")
    if slots and a.kv_dtype not in (None, m["kv_dtype"]):
        raise KavaError(f"--kv-dtype {a.kv_dtype} with R-KV slots: the stored importance was computed from "
                        f"{m['kv_dtype']} keys; keep the dtype or give --rkv-slots 0")
    return slots, lam


def recompress(a: RecompressArgs, log=print) -> Path:
    src = kc.open_cache(a.cache, verify=True)
    m = src.manifest
    slots, lam = rkv_settings(a, m)
    if m.get("kv_quant") and a.kv_dtype is None:
        raise KavaError(f"{a.cache}: its K/V are quantized already; give --kv-dtype for the float values "
                        "the new cache starts from")
    if a.kv_quant_v_symmetric and a.kv_quant == "none":
        raise KavaError("--kv-quant-v-symmetric needs --kv-quant int8 or int4")
    q = KVQuant.parse(a.kv_quant, a.kv_quant_group, a.kv_quant_v_span, a.kv_quant_v_symmetric)
    if q:
        q.check_geometry(m["num_kv_heads"], m["head_dim"])
    layers = list(m["layers"]) if a.layers is None else list(a.layers)
    missing = [l for l in layers if l not in m["layers"]]
    if missing:
        raise KavaError(f"--layers {missing}: {a.cache} stores layers {m['layers']}")
    parent = parent_identity(m)
    ident = kc.CacheIdentity(**{**asdict(parent), "layers": layers, "kv_dtype": a.kv_dtype or m["kv_dtype"],
                                "kv_quant": q.describe() if q else None, "rkv_slots": slots,
                                "rkv_lambda": lam if slots else 0.0,
                                "rkv_select": (a.rkv_select or m.get("rkv_select") or "rkv") if slots else "rkv"})
    if ident.fingerprint == parent.fingerprint:
        raise KavaError("these settings give the parent cache itself; change --kv-quant, --layers, --kv-dtype "
                        "or the R-KV settings")
    name = Path(a.cache).resolve().name
    stem = name[:-len(parent.fingerprint)] if name.endswith(parent.fingerprint) else name + "-"
    out = Path(a.out) if a.out else Path(a.cache).resolve().parent
    dest = out / f"{stem}{ident.fingerprint}"
    if kc.is_complete(dest, ident.fingerprint):
        log(f"{dest}: complete already")
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    n = len(m["shards"])
    done = kc.completed_shards(dest, verify=range(n))
    kc.remove_partial_files(dest, set(range(n)) - set(done))
    log(f"{a.cache} -> {dest}: {n} shards, {len(done)} done before; layers {layers}, "
        f"{ident.kv_dtype}, K/V quantization {a.kv_quant}")
    entries = _write_shards(src, dest, ident, layers, q, done, a.progress)
    geometry = KVGeometry(m["num_layers"], m["num_attention_heads"], m["num_kv_heads"], m["head_dim"], m["rope"])
    stats = {k: m[k] for k in ("rows_without_final_answer", "truncated_samples") if k in m}
    manifest = kc.build_manifest(ident, teacher=m["teacher"], tokenizer=m["tokenizer"], dataset=m["dataset"],
                                 geometry=geometry, entries=entries, skipped=m["skipped_rows"], stats=stats,
                                 software=software_versions())
    manifest["parent"] = {"fingerprint": parent.fingerprint, "path": str(Path(a.cache).resolve())}
    if (Path(a.cache) / TOKENIZER_DIR).is_dir():        # the teacher's tokenizer travels with its K/V
        save_teacher_tokenizer(Path(a.cache) / TOKENIZER_DIR, dest)
    kc.write_manifest(dest, manifest)
    log(f"done: {manifest['total_bytes'] / 1e9:.3f} GB (parent {m['total_bytes'] / 1e9:.3f} GB) -> {dest}")
    return dest


def _write_shards(src, dest: Path, ident, layers: list[int], q, done: dict, progress: bool) -> list:
    """Every shard of `src` rewritten into `dest` (those in `done` kept): the parent's float K/V
    of `layers` in the new dtype, quantized when `q` is set."""
    from tqdm.auto import tqdm
    dtype = DTYPES[ident.kv_dtype]
    entries = []
    for i, (sh, pe) in enumerate(tqdm(src.shards(), desc="recompress",
                                      unit="shard", disable=not progress, ascii=True)):
        if i in done:
            entries.append(done[i])
            continue
        tensors = _float_shard(src, sh, layers, dtype)
        if ident.rkv_slots:
            tensors.update(_rkv_tensors(sh, tensors, layers, ident.rkv_slots, ident.rkv_lambda, ident.rkv_select))
        e = kc.ShardEntry(index=i, fingerprint=ident.fingerprint, rows=pe["rows"], bad_samples=pe["bad_samples"],
                          num_samples=pe["num_samples"], tokens=pe["tokens"])
        if q is not None:
            tensors, e.quant = kc.quantize_shard(tensors, layers, q)
        entries.append(kc.write_shard(dest, ident.format, tensors, e))
    return entries


def _float_shard(src, sh, layers: list[int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A parent shard's tensors with float K/V (N, H, D) of `layers` in `dtype`."""
    names = [n for n in sh.names() if n.split(".")[0] not in KV_TENSORS and n != "k_group_offsets"
             and not n.startswith("rkv_")]
    out = {n: sh.read(n).clone() for n in names}
    off = out["sample_offsets"].tolist()
    q = src.kv_quant
    g = sh.read("k_group_offsets").tolist() if q is not None else None
    for l in layers:
        if q is None:
            k, v = sh.read(f"k.{l}").to(dtype), sh.read(f"v.{l}").to(dtype)
        else:
            parts = [kc.quant.read_layer(sh.read, l, (off[j], off[j + 1]), (g[j], g[j + 1]), q, dtype)
                     for j in range(len(off) - 1)]
            k, v = (torch.cat([p[x] for p in parts]) for x in (0, 1))
        out[f"k.{l}"], out[f"v.{l}"] = k.contiguous(), v.contiguous()
    if "hidden" in out:                       # --store-hidden: in the K/V's float dtype, as stage 1 stores it
        out["hidden"] = out["hidden"].to(dtype)
    return out


def _rkv_tensors(sh, tensors: dict, layers: list[int], slots: int, lam: float, how: str) -> dict[str, torch.Tensor]:
    """A shard's R-KV tensors chosen again (kava_common.rkv.choose) from the parent's stored
    importance and the float K/V in `tensors`, as stage 1 chooses them."""
    off, seg = tensors["sample_offsets"].tolist(), tensors["token_segments"].tolist()
    n, (h, d) = len(off) - 1, tensors[f"k.{layers[0]}"].shape[1:]
    results = [None] * n
    if how == "results":                     # each sample's text and token spans, as stage 1 read them
        tb, to, co = tensors["text_bytes"].numpy().tobytes(), tensors["text_offsets"].tolist(), tensors["char_offsets"]
        results = [result_tokens(tb[to[j]:to[j + 1]].decode("utf-8"), co[off[j]:off[j + 1]].tolist(), *seg[j][1])
                   for j in range(n)]
    out = {f"rkv_importance.{l}": sh.read(f"rkv_importance.{l}").clone() for l in layers}
    index = torch.empty(n, len(layers), h, slots, dtype=torch.int32)
    for li, l in enumerate(layers):
        k, v = tensors[f"k.{l}"], tensors[f"v.{l}"]
        rk, rv = torch.empty(n, h, slots, d, dtype=k.dtype), torch.empty(n, h, slots, d, dtype=v.dtype)
        for j in range(n):
            (r0, r1), a = seg[j][1], off[j]
            imp = out[f"rkv_importance.{l}"][a + r0:a + r1].t()
            sel = choose(imp, k[a + r0:a + r1].transpose(0, 1).float(), v[a + r0:a + r1].transpose(0, 1).float(),
                         slots, lam, how=how, results=results[j])
            rk[j], rv[j] = sel["k"].to(k.dtype), sel["v"].to(v.dtype)
            index[j, li] = stored_index(sel, r0)
        out[f"rkv_k.{l}"], out[f"rkv_v.{l}"] = rk, rv
    out["rkv_index"] = index
    return out


main = command(RecompressArgs, lambda a: recompress(a) and None, prog="python -m kava_common.recompress",
               description=__doc__.split("\n\n")[1],
               interrupted="interrupted: finished shards are kept; run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
