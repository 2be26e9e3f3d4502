"""The contract between kava's stages: cache format, prompt template, data, KV geometry.

The rule of this package: it is the contract and what the contract needs, nothing more. It
imports no stage (tests/test_layout.py checks), and importing it changes nothing in the
process: settings that shape the process (torch's allocator, below) are applied by the entry
points, the stage packages and the benchmarks, once, before they import torch. Test and demo
helpers (tiny models, tokenizers trained locally) live in kava_demo.tiny, benchmark-only code
in bench/; the synthetic problems stay here (kava_common.synthetic) because stage 1 reads them
as a data set (`--dataset synthetic`), and no package may import one above it.
"""

import functools
import os
from contextlib import contextmanager
from pathlib import Path

__version__ = "0.1.0"


def set_process_defaults() -> None:
    """Settings of the process that torch reads at its first allocation, so to be applied
    before torch is imported: THP_MEM_ALLOC_ENABLE=1 makes torch's CPU allocator ask for
    transparent huge pages (madvise) for tensors of 2 MB and more, one page fault per 2 MB
    instead of per 4 KB for the large tensors a CPU step allocates each time (glibc hands
    allocations above 32 MB back to the OS); it speeds up CPU steps and teacher forwards by a
    quarter or more (docs/benchmarks.md), and does nothing for a GPU's memory or where the
    kernel's THP mode is "never". A value already set (THP_MEM_ALLOC_ENABLE=0) is kept."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


class KavaError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


@contextmanager
def no_hf_progress_bars():
    """Inside: transformers' own progress bars (loading and saving weights) are off. They draw
    Unicode blocks between the lines of kava's ASCII progress bar; kava prints its own line
    before a load. transformers' setting is restored on the way out."""
    from transformers.utils import logging as hf_logging
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


SOFTWARE = ("torch", "transformers", "bitsandbytes", "safetensors", "h5py", "numpy", "tokenizers", "peft")


def software_versions() -> dict:
    """Versions of Python, kava and the packages whose behaviour shapes a cache or a run
    (None where one is not installed); read from package metadata, nothing is imported."""
    import platform
    from importlib import metadata
    out = {"python": platform.python_version(), "kava": __version__}
    for name in SOFTWARE:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """/proc/cpuinfo's fields for the first CPU (empty where there is no such file)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is none)."""
    return frozenset(_cpuinfo().get("flags", "").split())


def machine_description() -> str:
    """One line naming this machine for benchmark output: the CPU model, whether it has
    AVX512-BF16 (bitsandbytes' packed 4-bit kernel) and AMX (fast bf16 matrix products, which
    speed up bitsandbytes' plain 4-bit path), cores, and the GPU when there is one."""
    import platform
    model = _cpuinfo().get("model name") or platform.processor() or platform.machine()
    flags = cpu_flags()
    bf16 = "AVX512-BF16" if "avx512_bf16" in flags else "no AVX512-BF16"
    amx = ", AMX-BF16" if "amx_bf16" in flags else ""
    desc = f"{model} ({bf16}{amx}), {os.cpu_count()} cores"
    import torch
    if torch.cuda.is_available():
        desc += f"; GPU {torch.cuda.get_device_name()}"
    return desc


def all_finite(t) -> bool:
    """Whether every element of tensor `t` is finite. A tensor's minimum and maximum are
    finite exactly when every element is (NaN propagates through both): one pass, no
    tensor of flags the size of `t`."""
    import torch
    return t.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def _drop_kernels_hub_line(record) -> bool:
    return "kernels-community" not in record.getMessage()


def import_bitsandbytes():
    """`import bitsandbytes`, without its "Failed to load CPU gemm_4bit_forward from
    kernels-community" warning. On a CPU with AVX512-BF16, bitsandbytes tries to fetch an
    optional 4-bit kernel from the Hugging Face hub through the `kernels` package; when that
    package is absent (kava does not install it: it downloads code at run time) bitsandbytes
    uses the same kernel compiled into its own library, which is what runs here, offline.
    Only that one message is dropped; every other bitsandbytes warning still shows."""
    import logging
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_kernels_hub_line)  # addFilter skips a repeat
    import bitsandbytes
    return bitsandbytes


def check_output_folder(path, flag: str) -> None:
    """Refuse, naming it, an output folder that is, or lies under, a file."""
    path = Path(path)
    for p in [path, *path.parents]:
        if p.exists() and not p.is_dir():
            raise KavaError(f"{flag} {path}: {p} is a file, not a folder")


def save_pretrained(model, tok, path) -> Path:
    """`model.save_pretrained` and `tok.save_pretrained` into one folder (loadable with
    `from_pretrained`), without transformers' progress bar."""
    with no_hf_progress_bars():
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return Path(path)
