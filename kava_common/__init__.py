"""The contract between kava's stages: cache format, prompt template, data, KV geometry."""

import os
from contextlib import contextmanager
from pathlib import Path

__version__ = "0.1.0"

# With this set, torch's CPU allocator asks for transparent huge pages (madvise) for tensors of
# 2 MB and more: one page fault per 2 MB instead of per 4 KB when a large tensor is allocated,
# which the CPU path does every step (glibc hands allocations above 32 MB back to the OS).
# torch reads it once, at its first allocation, so it is set here, on import, before the stages
# import torch. Measured on the 2-core machine (2026-11-23): a Qwen2.5-0.5B-shaped training step
# 10.9 -> 8.0 s; the tiny teacher's forward over 2,048 samples 9.6 -> 6.4 s. No effect on a GPU's
# memory or where the kernel's THP mode is "never". THP_MEM_ALLOC_ENABLE=0 turns it off.
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


def save_pretrained(model, tok, path) -> Path:
    """`model.save_pretrained` and `tok.save_pretrained` into one folder (loadable with
    `from_pretrained`), without transformers' progress bar."""
    with no_hf_progress_bars():
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return Path(path)
