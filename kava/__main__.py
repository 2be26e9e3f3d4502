"""kava COMMAND [settings]: one command for every part of kava, beside the `python -m` forms.

    kava extract ...      stage 1: each teacher once over a data set, its K/V into a cache
    kava train ...        stage 2: a student and projectors from one or more caches
    kava eval ...         exact match of a model on GSM8K-format problems
    kava sweep SWEEP      a grid of stage-2 runs over existing caches
    kava plot METRICS     loss and cosine curves of a run
    kava info PATH ...    a cache's or run's summary; --verify checks it
    kava recompress ...   a smaller cache from a cache, without the teacher
    kava slots CACHE      how much of the teacher's answer its chain of thought's K/V slots keep
    kava demo             the built-in demo, end to end

Each command takes the settings of its `python -m` form (`kava COMMAND --help`), shares its
exit statuses (0 done, 1 an error or a bad setting in one line, 2 a usage error, 130 / 143 stopped by a signal
after saving what is kept) and its config dataclass.
"""

from __future__ import annotations

import importlib
import sys

# command: (module holding its `main`, the `python -m` form)
COMMANDS = {
    "extract": ("stage1_extract.__main__", "python -m stage1_extract"),
    "train": ("stage2_train.__main__", "python -m stage2_train"),
    "eval": ("stage2_train.evaluate", "python -m stage2_train.evaluate"),
    "sweep": ("stage2_train.sweep", "python -m stage2_train.sweep"),
    "plot": ("stage2_train.plot", "python -m stage2_train.plot"),
    "info": ("kava_common.info", "python -m kava_common.info"),
    "recompress": ("kava_common.recompress", "python -m kava_common.recompress"),
    "slots": ("stage1_extract.slot_answers", "python -m stage1_extract.slot_answers"),
    "demo": ("kava_demo.__main__", "python -m kava_demo"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: kava has no command {name!r}; it has {', '.join(COMMANDS)} (kava --help)", file=sys.stderr)
        return 2
    module, _ = COMMANDS[name]
    return importlib.import_module(module).main(rest, f"kava {name}")


if __name__ == "__main__":
    sys.exit(main())
