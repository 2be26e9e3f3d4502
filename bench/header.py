"""The lines every benchmark prints first: when, which commit, which machine, which versions.
A figure copied into docs/ carries them."""

from __future__ import annotations

import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from kava_common import machine_description, software_versions


def commit() -> str:
    """The checked-out commit, with -dirty when tracked files differ from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return rev + ("-dirty" if dirty else "")


def header(**extra) -> str:
    import torch
    soft = ", ".join(f"{k} {v}" for k, v in software_versions().items() if v)
    more = "".join(f", {k} {v}" for k, v in extra.items())
    return (f"date {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit()}\n"
            f"machine {machine_description()}, torch threads {torch.get_num_threads()}, "
            f"torch CPU kernels {torch.backends.cpu.get_cpu_capability()}{_isa_limits()}, "
            f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}{more}\n"
            f"software {soft}")


# the variables that limit the instruction sets of torch's kernels, oneDNN and MKL (a CPU without
# AVX512 emulated on one with it), and each torch CPU capability's values of them, in each
# library's own spelling
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
ISA_LIMITS = {"AVX2": ("avx2", "AVX2", "AVX2"), "AVX512": ("avx512", "AVX512_CORE", "AVX512"),
              "DEFAULT": ("default", "SSE41", "SSE4_2")}


def isa_settings(capability: str) -> str:
    """The variables' settings that hold the three libraries to torch CPU capability `capability`."""
    return " ".join(f"{n}={v}" for n, v in zip(ISA_VARIABLES, ISA_LIMITS[capability]))


def _isa_limits() -> str:
    """The instruction-set limits set for torch's libraries, as the header names them."""
    set_ = [f"{n}={os.environ[n]}" for n in ISA_VARIABLES if os.environ.get(n)]
    return f" ({', '.join(set_)})" if set_ else ""
