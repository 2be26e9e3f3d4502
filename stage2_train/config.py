"""Stage-2 settings: a flat dataclass of defaults, a YAML file over it, CLI flags over that."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .align import ALIGN_MODES
from .losses import LOSSES
from .projector import KINDS


@dataclass
class TrainConfig:
    student: str = ""                    # hub id or local folder of the student
    caches: list = field(default_factory=list)  # stage-1 cache folders, one per teacher
    out: str = "runs/run"                # run folder: metrics.jsonl, step-NNNNNN/, final/
    dataset: str | None = None           # if set, each cache's data set name must match
    split: str | None = None             # if set, each cache's split must match
    # schedule
    max_steps: int = 200                 # optimizer steps
    batch_size: int = 4                  # samples per micro-batch
    grad_accum: int = 1                  # micro-batches per optimizer step
    lr_student: float = 5e-5
    lr_projector: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10               # linear warmup, then cosine decay to min_lr_ratio
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0               # max global grad norm (0: off)
    optimizer: str = "adamw"             # adamw | adamw8bit (bitsandbytes)
    # model
    freeze_student: bool = False         # train the projector alone
    freeze_embeddings: bool = False      # keep the input embeddings (and a tied output head) fixed
    lora_r: int = 0                      # LoRA rank on attention projections (0: full fine-tune)
    lora_alpha: int = 16
    gradient_checkpointing: bool = False
    max_length: int = 512                # student tokens per sample
    # distillation
    projector: str = "linear"            # linear | head | mlp
    projector_shared: bool = False       # one K and one V projector for all layers
    direction: str = "student_to_teacher"  # the teacher target stays fixed; or teacher_to_student
    # (as the seed did; both sides move, which collapsed in bench/bench_learn.py: see README)
    layer_map: typing.Any = "proportional"  # or one entry per student layer: int | null | {t: w}
    align: str = "auto"                  # auto | identity | overlap | linear | segment
    loss: str = "mercator"               # mercator | mse | l1 | cosine
    alpha: float = 1.0                   # mercator: weight of (1 - cos)
    beta: float = 0.01                   # mercator: weight of the log-norm MSE
    k_weight: float = 1.0
    v_weight: float = 1.0
    layer_weights: list | None = None    # one weight per student layer (None: all 1)
    kv_weight: float = 1.0               # weight of the K/V loss in the total
    ce_weight: float = 1.0               # weight of cross-entropy on the answer tokens
    ce_chunk: int = 0                    # answer tokens per cross-entropy chunk, logits recomputed in the backward (0: all at once)
    fusion: str = "loss"                 # several teachers: loss (weighted sum) | target (fused target)
    teacher_weights: list | None = None  # fixed weights per teacher (None: equal)
    gate: str = "fixed"                  # fixed | learned (per-layer softmax; fusion target only)
    # run
    eval_samples: int = 16               # held out from training (the last rows) for cosine metrics
    log_every: int = 10                  # steps between metric lines (with held-out cosines)
    save_every: int = 100                # steps between checkpoints (0: only at the end)
    resume: str | None = None            # auto | PATH
    seed: int = 0
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    precision: str = "auto"              # auto (bf16 autocast on a bf16 GPU, else fp32) | fp32 | bf16
    num_workers: int = 0                 # DataLoader workers
    report_to: str = "none"              # none | tensorboard (scalars in RUN/tensorboard/, beside metrics.jsonl)
    progress: bool = True

    def __post_init__(self):
        p = []
        if not self.student:
            p.append("student: give a hub id or local folder")
        if not self.caches:
            p.append("caches: give at least one stage-1 cache folder (--cache)")
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "max_length"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ce_chunk < 0:
            p.append(f"ce_chunk must be >= 0 (0: no chunking), got {self.ce_chunk}")
        if self.projector not in KINDS:
            p.append(f"projector {self.projector!r}: choose one of {KINDS}")
        if self.loss not in LOSSES:
            p.append(f"loss {self.loss!r}: choose one of {sorted(LOSSES)}")
        if self.align not in ALIGN_MODES:
            p.append(f"align {self.align!r}: choose one of {ALIGN_MODES}")
        if self.direction not in ("teacher_to_student", "student_to_teacher"):
            p.append(f"direction {self.direction!r}: teacher_to_student or student_to_teacher")
        if self.fusion not in ("loss", "target"):
            p.append(f"fusion {self.fusion!r}: loss or target")
        if self.gate not in ("fixed", "learned"):
            p.append(f"gate {self.gate!r}: fixed or learned")
        if self.gate == "learned" and self.fusion != "target":
            p.append("gate learned needs fusion target (a learned gate over losses would pick the easiest teacher)")
        if self.fusion == "target" and self.direction != "teacher_to_student":
            p.append("fusion target needs direction teacher_to_student (targets fused in student space)")
        if self.teacher_weights is not None and len(self.teacher_weights) != len(self.caches):
            p.append(f"teacher_weights has {len(self.teacher_weights)} entries for {len(self.caches)} caches")
        if self.optimizer not in ("adamw", "adamw8bit"):
            p.append(f"optimizer {self.optimizer!r}: adamw or adamw8bit")
        if self.precision not in ("auto", "fp32", "bf16"):
            p.append(f"precision {self.precision!r}: auto, fp32 or bf16")
        if self.freeze_student and self.lora_r:
            p.append("freeze_student and lora_r contradict each other")
        if self.freeze_embeddings and (self.freeze_student or self.lora_r):
            p.append("freeze_embeddings is implied by freeze_student and by lora_r (embeddings stay fixed)")
        if self.report_to not in ("none", "tensorboard"):
            p.append(f"report_to {self.report_to!r}: none or tensorboard")
        if self.eval_samples < 1:
            p.append(f"eval_samples must be >= 1, got {self.eval_samples}")
        if p:
            raise ValueError("invalid stage-2 settings:\n  " + "\n  ".join(p))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_config(path: str | None, overrides: dict) -> TrainConfig:
    """Defaults, then the YAML file, then `overrides`; unknown keys are an error naming them."""
    import yaml
    values = {}
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
        values.update(data)
    values.update(overrides)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}{f' in {path}' if path else ''}; "
                         f"known: {sorted(FIELDS)}")
    return TrainConfig(**values)
