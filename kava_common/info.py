"""python -m kava_common.info CACHE|RUN [...] [--verify] [--student S]

Prints a cache's summary (teacher, geometry, samples, size, bytes per token); with --verify it
re-hashes every shard and exits 1 naming each file that does not match the manifest; with
--student it says whether the student's vocabulary is the teacher's (same, compatible or
different) and so which alignment and logit distillation stage 2 takes. Given a stage-2 run
folder, it lists its checkpoints, and with --verify checks each against its checksums.json.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from . import KavaError
from .cache import open_cache, verify_cache
from .cli import command, setting
from .integrity import folder_problems
from .vocab import describe, vocab_match


def summary(path: str) -> str:
    m = open_cache(path).meta
    t, q = m.teacher, m.teacher["quantization"]
    quant = (f"{q['bits']}-bit {q['quant_type']}{' double-quant' if q.get('double_quant') else ''}"
             if q["method"] != "none" else f"unquantized {q['dtype']}")
    if q.get("cpu_kernel"):
        plain = len(q.get("cpu_plain_modules", []))
        quant += f", bitsandbytes CPU kernel {q['cpu_kernel']}" + (f" ({plain} linears plain)" if plain else "")
    return "\n".join([
        f"cache        {Path(path)}",
        f"fingerprint  {m.fingerprint}",
        f"teacher      {t['name']} ({t['architecture']}, {quant})",
        f"data         {m.dataset.name} split {m.dataset.split}, {m.dataset.rows} rows, template {m.prompt_template}",
        f"geometry     {m.num_layers} layers (stored {len(m.layers)}: {_ranges(m.layers)}), "
        f"{m.num_kv_heads} KV heads, head_dim {m.head_dim}, {m.kv_dtype}, keys post-RoPE",
        f"samples      {m.num_samples} ({len(m.skipped_rows)} rows skipped, "
        f"{len(m.bad_samples)} bad, {m.truncated_samples} truncated at {m.max_length} tokens)",
        f"size         {m.total_bytes / 1e9:.3f} GB in {len(m.shards)} {m.format} shards, "
        f"{m.num_tokens} tokens, {m.kv_bytes_per_token} K/V bytes per token "
        f"({m.total_bytes / max(m.num_tokens, 1):.0f} on disk with metadata)",
        *_quant_lines(m),
    ])


def _quant_lines(m) -> list[str]:
    q = m.kv_quant
    if not q:
        return []
    span = "over a token's KV heads" if q.get("v_span") == "token" else "inside each head"
    if q.get("v_symmetric"):
        span += ", symmetric"
    return [f"kv quant     int{q['bits']} {q['scheme']}, group {q['group']} (value groups {span}): "
            f"{q['bytes_per_token']} K/V bytes per "
            f"token ({q['bytes_per_token'] / m.kv_bytes_per_token:.3f}x {m.kv_dtype}); reconstruction "
            f"cosine K {q['k_cosine']:.5f}, V {q['v_cosine']:.5f} (first and last sample of each shard)"]


def _ranges(xs: list[int]) -> str:
    if xs == list(range(xs[0], xs[-1] + 1)):
        return f"{xs[0]}-{xs[-1]}"
    return ",".join(map(str, xs))


@dataclass
class InfoArgs:
    """Settings of `python -m kava_common.info` (kava_common.cli)."""
    caches: list[str] = setting(list, "cache folder(s) holding manifest.json, or stage-2 run folders",
                                positional=True, metavar="CACHE")
    verify: bool = setting(False, "re-hash every shard against the manifest, and check the manifest's "
                           "counts and geometry against the shards")
    student: str | None = setting(None, "a student (hub id or local folder): is its vocabulary the teacher's "
                                  "(same, compatible or different), and what does stage 2 do with it")


def info(args: InfoArgs) -> int:
    """Every path's summary (and its check, its vocabulary case); returns the exit status."""
    status = 0
    student = None
    if args.student:
        try:
            student = _student(args.student)
        except KavaError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    for path in args.caches:
        if is_run(path):
            status = run_info(path, args.verify) or status
            continue
        try:
            print(summary(path))
        except (FileNotFoundError, ValueError, KeyError) as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            status = 1
            continue
        if args.verify:
            problems = verify_cache(path)
            for line in problems:
                print(f"CORRUPT {line}")
            n = len(open_cache(path).meta.shards)
            print(f"verify       FAILED: {len(problems)} problem(s) in the manifest or its {n} shards"
                  if problems else f"verify       ok: {n} shards match the manifest")
            status = status or int(bool(problems))
        if student is not None:
            try:
                print(f"vocabulary   student {args.student}: {describe(vocab_match(open_cache(path), *student))}")
            except KavaError as e:
                print(f"error: {path}: {e}", file=sys.stderr)
                status = 1
    return status


RUN_MARKS = ("metrics.jsonl", "config.yaml", "final")


def is_run(path: str) -> bool:
    """A stage-2 run folder (not a cache): no manifest.json, and a run's files or checkpoints."""
    p = Path(path)
    return p.is_dir() and not (p / "manifest.json").exists() and (
        any((p / m).exists() for m in RUN_MARKS) or any(p.glob("step-[0-9]*")))


def run_info(path: str, verify: bool) -> int:
    """Print a run folder's checkpoints and, with `verify`, every file that does not match its
    folder's checksums.json; returns the exit status."""
    p = Path(path)
    folders = sorted(x for x in p.glob("step-[0-9]*") if x.is_dir() and not x.name.endswith(".tmp"))
    folders += [p / "final"] if (p / "final").is_dir() else []
    print(f"run          {p}")
    print(f"checkpoints  {', '.join(x.name for x in folders) or 'none'}")
    if not verify:
        return 0
    problems = [line for x in folders for line in folder_problems(x)]
    for line in problems:
        print(f"CORRUPT {line}")
    print(f"verify       FAILED: {len(problems)} problem(s) in {len(folders)} checkpoint(s)" if problems
          else f"verify       ok: {len(folders)} checkpoint(s) match their checksums")
    return int(bool(problems))


main = command(InfoArgs, info, prog="python -m kava_common.info", description=__doc__.split("\n\n")[1])


def _student(name: str) -> tuple:
    """A student's tokenizer and the rows of its output layer (its config's vocab_size)."""
    from transformers import AutoConfig
    from .data import load_fast_tokenizer
    tok = load_fast_tokenizer(name, "student")
    try:
        rows = AutoConfig.from_pretrained(name).get_text_config().vocab_size
    except (OSError, ValueError) as e:
        raise KavaError(f"student {name!r}: no model config found ({str(e).splitlines()[0]})") from None
    return tok, rows


if __name__ == "__main__":
    sys.exit(main())
