"""Data sets with GSM8K's fields (`question`, `answer`): the hub copy, a local file, or synthetic.

`load_rows(spec, split)` returns a `Rows` with the rows and an identity (name, split, count,
content hash) that goes into the cache manifest, so stage 2 can check it trains on the same data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .synthetic import SYNTHETIC, SYNTHETIC_SIZES, synthetic_problems

HUB_GSM8K = ("openai/gsm8k", "main")


@dataclass
class Rows:
    name: str
    split: str
    questions: list[str]
    answers: list[str]

    def __len__(self) -> int:
        return len(self.questions)

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for q, a in zip(self.questions, self.answers):
            h.update(json.dumps([q, a], ensure_ascii=True).encode())
        return h.hexdigest()

    def identity(self) -> dict:
        return {"name": self.name, "split": self.split, "rows": len(self),
                "content_sha256": self.content_hash()}


def load_fast_tokenizer(name: str, role: str, revision: str | None = None):
    """A model's fast tokenizer (character offsets need one), checked to encode text: a folder
    without its tokenizer files loads as an empty tokenizer that turns every text into nothing.
    `role` (teacher, student) names it in errors."""
    from transformers import AutoTokenizer
    from . import KavaError
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as e:
        raise KavaError(f"{role} {name!r}: no tokenizer could be loaded ({str(e).splitlines()[0]})") from e
    if not getattr(tok, "is_fast", False):
        raise KavaError(f"{role} {name!r}: a fast tokenizer is needed (character offsets); "
                        "this one is a slow Python tokenizer")
    probe = "Question: Tom has 3 apples."
    if len(tok) < 2 or not tok(probe, add_special_tokens=False)["input_ids"]:
        raise KavaError(f"{role} {name!r}: its tokenizer has {len(tok)} tokens and encodes {probe!r} into "
                        "none; the tokenizer files (tokenizer.json, tokenizer_config.json) are missing or empty")
    return tok


def pad_id(tok) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS, else 0."""
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def tokenizer_identity(tok) -> dict:
    """Name, vocabulary size, a hash of a fast tokenizer's full definition, and its BOS and
    EOS ids (None where it has none)."""
    blob = tok.backend_tokenizer.to_str().encode()
    return {"name": getattr(tok, "name_or_path", ""), "vocab_size": len(tok),
            "sha256": hashlib.sha256(blob).hexdigest(), "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id}


def load_rows(spec: str, split: str = "train", max_samples: int | None = None,
              seed: int = 0) -> Rows:
    """Load rows from `gsm8k` (hub), `synthetic`, `synthetic-hard` or `synthetic-varied`
    (generated from `seed`), or a local PATH."""
    if spec in SYNTHETIC:
        steps, max_start, varied = SYNTHETIC[spec]
        n = max_samples if max_samples is not None else SYNTHETIC_SIZES.get(split, 200)
        qs, ans = zip(*synthetic_problems(n, split, seed, steps, max_start, varied=varied)) if n else ((), ())
        return Rows(f"{spec}-seed{seed}", split, list(qs), list(ans))
    if spec == "gsm8k":
        import datasets
        ds = datasets.load_dataset(*HUB_GSM8K, split=split)
        name = "gsm8k"
    else:
        ds, name = _load_local(Path(spec), split), str(Path(spec).resolve())
    missing = {"question", "answer"} - set(ds.column_names)
    if missing:
        raise ValueError(f"data set {spec!r} (split {split!r}) lacks column(s) {sorted(missing)}; "
                         f"it has {ds.column_names}")
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    qs, ans = ds["question"], ds["answer"]
    for i, (q, a) in enumerate(zip(qs, ans)):
        if not isinstance(q, str) or not isinstance(a, (str, type(None))):
            raise ValueError(f"data set {spec!r} row {i}: `question` and `answer` must be text, "
                             f"got {type(q).__name__} and {type(a).__name__}")
    no_answer = [i for i, a in enumerate(ans) if a is None]
    if no_answer:
        raise ValueError(f"data set {spec!r} (split {split!r}): {len(no_answer)} row(s) have no `answer` "
                         f"(rows {', '.join(map(str, no_answer[:5]))}{', ...' if len(no_answer) > 5 else ''}); "
                         "kava trains and evaluates on question and answer")
    if not qs:
        raise ValueError(f"data set {spec!r} (split {split!r}) has no rows")
    return Rows(name, split, list(qs), list(ans))


def _load_local(path: Path, split: str):
    import datasets
    if not path.exists():
        raise FileNotFoundError(f"--dataset {path}: no such file or folder "
                                "(use 'gsm8k', 'synthetic' or a path)")
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path}: no split {split!r}; it has {list(ds)}")
            ds = ds[split]
        return ds
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    kind = {".json": "json", ".parquet": "parquet"}.get(path.suffix)
    if kind is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r} "
                         "(use .jsonl, .json, .parquet or a saved datasets folder)")
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parse errors in several types
        raise ValueError(f"{path}: could not be read as {kind}: {e}") from e


def _read_jsonl(path: Path):
    """A .jsonl file as a `datasets.Dataset`, every problem reported with its line number."""
    import datasets
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    rows, lines = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}: line {n} is not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {n} is a {type(row).__name__}, expected an object with "
                             "`question` and `answer`")
        rows.append(row)
        lines.append(n)
    if not rows:
        raise ValueError(f"{path}: no rows (the file is empty)")
    keys = {k for r in rows for k in r}
    for k in sorted(keys):       # one type per column: pyarrow refuses a mix with a traceback
        typed = [(n, type(r[k])) for n, r in zip(lines, rows) if r.get(k) is not None]
        odd = next(((n, t) for n, t in typed if t is not typed[0][1]), None)
        if odd:
            raise ValueError(f"{path}: line {odd[0]}: `{k}` is {odd[1].__name__}, but line {typed[0][0]} has "
                             f"{typed[0][1].__name__}; every row of a column must hold the same type")
    return datasets.Dataset.from_dict({k: [r.get(k) for r in rows] for k in keys})
