"""The built-in demo: `python -m kava_demo` (tiny models, both stages, offline, CPU)."""

from kava_common import set_process_defaults

set_process_defaults()          # an entry point's package: before anything here imports torch
