"""The size and checksum of every file in a folder, recorded beside them and checked later.

Stage 2 records them in each checkpoint folder (`checksums.json`, written before the folder is
renamed into place) and checks them before it resumes from one; `python -m kava_common.info RUN
--verify` checks a run folder's checkpoints the same way. The checksum is the cache's (xxh3_128,
several GB/s): it finds a flipped byte or a cut file, not a forgery.
"""

from __future__ import annotations

import json
from pathlib import Path

from .cache.format import CHECKSUM, checksum_file

RECORD = "checksums.json"


def record_folder(folder: Path) -> dict:
    """Write `folder/checksums.json` listing every other file under `folder` (relative path,
    bytes, checksum); returns the record."""
    folder = Path(folder)
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != RECORD):
        files[f.relative_to(folder).as_posix()] = {"bytes": f.stat().st_size, "checksum": checksum_file(f)}
    record = {"algorithm": CHECKSUM, "files": files}
    (folder / RECORD).write_text(json.dumps(record, indent=1), encoding="ascii")
    return record


def folder_problems(folder: Path) -> list[str]:
    """What is wrong with `folder` against its checksums.json: one line per file that is missing,
    of another size or another checksum (empty when it is intact); a folder without a readable
    record is one problem."""
    folder = Path(folder)
    try:
        record = json.loads((folder / RECORD).read_text())
        files = record["files"]
    except FileNotFoundError:
        return [f"{folder}: no {RECORD} (written by an older kava, or not written to the end)"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return [f"{folder / RECORD}: not a readable record ({e})"]
    problems = []
    for name, want in files.items():
        f = folder / name
        if not f.is_file():
            problems.append(f"{f}: missing (the record lists it)")
        elif f.stat().st_size != want["bytes"]:
            problems.append(f"{f}: {f.stat().st_size} bytes, the record says {want['bytes']}")
        elif checksum_file(f, want["checksum"].split(":")[0]) != want["checksum"]:
            problems.append(f"{f}: checksum does not match the record")
    return problems
