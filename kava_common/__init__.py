"""The contract between kava's stages: cache format, prompt template, data, KV geometry."""

__version__ = "0.1.0"


class KavaError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""
