"""Stage 2: train a student and projectors from memory-mapped teacher K/V caches."""

from kava_common import __version__, set_process_defaults

set_process_defaults()          # an entry point's package: before anything here imports torch

__all__ = ["__version__"]
