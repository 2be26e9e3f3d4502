"""The stage-2 trainer: built once from a config (caches, student, distiller, data, optimizer),
then `step` by `step`. `stage2_train.train.main` runs it with checkpoints and metrics; the
benchmarks time the very same step."""

from __future__ import annotations

import math
import random
from functools import partial
from pathlib import Path

import numpy as np
import torch

from kava_common import KavaError
from kava_common.data import pad_id
from kava_common.device import resolve_device

from .build import (apply_optimizer_settings, lr_factor, make_optimizer, memory_estimate, open_teachers,
                    precision_dtype, set_trainable)
from .checkpoint import (Progress, RunState, check_finite, load_checkpoint, resume_point, rng_state,
                         save_checkpoint, save_final)
from .config import TrainConfig
from .data import Feed, collate, split_data
from .distiller import Distiller, evaluate, train_step
from .latent import LatentHead, latent_evaluate, latent_train_step
from .latent_data import LatentData, add_thought_tokens, check_slots, collate_latent
from .ranks import Torchrun, ranks_for
from .student import StudentKV, check_capture, load_student


class Trainer:
    """Everything a stage-2 run holds. `model`/`tok` may be passed in already loaded
    (benchmarks); otherwise the student is loaded as `cfg` says. The caches are opened and
    checked before the student is loaded. How the processes work together (one, or torchrun's
    ranks) is `self.ranks`' business (stage2_train.ranks)."""

    def __init__(self, cfg: TrainConfig, model=None, tok=None, echo=print):
        self.cfg, self.echo = cfg, echo
        self.device = resolve_device(cfg.device) if model is None else next(model.parameters()).device
        self.ranks = ranks_for(self.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self._setup_teachers()
        if cfg.latent:                       # before the student loads: M steps against M slots
            check_slots(self.teachers[0].cache, cfg.latent)
        self._setup_student(model, tok)
        self._build_data()
        self._setup_optimizer()
        self.prog = Progress(seed=cfg.seed, world_size=self.ranks.world)
        self.bad_rows: set[int] = set()      # samples left out for non-finite teacher K/V
        self.skipped_steps = 0               # steps without an update (non-finite loss or gradients)
        self._skipped_in_a_row = 0
        self.fwd = self.ranks.wrap(self)     # a micro-batch's loss and parts

    def _setup_teachers(self) -> None:
        self.teachers, self.s_geo = open_teachers(self.cfg, self.echo)
        self.fingerprints = [t.fingerprint for t in self.teachers]

    def _setup_student(self, model, tok) -> None:
        """The student (loaded unless given), what of it trains, the projectors and the hooks
        that capture its K/V."""
        cfg = self.cfg
        self.dtype = precision_dtype(cfg, self.device)
        if model is None:
            self.echo(memory_estimate(cfg, self.teachers, self.dtype, self.device, self.ranks.world))
            model, tok = load_student(cfg.student, self.device, self.dtype, cfg.lora_r, cfg.lora_alpha,
                                      cfg.gradient_checkpointing)
        # a latent student reads begin/end-of-thought tokens: rows for them before what trains is set
        self.thought_ids = add_thought_tokens(tok, model, self.echo) if cfg.latent else None
        # DistributedDataParallel's reducer expects a sparse gradient for a sparse embedding,
        # and a tied head makes its gradient dense: under torchrun the embedding stays dense
        set_trainable(model, cfg, sparse_tied=self.ranks.world == 1)
        self.model, self.tok = model.train(), tok
        self.distiller = Distiller(cfg, self.teachers, self.s_geo, self.s_geo.num_layers).to(self.device)
        if cfg.latent:                   # trained and saved with the projectors
            hidden = model.config.get_text_config().hidden_size
            self.distiller.latent_head = LatentHead(hidden).to(self.device)
            if cfg.latent_hidden_weight:     # CODI: each distilled layer's output into the teacher's width
                t = self.teachers[0]
                if not t.cache.meta.store_hidden:
                    raise KavaError(f"--latent-hidden-weight: {t.path} was made without --store-hidden; run stage 1 "
                                    "with it for the teacher's hidden states")
                width = t.cache.meta.teacher["hidden_size"]
                self.distiller.hidden_proj = torch.nn.ModuleList(
                    torch.nn.Linear(hidden, width) for _ in t.distilled).to(self.device)
        self.echo(f"projectors ({cfg.projector}, {cfg.direction}): "
                  f"{sum(p.numel() for p in self.distiller.parameters()):,} trainable parameters")
        self.cap = StudentKV(model, sorted({s for t in self.teachers for s, _ in t.distilled}), self.s_geo)

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        self.opt = make_optimizer(cfg, self.model, self.distiller)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
        self.params = [p for g in self.opt.param_groups for p in g["params"]]

    def state(self) -> RunState:
        """What a checkpoint saves and a resume restores, whole."""
        return RunState(self.model, self.tok, self.distiller, self.opt, self.sched, self.prog)

    def forward(self, batch) -> tuple[torch.Tensor, dict]:
        """One micro-batch's loss (with its graph) and its parts (`train_step`, or
        `latent_train_step` for a latent student)."""
        step = latent_train_step if self.cfg.latent else train_step
        return step(self.model, self.cap, self.distiller, batch, self.cfg, self.device, self.autocast)

    def _build_data(self) -> None:
        latent = LatentData(self.teachers[0].cache, self.tok, *self.thought_ids, keys=self.cfg.latent_keys) \
            if self.cfg.latent else None
        self.data, self.train_set, eval_set = split_data(self.cfg, self.teachers, self.tok, latent)
        self.collate = partial(collate_latent if latent else collate, pad_id=pad_id(self.tok))
        self.feed = Feed(self.train_set, self.collate, self.cfg, self.ranks)   # refuses too few micro-batches now
        self.eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=self.cfg.batch_size, collate_fn=self.collate,
                                                       generator=torch.Generator().manual_seed(0))

    def autocast(self):
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def first_sample(self) -> dict:
        """The first sample with finite teacher K/V, as a batch of one."""
        return next(b for b in (self.collate([self.data[i]]) for i in range(len(self.data))) if not b.get("empty"))

    def check_student_kv(self) -> None:
        """The K/V the hooks capture must equal the student's own cache on one sample."""
        check_capture(self.cap, self.model, self.first_sample(), self.dtype, self.cfg.student)

    def step(self, batches=None) -> dict:
        """One optimizer step over `grad_accum` micro-batches (default: the run's next ones);
        returns the loss parts, the gradient norm and the number of tokens."""
        parts, tokens = self.accumulate(batches)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        gn = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if math.isfinite(parts["loss"]) and math.isfinite(gn):
            self.opt.step()
            self.sched.step()
            self._skipped_in_a_row = 0
        else:
            self.skip_step(parts["loss"], gn)
        self.opt.zero_grad(set_to_none=True)
        self.prog.step += 1
        out = dict(parts, grad_norm=gn, tokens=tokens, skipped_steps=self.skipped_steps,
                   bad_samples=len(self.bad_rows))
        if self.cfg.kd_weight and self.cfg.kd_method == "topk":
            out.update(kd_ids_dropped=self.prog.kd_ids_dropped, kd_samples_skipped=self.prog.kd_samples_skipped)
        return out

    def accumulate(self, batches=None) -> tuple[dict, int]:
        """The gradients of one step's micro-batches, averaged over them (and over the ranks:
        `ranks.accumulating`); returns the loss parts (with several teachers `teacher_weights`,
        each teacher's mean over the step's samples) and the tokens (of all ranks). Top-K ids
        dropped and samples left out of logit distillation (compatible vocabularies) are
        counted in `prog`, samples left out for non-finite teacher K/V noted."""
        parts = dict.fromkeys(PARTS, 0.0)
        counts = dict.fromkeys(COUNTS, 0)
        n_teachers = len(getattr(self, "teachers", ()))
        weights = [0.0] * n_teachers if n_teachers > 1 else []   # summed over the step's samples
        n = self.cfg.grad_accum
        last = n - 1 if batches is None else len(batches) - 1
        batches = self.feed.take(self.prog) if batches is None else batches
        found = []                              # samples left out (non-finite teacher K/V)
        for i, batch in enumerate(batches):
            found += batch["bad_rows"]
            if batch.get("empty") and not self.ranks.runs_empty(i == last):
                continue
            with self.ranks.accumulating(i == last):
                loss, got = self.fwd(batch)
                (loss / n).backward()
            if batch.get("empty"):
                continue
            parts["loss"] += loss.item() / n
            for k in PARTS[1:]:
                parts[k] += got.get(k, 0.0) / n
            samples = len(batch["attention_mask"])
            weights = [w + x * samples for w, x in zip(weights, got.get("teacher_weights", ()))]
            counts["tokens"] += int(batch["attention_mask"].sum())
            counts["samples"] += samples
            counts["kd_dropped"] += batch.get("kd_dropped", 0)
            counts["kd_skipped"] += batch.get("kd_skipped", 0)
        new = [r for r in dict.fromkeys(found) if r not in self.bad_rows]
        self.note_bad_rows(self.ranks.combine(parts, counts, weights, new))
        if weights:
            parts["teacher_weights"] = [w / max(counts["samples"], 1) for w in weights]
        self.prog.kd_ids_dropped += counts["kd_dropped"]
        self.prog.kd_samples_skipped += counts["kd_skipped"]
        return parts, counts["tokens"]

    def close(self) -> None:
        """Training is over: release what holds the process group (DistributedDataParallel,
        in a reference cycle with this trainer)."""
        self.fwd = None
        self.ranks.close()

    def note_bad_rows(self, rows: list[int]) -> None:
        for r in rows:
            if r not in self.bad_rows:
                self.bad_rows.add(r)
                self.echo(f"left out sample row {r}: its teacher K/V hold NaN or Inf "
                          f"({len(self.bad_rows)} such samples so far)")

    def skip_step(self, loss: float, grad_norm: float) -> None:
        """A step whose loss or gradients are not finite updates nothing; after
        `max_skipped_steps` such steps in a row the run stops, and nothing is saved."""
        self.skipped_steps += 1
        self._skipped_in_a_row += 1
        what = f"loss {loss}, gradient norm {grad_norm}"
        if self._skipped_in_a_row >= self.cfg.max_skipped_steps:
            raise KavaError(f"step {self.prog.step + 1}: the loss or gradients were not finite for "
                            f"{self._skipped_in_a_row} steps in a row ({what}); stopped without saving, "
                            "the last checkpoint is as it was; lower the learning rates, or check the "
                            "caches with python -m kava_common.info --verify")
        self.echo(f"step {self.prog.step + 1}: {what}; no update ({self.skipped_steps} steps skipped so far)")

    def evaluate(self) -> dict:
        """The held-out metrics (`distiller.evaluate`); held-out samples left out for non-finite
        teacher K/V are named once and counted in `bad_eval_samples`."""
        if self.cfg.latent:
            out = latent_evaluate(self.model, self.cap, self.distiller, self.eval_loader, self.cfg, self.device,
                                  self.autocast)
        else:
            out = evaluate(self.model, self.cap, self.distiller, self.eval_loader, self.device, self.autocast)
        rows = out.pop("bad_eval_rows")
        if rows and not getattr(self, "_bad_eval_said", False):
            self._bad_eval_said = True
            self.echo(f"left out of the held-out metrics: sample row(s) {', '.join(map(str, rows))}: their teacher "
                      "K/V hold NaN or Inf (counted in bad_eval_samples)")
        return out

    def learning_rates(self) -> dict:
        groups = self.opt.param_groups
        return {"lr_student": groups[0]["lr"] if len(groups) > 1 else 0.0, "lr_projector": groups[-1]["lr"]}

    def resume(self, run: Path) -> bool:
        """Load the checkpoint `cfg.resume` names (auto: the newest in `run` that passes its
        checks; `checkpoint.resume_point`); returns whether one was loaded."""
        found = resume_point(self.cfg, run, self.fingerprints, self.ranks.world, self.echo)
        if found is None:
            return False
        path, taken = found
        self.prog = load_checkpoint(path, self.state(), self.ranks.rank, self.device)
        apply_optimizer_settings(self.opt, self.sched, self.cfg)
        self.echo(f"resumed from {path} at step {self.prog.step}" + (
            "; taken from this run: " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in taken.items())
            if taken else ""))
        return True

    def save(self, run: Path) -> Path:
        """A checkpoint, written by rank 0 alone (the ranks hold equal weights); the others
        wait until it is complete. Every rank checks the weights first, so that a refusal stops
        all of them rather than leaving the others waiting for rank 0. Every rank's RNG states
        are saved: dropout draws other numbers on each rank, and a resume gives each its own."""
        path = run / f"step-{self.prog.step:06d}"
        check_finite(self.state())
        rngs = self.ranks.gather(rng_state(self.device))
        return self.ranks.on_main(lambda: save_checkpoint(run, self.state(), self.cfg, self.fingerprints, rngs),
                                  default=path)

    def save_final(self, run: Path) -> None:
        check_finite(self.state())
        self.ranks.on_main(lambda: save_final(run, self.state(), self.teachers, self.s_geo, self.cfg))


PARTS = Torchrun.PARTS       # loss parts, averaged over micro-batches and ranks
COUNTS = Torchrun.COUNTS     # summed
