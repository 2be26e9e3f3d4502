"""Stage 1: extract per-layer K/V of one or more teachers into reusable caches."""

from kava_common import __version__  # first: kava_common sets torch's allocator options

__all__ = ["__version__"]
