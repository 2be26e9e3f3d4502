"""Metrics of a run: one JSON object per logged step in metrics.jsonl, a line on stdout, and
TensorBoard scalars when asked for (`--report-to tensorboard`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


REPORT_TO = ("none", "tensorboard")


class MetricsLog:
    """One JSON object per logged step in metrics.jsonl, a line on stdout and, with
    `report_to="tensorboard"`, the same numbers as TensorBoard scalars in RUN/tensorboard/.
    On a resume, what was logged after the checkpoint's step is dropped from both."""

    def __init__(self, path: Path, resume_step: int | None, echo, report_to: str = "none"):
        self.path, self.echo = path, echo
        if resume_step is not None and path.exists():     # drop lines past the checkpoint
            keep = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= resume_step]
            path.write_text("".join(l + "\n" for l in keep))
        elif resume_step is None and path.exists():
            path.unlink()
        self.tb = tensorboard_writer(path.parent / "tensorboard", resume_step) \
            if report_to == "tensorboard" else None

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def log_dict(self, metrics: dict, step: int) -> None:
        rec = {"step": step, **metrics}
        with open(self.path, "a", encoding="ascii") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                for name, x in ([(f"{k}/{i}", x) for i, x in enumerate(v)] if isinstance(v, list) else [(k, v)]):
                    self.tb.add_scalar(name, x, step)
            self.tb.flush()
        line = ("step {step:>6} | loss {loss:.4f} (kv {loss_kv:.4f}, ce {loss_ce:.4f}) | "
                "held-out cos K {cos_k:.4f} V {cos_v:.4f} (shuffled {cos_k_shuffled:.4f} / "
                "{cos_v_shuffled:.4f}) | lr {lr_student:.2e}/{lr_projector:.2e} | "
                "grad {grad_norm:.3f} | {tokens_per_s:.0f} tok/s").format(**rec)
        if "teacher_weights" in rec:
            line += " | teachers " + "/".join(f"{w:.2f}" for w in rec["teacher_weights"])
        self.echo(line)


def tensorboard_writer(logdir: Path, resume_step: int | None):
    """torch's SummaryWriter into `logdir`; events of an earlier run there are removed, or
    on a resume those after `resume_step` are purged (TensorBoard's purge_step)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        from kava_common import KavaError
        raise KavaError("--report-to tensorboard needs the tensorboard package: "
                        "pip install tensorboard (or pip install -e '.[tensorboard]')") from e
    if resume_step is None and logdir.exists():
        import shutil
        shutil.rmtree(logdir)
    return SummaryWriter(str(logdir), purge_step=None if resume_step is None else resume_step + 1)


def gpu_memory(device) -> dict:
    """Peak GPU memory so far (GB), for the metrics of a CUDA run; empty elsewhere."""
    if device.type != "cuda":
        return {}
    return {"gpu_peak_gb": torch.cuda.max_memory_allocated(device) / 1024 ** 3,
            "gpu_reserved_gb": torch.cuda.max_memory_reserved(device) / 1024 ** 3}


