"""Stage 1: extract per-layer K/V of one or more teachers into reusable caches."""

from kava_common import __version__, set_process_defaults

set_process_defaults()          # an entry point's package: before anything here imports torch

__all__ = ["__version__"]
