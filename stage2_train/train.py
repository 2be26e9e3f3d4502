"""Stage 2: train the student (and projectors) against cached teacher K/V.

Per step: a batch of samples from the caches -> teacher K/V aligned to the student's tokens
and mapped to student layers -> projected -> loss against the student's own K/V (captured with
hooks, post-RoPE) plus cross-entropy on the answer -> AdamW with separate learning rates.
Every `log_every` steps one metrics line (also in metrics.jsonl) with the held-out cosine
beside the shuffled-target cosine; checkpoints in step-NNNNNN/; final/ at the end.

The pieces: build.py (teachers, optimizer, schedule), distiller.py (projectors, loss),
trainer.py (the run's state and its step), checkpoint.py, metrics.py.
"""

from __future__ import annotations

import signal
import time
from dataclasses import replace
from pathlib import Path

from kava_common import KavaError, check_output_folder, software_versions
from kava_common.cli import Interrupted
from kava_common.launch import end_distributed, init_distributed

from .checkpoint import clear_run, latest_checkpoint, run_files
from .config import TrainConfig
from .metrics import MetricsLog, gpu_memory
from .trainer import Trainer


class Stopped(Interrupted):
    """A run stopped by a signal (Ctrl-C, SIGTERM) before max_steps, after saving its
    checkpoint: resumable, not finished. The command line exits with 128 + the signal's number
    (130, 143), so that a batch script can tell the two apart."""

    def __init__(self, signum: int, run: Path):
        super().__init__(f"stopped by signal {signum}; resume with --resume auto (--out {run})")
        self.signum, self.run = signum, run

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def main(cfg: TrainConfig, echo=print) -> Path:
    """Train the run `cfg` describes; returns its folder. Raises Stopped after saving when a
    signal stops it early."""
    from tqdm.auto import tqdm
    if echo is print:
        echo = tqdm.write                       # log lines above the progress bar, not inside it
    rank, world, device = init_distributed(cfg.device)   # torchrun: one process per rank
    if world > 1:
        cfg = replace(cfg, device=device, progress=cfg.progress and rank == 0)
        echo = echo if rank == 0 else (lambda *a: None)
        echo(f"{world} processes (torchrun), one data-parallel rank each: global batch "
             f"{world} x {cfg.grad_accum} x {cfg.batch_size} samples")
    try:
        run, stopped = _train(cfg, world, echo)
    except RuntimeError as e:
        if world > 1 and peer_lost(e):
            other = f"rank {1 - rank}" if world == 2 else "another rank"
            raise KavaError(f"rank {rank}: {other} stopped or lost its connection ({str(e).splitlines()[0][:160]}); "
                            "this rank stops too; --resume auto continues from the last checkpoint") from e
        raise
    end_distributed()                           # not after an error: another rank may be in a collective
    if stopped is not None:
        raise Stopped(stopped, run)
    return run


def peer_lost(e: BaseException) -> bool:
    """Whether a collective failed because another rank went away (gloo or NCCL)."""
    import torch.distributed as dist
    kinds = tuple(k for k in (getattr(dist, "DistNetworkError", None),) if k is not None)
    text = str(e)
    return isinstance(e, kinds) or any(s in text for s in (
        "Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
        "Socket Timeout", "Connection refused"))


def _train(cfg: TrainConfig, world: int, echo) -> tuple[Path, int | None]:
    """The run in cfg.out, started, resumed or continued, until max_steps or a stop signal."""
    run = Path(cfg.out)
    check_run_folder(run, cfg)
    tr = Trainer(cfg, echo=echo)               # checks the caches before loading the student
    tr.check_student_kv()
    resumed = tr.resume(run)

    def open_run() -> MetricsLog:              # the run folder is rank 0's alone
        if cfg.overwrite:
            clear_run(run)
        run.mkdir(parents=True, exist_ok=True)
        import yaml
        (run / "config.yaml").write_text(yaml.safe_dump(dict(
            cfg.to_dict(), cache_fingerprints=tr.fingerprints, world_size=world,
            software=software_versions()), sort_keys=False))
        return MetricsLog(run / "metrics.jsonl", tr.prog.step if resumed else None, echo, cfg.report_to)
    log = tr.ranks.on_main(open_run)
    try:
        stopped = fit(tr, run, log)
    finally:
        if log is not None:
            log.close()
    tr.close()
    if stopped is not None:
        path = tr.save(run)
        echo(f"stopped by signal {stopped} at step {tr.prog.step}; checkpoint {path}; "
             f"resume with --resume auto")
        return run, stopped
    tr.save(run)
    tr.save_final(run)
    if tr.device.type == "cuda":
        m = gpu_memory(tr.device)
        echo(f"peak GPU memory: {m['gpu_peak_gb']:.2f} GB allocated by tensors, "
             f"{m['gpu_reserved_gb']:.2f} GB reserved by torch's caching allocator (the estimate "
             f"printed at the start also counts about 0.5 GB of CUDA context)")
    echo(f"done: {tr.prog.step} steps; student {run / 'final' / 'student'}; metrics {run / 'metrics.jsonl'}")
    return run, None


def check_run_folder(run: Path, cfg: TrainConfig) -> None:
    """Refuse, before anything is loaded or written, an --out that is not a folder or that
    holds an earlier run this one would mix with, unless --resume or --overwrite says what to
    do with it."""
    check_output_folder(run, "--out")
    found = run_files(run)
    if found and not cfg.resume and not cfg.overwrite:
        raise KavaError(f"--out {run} holds an earlier run ({', '.join(found[:4])}"
                        f"{', ...' if len(found) > 4 else ''}); pass --resume auto to continue it, "
                        "--overwrite to start again (deletes it), or choose another --out")
    if cfg.resume == "auto" and found and latest_checkpoint(run) is None:
        raise KavaError(f"--resume auto: {run} holds an earlier run ({', '.join(found[:4])}) but no "
                        "checkpoint to continue from; pass --overwrite to start again")


def fit(tr: Trainer, run: Path, log: MetricsLog) -> int | None:
    """Train until `max_steps`, logging every `log_every` steps and saving every `save_every`;
    returns the number of the signal (Ctrl-C, SIGTERM) that stopped it early, else None. `log`
    is None on ranks other than 0, which train and save nothing of their own."""
    from tqdm.auto import tqdm
    cfg = tr.cfg
    stop = {"signal": None}
    old = {s: signal.signal(s, lambda num, frame: stop.update(signal=num))
           for s in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(total=cfg.max_steps, initial=tr.prog.step, desc="stage2", disable=not cfg.progress,
               dynamic_ncols=True, ascii=True)
    t_last, tokens = time.perf_counter(), 0
    try:
        while tr.prog.step < cfg.max_steps and not tr.ranks.any(stop["signal"] is not None):
            out = tr.step()
            tokens += out.pop("tokens")
            bar.update(1)
            if log is not None and (tr.prog.step % cfg.log_every == 0 or tr.prog.step == cfg.max_steps):
                gn = out.pop("grad_norm")
                metrics = dict(out, **tr.evaluate(), **tr.learning_rates(), grad_norm=gn,
                               tokens_per_s=tokens / max(time.perf_counter() - t_last, 1e-9),
                               epoch=tr.prog.epoch, **gpu_memory(tr.device))
                log.log_dict(metrics, tr.prog.step)
                bar.set_postfix_str(f"loss {out['loss']:.3f} cosK {metrics['cos_k']:.3f} cosV {metrics['cos_v']:.3f}")
                t_last, tokens = time.perf_counter(), 0
            if cfg.save_every and tr.prog.step % cfg.save_every == 0 and tr.prog.step < cfg.max_steps:
                tr.save(run)
    finally:
        bar.close()
        for s, h in old.items():
            signal.signal(s, h)
    return stop["signal"] or (signal.SIGTERM if tr.prog.step < cfg.max_steps else None)
