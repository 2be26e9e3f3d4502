"""The built-in demo: `python -m kava_demo` (tiny models, both stages, offline, CPU)."""
