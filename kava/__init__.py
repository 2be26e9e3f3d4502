"""kava: one command for every part of the toolkit (`kava --help`)."""
