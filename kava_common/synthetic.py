"""The built-in data sets `synthetic`, `synthetic-hard` and `synthetic-varied`: GSM8K-format
word problems the project generates itself, so that the demo, the tests and the learning
benchmark run with no download. `kava_common.data.load_rows` serves them by name, as stage 1's
`--dataset synthetic` asks."""

from __future__ import annotations

import random

SYNTHETIC_SIZES = {"train": 2000, "test": 200}
# named synthetic variants: (steps per problem, largest starting count, varied wording)
SYNTHETIC = {"synthetic": ((2, 3), 50, False), "synthetic-hard": ((3, 4), 99, False),
             "synthetic-varied": ((2, 3), 50, True)}

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
