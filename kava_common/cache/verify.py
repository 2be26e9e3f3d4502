"""Checking a cache against its manifest (`python -m kava_common.info --verify`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .format import MANIFEST, map_safetensors, shard_problem
from .quant import KVQuant
from .shard import Shard


def verify_cache(path: str | os.PathLike) -> list[str]:
    """Re-hash every shard and check the manifest against itself and against the shards'
    tensor shapes; returns one line per problem (empty when the cache is intact)."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    problems = manifest_problems(path / MANIFEST, manifest)
    for s in manifest["shards"]:
        f = path / s["file"]
        problem = shard_problem(f, s)
        if problem:
            problems.append(f"{f}: {problem}")
        else:
            shapes = shape_problems(f, manifest, s)
            problems += shapes or topk_problems(f, manifest, s)
    return problems


def topk_problems(f: Path, m: dict, entry: dict) -> list[str]:
    """Top-K ids of shard `f` outside the teacher's output rows (negative, or at or past the
    manifest's teacher vocab_size where it records one), naming the first sample with one."""
    if not m.get("logits_topk"):
        return []
    sh = Shard(f, m["format"])
    ids, off = sh.read("topk_ids"), sh.small("sample_offsets")
    rows = m["teacher"].get("vocab_size")
    bad = (ids < 0).any(1) | ((ids >= rows).any(1) if rows else False)
    if not bool(bad.any()):
        return []
    import numpy as np
    j = int(np.searchsorted(off, int(bad.nonzero()[0][0]), side="right")) - 1
    mine = ids[int(off[j]):int(off[j + 1])]
    lo, hi = int(mine.min()), int(mine.max())
    return [f"{f}: top-K ids outside the teacher's {rows or '?'} output rows (sample row {int(sh.small('rows')[j])}, "
            f"ids from {lo} to {hi})"]


def manifest_problems(where: Path, m: dict) -> list[str]:
    """The manifest's counts and sizes against each other."""
    out = []
    shards = m["shards"]
    if sum(s["num_samples"] for s in shards) != m["num_samples"]:
        out.append(f"{where}: num_samples {m['num_samples']}, but its shards hold "
                   f"{sum(s['num_samples'] for s in shards)}")
    if sum(s["tokens"] for s in shards) != m.get("num_tokens", sum(s["tokens"] for s in shards)):
        out.append(f"{where}: num_tokens {m['num_tokens']}, but its shards hold {sum(s['tokens'] for s in shards)}")
    first = 0
    for s in shards:
        if s.get("first_sample", first) != first:
            out.append(f"{where}: {s['file']} starts at sample {s['first_sample']}, expected {first}")
        first += s["num_samples"]
    from ..geometry import dtype_bytes
    bpt = len(m["layers"]) * 2 * m["num_kv_heads"] * m["head_dim"] * dtype_bytes(m["kv_dtype"])
    if m.get("kv_bytes_per_token", bpt) != bpt:
        out.append(f"{where}: kv_bytes_per_token {m['kv_bytes_per_token']}, but {len(m['layers'])} layers x 2 "
                   f"x {m['num_kv_heads']} KV heads x head_dim {m['head_dim']} in {m['kv_dtype']} is {bpt}")
    if any(not 0 <= l < m["num_layers"] for l in m["layers"]):
        out.append(f"{where}: layers {m['layers']} outside 0..{m['num_layers'] - 1}")
    return out


def shape_problems(f: Path, m: dict, entry: dict) -> list[str]:
    """The tensors of shard `f` against the geometry and counts the manifest gives."""
    shapes = _shapes(f, m["format"])
    want = {"sample_offsets": (entry["num_samples"] + 1,), "input_ids": (entry["tokens"],)}
    q = m.get("kv_quant")
    for l in m["layers"]:
        for kind in ("k", "v"):
            want[f"{kind}.{l}"] = (entry["tokens"], m["num_kv_heads"], m["head_dim"] * q["bits"] // 8 if q
                                   else m["head_dim"])
        if q:
            kq, h, d = KVQuant.from_manifest(q), m["num_kv_heads"], m["head_dim"]
            want[f"v_scale.{l}"] = (entry["tokens"], h * d // kq.v_channels(h, d),
                                    kq.v_channels(h, d) // kq.v_group(h, d))
            if not kq.v_symmetric:
                want[f"v_low.{l}"] = want[f"v_scale.{l}"]
    if m.get("logits_topk"):
        want["topk_ids"] = want["topk_logprobs"] = (entry["tokens"], m["logits_topk"])
    if m.get("token_logprobs"):
        want["token_logprobs"] = (entry["tokens"],)
    if m.get("rkv_slots"):
        h, d, slots, n = m["num_kv_heads"], m["head_dim"], m["rkv_slots"], entry["num_samples"]
        for l in m["layers"]:
            want[f"rkv_k.{l}"] = want[f"rkv_v.{l}"] = (n, h, slots, d)
            want[f"rkv_importance.{l}"] = (entry["tokens"], h)
        want["rkv_index"] = (n, len(m["layers"]), h, slots)
    if m.get("store_hidden"):
        want["hidden"] = (entry["num_samples"], m["num_layers"], m["teacher"]["hidden_size"])
    out = []
    for name, shape in want.items():
        got = shapes.get(name)
        if got is None:
            out.append(f"{f}: no tensor {name!r} (the manifest's layers are {m['layers']})")
        elif tuple(got[0]) != shape:
            out.append(f"{f}: {name} is shaped {list(got[0])}, the manifest implies {list(shape)} "
                       f"(num_kv_heads {m['num_kv_heads']}, head_dim {m['head_dim']})")
        elif name[:2] in ("k.", "v.") and got[1] != ("uint8" if q else m["kv_dtype"]):
            out.append(f"{f}: {name} is {got[1]}, the manifest says kv_dtype {m['kv_dtype']}")
    return out


def _shapes(f: Path, fmt: str) -> dict[str, tuple[list[int], str]]:
    """{tensor: (shape, dtype name)} from a shard's header."""
    if fmt == "safetensors":
        mm, index = map_safetensors(f)
        try:
            return {k: (shape, str(dtype).replace("torch.", "")) for k, (dtype, shape, _, _) in index.items()}
        finally:
            mm.close()
    import h5py
    with h5py.File(f, "r") as h:
        return {k: (list(h[k].shape), h[k].attrs.get("torch_dtype") or str(h[k].dtype)) for k in h.keys()}
