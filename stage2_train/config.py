"""Stage-2 settings: a flat dataclass of defaults, a YAML file over it, CLI flags over that."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kava_common.cli import choice_problems, coerce_settings, read_yaml, setting

from .align import ALIGN_MODES
from .losses import CHUNK_DIVERGENCES, LOSSES
from .projector import KINDS

KD_METHODS = ("topk", "uld", "chunk")
TEACHER_WEIGHTINGS = ("fixed", "confidence")


@dataclass
class TrainConfig:
    """Stage-2 settings; each field is a flag of `python -m stage2_train` and a key of its YAML
    config (kava_common.cli). Units: steps are optimizer steps, lengths are tokens."""
    student: str = setting("", "hub id or local folder of the student")
    caches: list[str] = setting(list, "stage-1 cache folder; repeat per teacher", flag="--cache",
                                repeat=True, metavar="DIR")
    out: str = setting("runs/run", "run folder: metrics.jsonl, config.yaml, step-NNNNNN/, final/")
    dataset: str | None = setting(None, "if set, each cache's data set name must match")
    split: str | None = setting(None, "if set, each cache's split must match")
    # schedule
    max_steps: int = setting(200, "optimizer steps")
    batch_size: int = setting(4, "samples per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    lr_student: float = setting(5e-5, "learning rate of the student")
    lr_projector: float = setting(1e-3, "learning rate of the projectors (and fusion gate)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    warmup_steps: int = setting(10, "linear warmup steps, then cosine decay to min_lr_ratio")
    min_lr_ratio: float = setting(0.1, "final learning rate / peak")
    grad_clip: float = setting(1.0, "max global gradient norm (0: off)")
    optimizer: str = setting("adamw", "adamw8bit is bitsandbytes' 8-bit AdamW", choices=("adamw", "adamw8bit"))
    # model
    freeze_student: bool = setting(False, "train the projector alone")
    freeze_embeddings: bool = setting(False, "keep the input embeddings (and a tied output head) fixed")
    lora_r: int = setting(0, "LoRA rank on the attention projections (0: full fine-tune)")
    lora_alpha: int = setting(16, "LoRA alpha")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward (less memory)")
    max_length: int = setting(512, "student tokens per sample")
    # distillation
    projector: str = setting("linear", "K/V projector per layer", choices=KINDS)
    projector_shared: bool = setting(False, "one K and one V projector for all layers (bottleneck: one "
                                     "for K and V)")
    bottleneck_hidden: int = setting(0, "hidden width of the bottleneck projector (0: twice its input width)")
    bottleneck_dropout: float = setting(0.1, "dropout inside the bottleneck projector")
    direction: str = setting("student_to_teacher", "student_to_teacher keeps the teacher's target fixed; "
                             "teacher_to_student moves both sides and collapsed in bench/bench_learn.py "
                             "(docs/results.md)", choices=("student_to_teacher", "teacher_to_student"))
    layer_map: Any = setting("proportional", "proportional, or one entry per student layer: a teacher "
                             "layer, null, or {teacher layer: weight} (JSON); not with projector "
                             "bottleneck, which maps all layers at once", json=True)
    align: str = setting("auto", "token alignment between tokenizers", choices=ALIGN_MODES)
    loss: str = setting("mercator", "K/V loss; relation compares K/V relations with no projector "
                        "(docs/stage2.md)", choices=tuple(sorted(LOSSES)))
    relation_weight: float = setting(0.0, "weight of the relation loss (MiniLMv2: KL between softmax(X X^T) of "
                                     "teacher and student K, and V, no projector) added to --loss")
    relation_heads: int = setting(0, "relation heads of the relation loss (0: the smaller KV head count)")
    kv_tokens: str = setting("all", "positions of the K/V loss: all tokens, or the reasoning only (the "
                             "answer's working, before ####)", choices=("all", "reasoning"))
    latent: int = setting(0, "a latent-reasoning student: M continuous steps between the question and the answer "
                          "in place of a written chain of thought, their K/V taught by the teacher's R-KV slots "
                          "(a cache made with --rkv-slots); 0: the full-sequence distillation")
    jacobi_iters: int = setting(3, "--latent: parallel (Jacobi) passes over the M latents; 0: one after another")
    latent_cot_weight: float = setting(0.0, "--latent: weight of the cross-entropy on the written chain of thought "
                                       "and answer (the student keeps its teacher mode, as in KaVa), logged as "
                                       "loss_cot")
    latent_hidden_weight: float = setting(0.0, "--latent: weight of CODI's hidden-state loss: each distilled student "
                                          "layer's output at end-of-thought, projected, against the teacher's at the "
                                          "token before its answer (a cache made with --store-hidden)")
    latent_keys: str = setting("post_rope", "--latent: the keys the K/V loss compares. post_rope: as attention used "
                               "them, the student's at its latent positions, the teacher's at its reasoning "
                               "positions; pre_rope: both before RoPE (the teacher's rotation undone from its "
                               "slots' positions), a slot matched by what it holds, not where it sat",
                               choices=("post_rope", "pre_rope"))
    latent_normalize: bool = setting(False, "--latent: divide the K/V loss's both sides by the teacher slots' std, "
                                     "per layer")
    latent_contrast: float = setting(0.0, "--latent: a temperature > 0 makes the K/V loss contrastive (InfoNCE): "
                                     "each latent's projected K (V) must be nearer, by cosine, to its own problem's "
                                     "slot than to the same slot of the batch's other problems, so what all "
                                     "problems' slots share cannot meet it; 0: the --loss match")
    alpha: float = setting(1.0, "mercator: weight of (1 - cos)")
    beta: float = setting(0.01, "mercator: weight of the log-norm MSE")
    k_weight: float = setting(1.0, "weight of the K loss")
    v_weight: float = setting(1.0, "weight of the V loss")
    layer_weights: list | None = setting(None, "one loss weight per student layer (JSON; default all 1)", json=True)
    kv_weight: float = setting(1.0, "weight of the K/V loss in the total")
    ce_weight: float = setting(1.0, "weight of cross-entropy on the answer tokens")
    kd_weight: float = setting(0.0, "weight of logit distillation from the teacher's cached next-token "
                               "log-probabilities (stage 1 --logits-topk), --kd-method says how")
    kd_method: str = setting("topk", "topk: KL from the teacher's top-K (vocabularies the same or compatible); "
                             "uld: distance between sorted probabilities at positions where both have read "
                             "the same text; chunk: likelihoods of text chunks both tokenizations cut alike "
                             "(any vocabularies; docs/stage2.md)", choices=KD_METHODS)
    kd_chunk_divergence: str = setting("binary_kl", "kd_method chunk: binarised KL of the chunk probabilities "
                                       "or abs, the plain difference of log-likelihoods",
                                       choices=CHUNK_DIVERGENCES)
    kd_chunk_temperature: float = setting(100.0, "kd_method chunk, binary_kl: chunk probabilities are "
                                          "exp(log-likelihood / this)")
    ce_tokens: str = setting("answer", "targets of cross-entropy: the answer's tokens, or every token",
                             choices=("answer", "all"))
    kd_tokens: str = setting("answer", "targets of logit distillation: the answer's tokens, or every token "
                             "(the question too)", choices=("answer", "all"))
    kd_temperature: float = setting(1.0, "temperature of logit distillation (the loss is scaled by T^2)")
    ce_chunk: int = setting(0, "answer tokens per cross-entropy chunk, logits recomputed in the backward "
                            "(0: all at once)")
    fusion: str = setting("loss", "several teachers: weighted sum of losses, or one fused target",
                          choices=("loss", "target"))
    teacher_weights: list | None = setting(None, "fixed weight per teacher (JSON; default equal)", json=True)
    teacher_weighting: str = setting("fixed", "several teachers: fixed weights, or confidence: per sample, a "
                                     "softmax over teachers of each one's mean log-probability of the "
                                     "sample's answer (caches with --logits-topk), the fixed weights as a prior",
                                     choices=TEACHER_WEIGHTINGS)
    confidence_temperature: float = setting(1.0, "teacher_weighting confidence: the softmax's temperature "
                                            "(higher: closer to the fixed weights)")
    gate: str = setting("fixed", "learned: a per-layer softmax over teachers (fusion target only)",
                        choices=("fixed", "learned"))
    # run
    eval_samples: int = setting(16, "samples held out from training (the last rows) for the cosine metrics")
    max_skipped_steps: int = setting(5, "steps in a row whose loss or gradients are not finite (and so "
                                     "update nothing) before the run stops")
    log_every: int = setting(10, "steps between metric lines (with held-out cosines)")
    save_every: int = setting(100, "steps between checkpoints (0: only at the end)")
    resume: str | None = setting(None, "auto (the newest checkpoint in --out) or a checkpoint folder")
    overwrite: bool = setting(False, "start again in an --out that holds an earlier run, deleting its "
                              "metrics, checkpoints and final/ (without it such a folder is refused)")
    seed: int = setting(0, "seed of initialisation and data order")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    precision: str = setting("auto", "auto: bf16 autocast on a bf16 GPU, else fp32",
                             choices=("auto", "fp32", "bf16"))
    num_workers: int = setting(0, "DataLoader workers reading the caches ahead of the step")
    kv_dequant: str = setting("device", "K/V of a --kv-quant cache: dequantized where the step runs, from "
                              "the codes (device: a quarter of the bytes to move for int4), or by the data "
                              "loader into float16 (loader)", choices=("device", "loader"))
    report_to: str = setting("none", "tensorboard: also write the metrics as TensorBoard scalars in "
                             "RUN/tensorboard/", choices=("none", "tensorboard"))
    progress: bool = setting(True, "show a progress bar")

    def __post_init__(self):
        p = coerce_settings(self)               # every other check needs the types right
        if p:
            raise ValueError("invalid stage-2 settings:\n  " + "\n  ".join(p))
        p += choice_problems(self)
        if not self.student:
            p.append("student: give a hub id or local folder")
        if not self.caches:
            p.append("caches: give at least one stage-1 cache folder (--cache)")
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "max_length", "max_skipped_steps"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_student", "lr_projector", "weight_decay", "grad_clip", "kv_weight", "ce_weight"):
            if getattr(self, name) < 0:
                p.append(f"{name} must be >= 0, got {getattr(self, name)}")
        p += self._loss_problems()
        p += self._teacher_problems()
        p += self._latent_problems()
        if self.freeze_student and self.lora_r:
            p.append("freeze_student and lora_r contradict each other")
        if self.freeze_embeddings and (self.freeze_student or self.lora_r):
            p.append("freeze_embeddings is implied by freeze_student and by lora_r (embeddings stay fixed)")
        if self.overwrite and self.resume:
            p.append("overwrite and resume contradict each other (resume continues the run, overwrite deletes it)")
        if self.eval_samples < 1:
            p.append(f"eval_samples must be >= 1, got {self.eval_samples}")
        if p:
            raise ValueError("invalid stage-2 settings:\n  " + "\n  ".join(p))

    def _latent_problems(self) -> list[str]:
        """What a latent-reasoning run (--latent M) supports: one teacher, the student projected
        into its space per layer, no logit distillation, no chunked or checkpointed forward."""
        if self.latent < 0 or self.jacobi_iters < 0:
            return [f"latent and jacobi_iters must be >= 0, got {self.latent} and {self.jacobi_iters}"]
        if not self.latent:
            return (["latent_keys pre_rope compares the latent steps' keys: it needs latent"]
                    if self.latent_keys != "post_rope" else []) + \
                (["latent_contrast is a K/V loss at the latent steps: it needs latent"] if self.latent_contrast else [])
        p = [f"{n} must be >= 0, got {getattr(self, n)}" for n in ("latent_cot_weight", "latent_hidden_weight",
                                                                     "latent_contrast") if getattr(self, n) < 0]
        if self.latent_contrast and self.batch_size < 2:
            p.append(f"latent_contrast contrasts the problems of a micro-batch: batch_size must be >= 2, got "
                     f"{self.batch_size}")
        if len(self.caches) != 1:
            p.append(f"latent takes one teacher's cache, got {len(self.caches)}")
        if self.kd_weight or self.ce_chunk:
            p.append("latent trains on the answer's cross-entropy and the K/V loss: drop kd_weight and ce_chunk")
        if self.projector == "bottleneck" or self.direction != "student_to_teacher" or self.loss == "relation" \
                or self.relation_weight:
            p.append("latent projects the student's K/V into the teacher's slots per layer: projector linear, "
                     "head, mlp or identity, direction student_to_teacher, no relation loss")
        return p

    def _teacher_problems(self) -> list[str]:
        """The checks of how several teachers are combined: fusion, gate, weights."""
        p = []
        if self.gate == "learned" and self.fusion != "target":
            p.append("gate learned needs fusion target (a learned gate over losses would pick the easiest teacher)")
        if self.fusion == "target" and self.direction != "teacher_to_student":
            p.append("fusion target needs direction teacher_to_student (targets fused in student space)")
        if self.teacher_weighting == "confidence" and self.fusion == "target":
            p.append("teacher_weighting confidence weighs each teacher's loss per sample: use fusion loss")
        if self.confidence_temperature <= 0:
            p.append(f"confidence_temperature must be > 0, got {self.confidence_temperature}")
        w = self.teacher_weights
        if w is not None and (any(x < 0 for x in w) or not sum(w) > 0):
            p.append(f"teacher_weights must be >= 0 with a positive sum, got {w}")
        if w is not None and len(w) != len(self.caches):
            p.append(f"teacher_weights has {len(w)} entries for {len(self.caches)} caches")
        return p

    def _loss_problems(self) -> list[str]:
        """The checks of the loss settings: logit distillation, the relation loss, which tokens,
        and the bottleneck projector's limits."""
        p = []
        if self.kd_weight < 0 or self.kd_temperature <= 0:
            p.append(f"kd_weight must be >= 0 and kd_temperature > 0, got {self.kd_weight}, {self.kd_temperature}")
        if self.kd_weight and self.ce_chunk:
            p.append("kd_weight needs the answer's logits whole; drop ce_chunk")
        if self.kd_chunk_temperature <= 0:
            p.append(f"kd_chunk_temperature must be > 0, got {self.kd_chunk_temperature}")
        if self.relation_weight < 0 or self.relation_heads < 0:
            p.append("relation_weight and relation_heads must be >= 0")
        if self.fusion == "target" and (self.loss == "relation" or self.relation_weight):
            p.append("the relation loss compares each teacher with the student on its own; use fusion loss")
        if self.ce_chunk < 0:
            p.append(f"ce_chunk must be >= 0 (0: no chunking), got {self.ce_chunk}")
        if self.projector == "bottleneck":
            if self.layer_map not in (None, "proportional"):
                p.append("projector bottleneck maps every teacher layer into every student layer; drop layer_map")
            if self.loss == "relation" or self.relation_weight:
                p.append("the relation loss pairs layers through layer_map; use another projector with it")
            if self.layer_weights is not None and self.direction == "student_to_teacher":
                p.append("layer_weights weigh student layers; the bottleneck with direction student_to_teacher "
                         "compares teacher layers (use teacher_to_student, or drop layer_weights)")
            if self.bottleneck_hidden < 0 or not 0 <= self.bottleneck_dropout < 1:
                p.append("bottleneck_hidden must be >= 0 and bottleneck_dropout in [0, 1)")
        return p

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# How a run is driven, not what it learns: a resume or a sweep's finished run may differ in them.
RUN_CONTROL = ("out", "progress", "resume", "overwrite")


def saved_settings(run) -> dict:
    """The settings a stage-2 run recorded in RUN/config.yaml, those that are TrainConfig's (the
    file holds what the run recorded beside them too); KavaError naming the file where it is
    missing or unreadable."""
    from pathlib import Path
    from kava_common import KavaError
    path = Path(run) / "config.yaml"
    try:
        saved = read_yaml(path) or {}
    except (OSError, ValueError) as e:
        raise KavaError(f"{path}: missing or unreadable ({e})") from None
    if not isinstance(saved, dict):
        raise KavaError(f"{path}: not a mapping of settings")
    return {k: v for k, v in saved.items() if k in FIELDS}


def load_config(path: str | None, overrides: dict, defaults: dict | None = None) -> TrainConfig:
    """Defaults (the dataclass's, then `defaults`), then the YAML file, then `overrides`;
    unknown keys are an error naming them."""
    values = dict(defaults or {})
    if path:
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
        values.update(data)
    values.update(overrides)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}{f' in {path}' if path else ''}; "
                         f"known: {sorted(FIELDS)}")
    return TrainConfig(**values)
