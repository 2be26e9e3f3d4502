"""kava: one command for every part of the toolkit (`kava --help`)."""

from kava_common import set_process_defaults

set_process_defaults()          # an entry point's package: before anything here imports torch
