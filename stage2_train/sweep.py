"""python -m stage2_train.sweep SWEEP.yaml: a grid of stage-2 runs against existing caches.

    out: runs/sweep1            # one folder per run under it, plus results.csv/.md/.png
    base: configs/x.yaml        # optional base settings file
    settings: {student: ..., caches: [...], max_steps: 200}   # over the base
    grid:                       # every combination of these
      loss: [mercator, mse]
      projector: [linear, head]
    eval: {dataset: synthetic, split: test, max_samples: 100}  # optional: accuracy of each student

A run whose result.json exists is skipped on a re-run (an unfinished one resumes from its last
checkpoint), if it ran with the settings the sweep gives it now: a finished run with other
settings (another cache, loss, ...) is refused, naming them, before anything trains. The table
has the grid values, the last logged loss (train_loss) and held-out cosines beside the
shuffled baseline, and the accuracy when `eval` is given.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from kava_common import KavaError
from kava_common.cli import command, read_yaml, setting

from .config import FIELDS, RUN_CONTROL, load_config, saved_settings

# metric columns; none shares a name with a setting, so a grid over `loss` stays readable
COLUMNS = ["train_loss", "loss_kv", "loss_ce", "cos_k", "cos_k_shuffled", "cos_v", "cos_v_shuffled", "accuracy"]


def run_name(values: dict) -> str:
    """A folder name for one grid point: readable, and distinct for distinct settings. Where
    the readable form loses anything (list or dict values, long or unusual text), a hash of
    the exact settings is appended."""
    parts = []
    for k, v in values.items():
        text = json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v)
        parts.append(f"{k}-{text}")
    raw = "_".join(parts)
    name = re.sub(r"[^A-Za-z0-9.=_-]+", "", raw)[:100] or "base"
    if name != raw:
        import hashlib
        exact = json.dumps(values, sort_keys=True, separators=(",", ":"))
        name += "-" + hashlib.sha256(exact.encode()).hexdigest()[:8]
    return name


def load_sweep(path: str | Path) -> dict:
    spec = read_yaml(path) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a mapping (out, base, settings, grid, eval)")
    unknown = sorted(set(spec) - {"out", "base", "settings", "grid", "eval"})
    if unknown:
        raise ValueError(f"{path}: unknown sweep key(s) {unknown}; known: out, base, settings, grid, eval")
    grid = spec.get("grid") or {}
    bad = sorted(set(grid) - set(FIELDS))
    if bad:
        raise ValueError(f"{path}: grid names unknown setting(s) {bad}")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ValueError(f"{path}: grid entry {k!r} must be a non-empty list")
    if "out" not in spec:
        raise ValueError(f"{path}: give `out`, the folder for the runs")
    return spec




def changed_settings(saved_config: Path, now: dict) -> list[str]:
    """The settings in which a run's saved config.yaml differs from `now` (a config's
    to_dict()). Paths compare resolved; a setting absent from an older config.yaml counts as
    its default."""
    try:
        saved = saved_settings(saved_config.parent)
    except KavaError:
        return ["config.yaml missing or unreadable"]

    def norm(key, value):
        if key == "student" and value:
            return str(Path(value).resolve())
        if key == "caches" and value:
            return [str(Path(c).resolve()) for c in value]
        return value

    def default(key):
        f = FIELDS[key]
        return f.default_factory() if f.default is dataclasses.MISSING else f.default
    return sorted(k for k in now if k not in RUN_CONTROL
                  and norm(k, saved[k] if k in saved else default(k)) != norm(k, now[k]))


def combos(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def run_sweep(path: str | Path, echo=print, progress: bool = True) -> list[dict]:
    from .evaluate import evaluate
    from .checkpoint import latest_checkpoint
    from .train import main as train
    spec = load_sweep(path)
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    todo = combos(spec.get("grid") or {})
    for values in todo:                 # every grid point is checked before the first one trains
        run = out / run_name(values)
        try:
            cfg = load_config(spec.get("base"), dict(spec.get("settings") or {}, **values, out=str(run)))
        except ValueError as e:
            raise ValueError(f"{path}: grid point {values}: {e}") from None
        changed = changed_settings(run / "config.yaml", cfg.to_dict()) if (run / "result.json").is_file() else []
        if changed:
            raise KavaError(f"{path}: {run} finished with other settings than the sweep gives it now "
                            f"({', '.join(changed)}); remove that folder to train it again, or give the "
                            "sweep another `out`")
    for n, values in enumerate(todo, 1):
        name = run_name(values)
        run = out / name
        result = run / "result.json"
        if result.is_file():
            echo(f"[{n}/{len(todo)}] {name}: done before, skipped")
            rows.append(json.loads(result.read_text()))
            continue
        settings = dict(spec.get("settings") or {}, **values, out=str(run), progress=progress)
        if latest_checkpoint(run) is not None:
            settings["resume"] = "auto"
        elif run.exists():              # an earlier try that stopped before its first checkpoint
            settings["overwrite"] = True
        cfg = load_config(spec.get("base"), settings)
        echo(f"[{n}/{len(todo)}] {name}: training")
        train(cfg, echo=lambda *a: None)
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        row = {"run": name, **{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in values.items()},
               "step": last["step"], "train_loss": last["loss"],
               **{k: last.get(k) for k in COLUMNS if k not in ("accuracy", "train_loss")}}
        if spec.get("eval"):
            e = dict(spec["eval"])
            r = evaluate(str(run / "final" / "student"), out=run / "eval.jsonl", progress=progress, **e)
            row["accuracy"] = r.accuracy
        result.write_text(json.dumps(row, indent=1))
        rows.append(row)
    write_tables(rows, out, list((spec.get("grid") or {}).keys()))
    return rows


def write_tables(rows: list[dict], out: Path, keys: list[str]) -> None:
    cols = ["run", *keys, "step", *[c for c in COLUMNS if any(r.get(c) is not None for r in rows)]]
    with open(out / "results.csv", "w", newline="", encoding="ascii") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot_runs(rows, out / "results.png")


def plot_runs(rows: list[dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["run"] for r in rows]
    x = range(len(rows))
    has_acc = any(r.get("accuracy") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(6 + 1.2 * len(rows), 4.5), squeeze=False)
    a = axes[0][0]
    w = 0.2
    for i, (key, label) in enumerate((("cos_k", "cos K"), ("cos_k_shuffled", "cos K shuffled"),
                                      ("cos_v", "cos V"), ("cos_v_shuffled", "cos V shuffled"))):
        a.bar([j + (i - 1.5) * w for j in x], [r.get(key) or 0 for r in rows], w, label=label)
    a.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    a.set(ylabel="held-out cosine", title="K/V cosine vs shuffled baseline")
    a.legend(fontsize=8)
    if has_acc:
        b = axes[0][1]
        b.bar(list(x), [r.get("accuracy") or 0 for r in rows], color="tab:green")
        b.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        b.set(ylabel="exact match", title="held-out accuracy", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


@dataclass
class SweepArgs:
    """Settings of `python -m stage2_train.sweep` (kava_common.cli)."""
    sweep: str = setting("", "sweep YAML file", positional=True)
    progress: bool = setting(True, "show each run's progress bar")


def sweep(a: SweepArgs) -> None:
    from .train import Stopped
    try:
        rows = run_sweep(a.sweep, progress=a.progress)
    except Stopped as e:
        print(f"sweep {e}; run the same command again to go on", file=sys.stderr)
        raise
    out = Path(load_sweep(a.sweep)["out"])
    print((out / "results.md").read_text())
    print(f"{len(rows)} runs; table {out / 'results.csv'} and {out / 'results.md'}, plot {out / 'results.png'}")


main = command(SweepArgs, sweep, prog="python -m stage2_train.sweep", description=__doc__.split("\n\n")[0],
               interrupted="interrupted: finished runs are kept; run the same command again to go on")


if __name__ == "__main__":
    sys.exit(main())
