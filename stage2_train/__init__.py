"""Stage 2: train a student and projectors from memory-mapped teacher K/V caches."""

from kava_common import __version__  # first: kava_common sets torch's allocator options

__all__ = ["__version__"]
