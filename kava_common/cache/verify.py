"""Checking a cache against its manifest (`python -m kava_common.info --verify`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .format import MANIFEST, checksum_file, expected_checksum


def verify_cache(path: str | os.PathLike) -> list[str]:
    """Re-hash every shard; returns one line per problem (empty when the cache is intact)."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    problems = []
    for s in manifest["shards"]:
        f = path / s["file"]
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != s["bytes"]:
            problems.append(f"{f}: size {f.stat().st_size} bytes, manifest says {s['bytes']}")
        else:
            want = expected_checksum(s)
            algorithm = want.split(":")[0]
            if checksum_file(f, algorithm) != want:
                problems.append(f"{f}: {algorithm} checksum does not match the manifest")
    return problems

