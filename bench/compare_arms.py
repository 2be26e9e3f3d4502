"""Paired differences between two finished arms of a bench_learn root, on one or both splits.

    python bench/compare_arms.py data_cache/bench_learn_xtok merc_w30-merc_w10 both_fixed-merc_w10

Each pair is `ARM-OTHER`; the difference is ARM minus OTHER, paired by seed and problem with the
same bootstrap as bench_learn.py's tables (bench/stats.py, paired_bootstrap). Reads only the
eval.jsonl files the run wrote, so it trains and scores nothing. Comparisons chosen after a run has
been seen are post hoc: report them as such, never as a registered result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stats import paired_bootstrap


def arm_scores(root: Path, split: str, arm: str) -> list[list[bool]] | None:
    """Per seed, per problem: correct or not; None when the arm has no scores on `split`."""
    folder = root / split / arm
    seeds = sorted(p for p in folder.glob("seed-*") if p.is_dir()) if folder.is_dir() else []
    out = []
    for seed in seeds:
        # a test arm scored from its validation student writes seed-s/eval.jsonl, a trained one
        # seed-s/<run>/eval.jsonl
        ev = seed / "eval.jsonl"
        if not ev.is_file():
            ev = seed / seed.name / "eval.jsonl"
        if not ev.is_file():
            raise SystemExit(f"error: {seed} holds no eval.jsonl; finish the run (bench_learn.py) first")
        out.append([bool(json.loads(line)["correct"]) for line in ev.read_text().splitlines()])
    return out or None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="a bench_learn.py --root folder")
    ap.add_argument("pairs", nargs="+", help="ARM-OTHER: the difference ARM minus OTHER")
    ap.add_argument("--splits", nargs="+", default=["validation", "test"])
    args = ap.parse_args(argv)
    for pair in args.pairs:
        arm, sep, other = pair.partition("-")
        if not sep or not arm or not other:
            ap.error(f"{pair!r}: write a pair as ARM-OTHER")
        for split in args.splits:
            a, b = arm_scores(args.root, split, arm), arm_scores(args.root, split, other)
            if a is None or b is None:
                print(f"{split}, {arm} - {other}: not both scored on {split}")
                continue
            d = paired_bootstrap(a, b)
            print(f"{split}, {arm} - {other}: {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
