"""Data sets with GSM8K's fields (`question`, `answer`): the hub copy, a local file, or synthetic.

`load_rows(spec, split)` returns a `Rows` with the rows and an identity (name, split, count,
content hash) that goes into the cache manifest, so stage 2 can check it trains on the same data.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

HUB_GSM8K = ("openai/gsm8k", "main")
SYNTHETIC_SIZES = {"train": 2000, "test": 200}
# named synthetic variants: (steps per problem, largest starting count, varied wording)
SYNTHETIC = {"synthetic": ((2, 3), 50, False), "synthetic-hard": ((3, 4), 99, False),
             "synthetic-varied": ((2, 3), 50, True)}


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


# --- synthetic GSM8K-format problems --------------------------------------------------------

_NAMES = ["Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kim", "Liam"]
_ITEMS = ["apples", "pens", "stamps", "marbles", "books", "shells", "cards", "coins"]


def synthetic_problems(n: int, split: str = "train", seed: int = 0, steps: tuple[int, int] = (2, 3),
                       max_start: int = 50, slip_rate: float = 0.0, varied: bool = False) -> list[tuple[str, str]]:
    """`n` word problems in GSM8K's format: calculator notes `<<a*b=c>>` and a `#### N` line.

    Each problem starts from a count and applies `steps` operations (buy bags, give away, share
    equally, double); every intermediate value is a non-negative integer. The split name is
    part of the seed, so train and test draw different problems.

    `varied`: each worked step is written in one of three wordings, and the operands of a sum or
    product in either order, drawn at random, as written solutions vary: the next token of an
    answer is then uncertain where the wording is, and a teacher's predicted distribution says
    more than the one text (what logit distillation can pass on).

    `slip_rate`: the share of problems whose worked answer holds one arithmetic slip, a step's
    result off by 1 to 9, carried through the later steps to a wrong `####` line: labels noisier
    than a good teacher's predictions, as in data sets of written or generated solutions. Slips
    are drawn from their own stream, so the problems without one are those of `slip_rate` 0.
    """
    rng = random.Random(f"kava-synthetic-{seed}-{split}")
    slips = random.Random(f"kava-synthetic-slip-{seed}-{split}")
    out = []
    for _ in range(n):
        n_steps = rng.randint(*steps)
        state = rng.getstate()
        out.append(_one_problem(rng, n_steps, max_start, varied=varied))
        if slips.random() < slip_rate:
            # the same draws again, from a copy: a slip changes the later numbers' ranges, and
            # the main stream must stay where the problem without a slip leaves it
            again = random.Random()
            again.setstate(state)
            slip = (slips.randrange(n_steps), slips.choice([-1, 1]) * slips.randint(1, 9))
            out[-1] = _one_problem(again, n_steps, max_start, slip, varied)
    return out


def _one_problem(rng: random.Random, n_steps: int, max_start: int,
                 slip: tuple[int, int] | None = None, varied: bool = False) -> tuple[str, str]:
    """One problem; `slip` = (step, offset) makes that step's result wrong by `offset` (kept
    non-negative by flipping its sign)."""
    say = rng.choice if varied else (lambda options: options[0])

    def calc(x, op, y, result):
        """`x op y=<<x op y=result>>result`, a sum or product in a random order when varied."""
        if varied and op in "+*" and rng.random() < 0.5:
            x, y = y, x
        return f"{x}{op}{y}=<<{x}{op}{y}={result}>>{result}"

    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    total = rng.randint(2, max_start)
    q = [f"{name} has {total} {item}."]
    a = []
    for step in range(n_steps):
        op = rng.choice(["bags", "give", "share", "double"] if total >= 2 else ["bags", "double"])
        asked, worked, new = _step(rng, op, name, item, total, say, calc)
        q.append(asked)
        a += worked
        off = 0 if slip is None or slip[0] != step else slip[1]
        if off:
            wrong = new + off if new + off >= 0 else new - off
            a[-1] = a[-1].replace(f"={new}>>{new} ", f"={wrong}>>{wrong} ")
            new = wrong
        total = new
    q.append(f"How many {item} does {name} have now?")
    a.append(f"#### {total}")
    return " ".join(q), "\n".join(a)


def _step(rng: random.Random, op: str, name: str, item: str, total: int, say, calc) -> tuple[str, list[str], int]:
    """One operation: its sentence in the question, its worked lines and the new count."""
    if op == "bags":
        bags, per = rng.randint(2, 9), rng.randint(2, 12)
        got = bags * per
        c = calc(bags, "*", per, got)
        lines = [say([f"{name} buys {c} {item}.", f"The bags hold {c} {item}.", f"That is {c} more {item}."])]
        c = calc(total, "+", got, total + got)
        lines.append(say([f"Now {name} has {c} {item}.", f"So {name} has {c} {item}.", f"In total {c} {item}."]))
        return f"{name} buys {bags} bags with {per} {item} each.", lines, total + got
    if op == "give":
        k = rng.randint(1, total - 1)
        c = calc(total, "-", k, total - k)
        return (f"{name} gives away {k} {item}.",
                [say([f"After giving away {k}, {name} has {c} {item}.", f"{name} keeps {c} {item}.",
                      f"Giving {k} away leaves {c} {item}."])], total - k)
    if op == "share":
        divisors = [d for d in range(2, 10) if total % d == 0]
        if not divisors:
            k = total % 2 + 1
            c = calc(total, "-", k, total - k)
            return (f"{name} loses {k} {item}.",
                    [say([f"{name} has {c} {item} left.", f"After losing {k}, {name} has {c} {item}.",
                          f"Losing {k} leaves {c} {item}."])], total - k)
        d = rng.choice(divisors)
        c = calc(total, "/", d, total // d)
        return (f"{name} shares them equally among {d} friends and keeps one share.",
                [say([f"One share is {c} {item}.", f"Each friend gets {c} {item}.",
                      f"Split {d} ways, one share is {c} {item}."])], total // d)
    c = calc(total, "*", 2, total * 2)
    return (f"Then the number of {item} doubles.",
            [say([f"Doubled, {name} has {c} {item}.", f"Twice as many is {c} {item}.",
                  f"{name} now has {c} {item}."])], total * 2)
