"""python -m stage2_train.plot RUN/metrics.jsonl [--out PNG]: loss and cosine curves.

Draws the loss (and its K/V and cross-entropy parts) and the held-out cosine of K and V beside
the shuffled-target cosine, from the metrics file alone.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from kava_common.cli import command, setting


def plot(metrics: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = Path(metrics)
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    if not rows:
        raise ValueError(f"{metrics}: no metrics yet")
    out = Path(out) if out else metrics.with_name("curves.png")
    step = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("loss", "-"), ("loss_kv", "--"), ("loss_ce", ":")):
        a.plot(step, [r[key] for r in rows], style, label=key)
    a.set(xlabel="step", ylabel="loss", title="training loss")
    a.legend()
    for key, color in (("k", "tab:blue"), ("v", "tab:orange")):
        b.plot(step, [r[f"cos_{key}"] for r in rows], color=color, label=f"cos {key.upper()} held-out")
        b.plot(step, [r[f"cos_{key}_shuffled"] for r in rows], "--", color=color,
               label=f"cos {key.upper()} shuffled targets")
    b.set(xlabel="step", ylabel="cosine", title="held-out K/V cosine vs shuffled baseline")
    b.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


@dataclass
class PlotArgs:
    """Settings of `python -m stage2_train.plot` (kava_common.cli)."""
    metrics: str = setting("", "RUN/metrics.jsonl", positional=True)
    out: str | None = setting(None, "PNG path (default: curves.png beside the metrics)")


main = command(PlotArgs, lambda a: print(plot(a.metrics, a.out)), prog="python -m stage2_train.plot",
               description=__doc__.split("\n\n")[1])


if __name__ == "__main__":
    sys.exit(main())
