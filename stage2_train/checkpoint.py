"""Checkpoints: each a self-contained `step-NNNNNN/` folder written atomically, and `final/`.

Nothing in a checkpoint is unpickled on resume: weights are safetensors, optimizer and
scheduler state are loaded with `torch.load(weights_only=True)` (tensors and plain Python
values only), and the RNG states are stored as tensors and numbers. Each folder records the
size and checksum of every file it holds (`checksums.json`, kava_common.integrity), written
before it is renamed into place; a resume checks them and `state.json`'s fields first
(`checkpoint_problems`) and falls back to the newest checkpoint that passes."""

from __future__ import annotations

import json
import pickle
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from kava_common import KavaError, all_finite, save_pretrained
from kava_common.integrity import RECORD, folder_problems, record_folder

from .config import RUN_CONTROL


@dataclass
class Progress:
    step: int = 0        # optimizer steps done
    epoch: int = 0
    micro: int = 0       # micro-batches of this epoch already used (by each rank)
    seed: int = 0
    world_size: int = 1  # processes that trained it (torchrun); a resume needs as many
    kd_ids_dropped: int = 0       # top-K entries left out of logit distillation (not the student's tokens)
    kd_samples_skipped: int = 0   # samples left out of it (a compatible vocabulary tokenized them otherwise)


@dataclass
class RunState:
    """What a checkpoint saves and a resume restores: the student (its weights), its tokenizer,
    the projectors, the optimizer and scheduler state, and where the run stands."""
    model: torch.nn.Module
    tok: object
    distiller: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: object
    prog: Progress


# What a run writes into its folder; --overwrite removes exactly these.
RUN_FILES = ("metrics.jsonl", "config.yaml", "tensorboard", "final", "final.tmp")

# Settings that shape the model, the data order or the optimizer state a checkpoint holds: a
# resume must keep them. Every other setting (learning rates and schedule, loss weights,
# clipping, max_steps, logging, saving, workers) is taken from the resuming command line.
FIXED_ON_RESUME = ("student", "caches", "dataset", "split", "batch_size", "grad_accum", "optimizer",
                   "freeze_student", "freeze_embeddings", "lora_r", "lora_alpha", "max_length",
                   "projector", "projector_shared", "direction", "layer_map", "align", "fusion",
                   "gate", "teacher_weights", "eval_samples", "seed", "precision", "latent")


def run_files(run: Path) -> list[str]:
    """The files of an earlier run in folder `run`."""
    if not run.is_dir():
        return []
    return sorted(p.name for p in run.iterdir() if p.name in RUN_FILES or p.name.startswith("step-"))


def clear_run(run: Path) -> None:
    for name in run_files(run):
        p = run / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def resume_changes(saved: dict, cfg) -> tuple[dict, dict]:
    """Settings that differ between a checkpoint's config and this run's:
    ({setting: (old, new)} taken from this run, {setting: (old, new)} a resume cannot honour)."""
    now = cfg.to_dict()
    changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]
               and k not in RUN_CONTROL}
    refused = {k: v for k, v in changed.items() if k in FIXED_ON_RESUME}
    return {k: v for k, v in changed.items() if k not in refused}, refused


def checkpoints(run: Path) -> list[Path]:
    """A run's step-NNNNNN/ folders, oldest first."""
    return sorted(p for p in run.glob("step-[0-9]*") if p.is_dir() and not p.name.endswith(".tmp"))


def latest_checkpoint(run: Path) -> Path | None:
    steps = checkpoints(run)
    return steps[-1] if steps else None


def check_finite(state: RunState) -> None:
    """Nothing non-finite is ever saved: a NaN or Inf in any weight stops the run, naming it."""
    for name, p in list(state.model.named_parameters()) + list(state.distiller.named_parameters()):
        if not all_finite(p.detach()):
            raise KavaError(f"step {state.prog.step}: weight {name} holds NaN or Inf; not saved, the "
                            "last checkpoint is as it was; lower the learning rates")


def save_checkpoint(run: Path, state: RunState, cfg, fps: list[str], rngs: list[dict]) -> Path:
    """step-NNNNNN/ for `state.prog`, written atomically. rngs: each rank's RNG states
    (`rng_state`; one for a lone process): under torchrun each rank's dropout draws its own numbers."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        save_pretrained(state.model, state.tok, tmp / "student")
        save_file({k: v.contiguous() for k, v in state.distiller.state_dict().items()},
                  str(tmp / "projector.safetensors"))
        torch.save({"optimizer": state.opt.state_dict(), "scheduler": state.sched.state_dict()}, tmp / "optimizer.pt")
        torch.save({"ranks": rngs}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"progress": asdict(state.prog), "fingerprints": fps,
                                                    "config": cfg.to_dict()}, indent=1))
    return write_folder(run / f"step-{state.prog.step:06d}", fill)


def write_folder(final: Path, fill) -> Path:
    """`fill(tmp)` writes a checkpoint's files into a temporary folder, whose checksums are then
    recorded and which is renamed to `final`. A failed write (a full disk, a read-only folder)
    removes the temporary folder and is one line naming it; earlier checkpoints stay as they
    were."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        record_folder(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        what = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise KavaError(f"writing {final} failed ({what}); nothing of it is kept, earlier checkpoints are "
                        "as they were: free space and resume with --resume auto") from e
    except Exception as e:       # safetensors reports a full disk as its own error type
        if "No space left" not in str(e) and "os error 28" not in str(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise KavaError(f"writing {final} failed (no space left on the device); nothing of it is kept, "
                        "earlier checkpoints are as they were: free space and resume with --resume auto") from e
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def read_state(path: Path) -> dict:
    """A checkpoint's state.json, its fields checked: KavaError naming the file and what is
    wrong (not JSON, a field of the wrong type, a step outside 0..max_steps or not the
    folder's)."""
    f = path / "state.json"
    try:
        state = json.loads(f.read_text())
    except FileNotFoundError:
        raise KavaError(f"{f}: missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise KavaError(f"{f}: not valid JSON ({e})") from None
    p = state.get("progress") if isinstance(state, dict) else None
    if not isinstance(p, dict) or not isinstance(state.get("config"), dict) \
            or not isinstance(state.get("fingerprints"), list):
        raise KavaError(f"{f}: expected progress, fingerprints and config")
    known = {k: type(v) for k, v in asdict(Progress()).items()}
    bad = [k for k, v in p.items() if k not in known or type(v) is not int]
    if bad:
        raise KavaError(f"{f}: progress field(s) {bad} are not among {sorted(known)} or not whole numbers")
    max_steps = state["config"].get("max_steps")
    step = p.get("step", 0)
    if not isinstance(max_steps, int) or not 0 <= step <= max_steps or min(p.get("epoch", 0), p.get("micro", 0)) < 0 \
            or p.get("world_size", 1) < 1:
        raise KavaError(f"{f}: progress {p} is outside what a run of max_steps {max_steps} writes")
    if path.name.startswith("step-") and path.name != f"step-{step:06d}":
        raise KavaError(f"{f}: says step {step}, but the folder is {path.name}")
    return state


def checkpoint_problems(path: Path) -> list[str]:
    """What keeps a resume from `path`: files that do not match its checksums.json, or a
    state.json that does not read (empty when it passes). A checkpoint written without
    checksums.json is checked on its state alone."""
    problems = [] if not (path / RECORD).is_file() and (path / "state.json").is_file() else folder_problems(path)
    try:
        read_state(path)
    except KavaError as e:
        problems.append(str(e))
    return problems


def resume_point(cfg, run: Path, fingerprints: list[str], world: int, echo) -> tuple[Path, dict] | None:
    """The checkpoint `cfg.resume` names (auto: the newest in `run` that passes its checks), and
    the settings this run changes that a resume takes ({setting: (old, new)}); None when there
    is nothing to resume. Refused in one line: another cache, a setting a resume must keep,
    another number of processes."""
    if not cfg.resume:
        return None
    path = checkpoint_to_resume(cfg.resume, run, echo)
    if path is None:
        return None
    saved = read_state(path)
    if saved["fingerprints"] != fingerprints:
        raise KavaError(f"{path} was trained on caches {saved['fingerprints']}, this run uses {fingerprints}")
    taken, refused = resume_changes(saved["config"], cfg)
    if refused:
        raise KavaError(f"--resume {path}: " + "; ".join(f"{k} was {old!r}, this run asks for {new!r}"
                                                        for k, (old, new) in refused.items())
                        + ". A resume keeps these; give the checkpoint's values or start a new run folder")
    trained_by = saved["progress"].get("world_size", 1)
    if trained_by != world:
        how = f"torchrun --nproc-per-node {trained_by}" if trained_by > 1 else "no torchrun"
        raise KavaError(f"--resume {path}: written by {trained_by} process(es) and this run has {world}; "
                        f"each rank's place in the data order depends on that number, so resume with "
                        f"{trained_by} ({how}), or start a new run folder")
    return path, taken


def checkpoint_to_resume(resume: str, run: Path, echo) -> Path | None:
    """The checkpoint `--resume` names, checked (`checkpoint_problems`): with auto the newest in
    `run` that passes, saying in one line why a newer one was passed over; refused, naming them,
    when none passes."""
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir() or not any((path / n).exists() for n in ("state.json", RECORD)):
            raise KavaError(f"--resume {resume}: no checkpoint there (expected state.json)")
        problems = checkpoint_problems(path)
        if problems:
            raise KavaError(f"--resume {path}: {problems[0]}" + (f" (and {len(problems) - 1} more)"
                                                                if len(problems) > 1 else ""))
        return path
    failed = []
    for path in checkpoints(run)[::-1]:
        problems = checkpoint_problems(path)
        if not problems:
            if not (path / RECORD).is_file():
                echo(f"{path}: written without {RECORD} (an older kava); its files are not checked")
            if failed:
                echo(f"{failed[0][1]}; resuming from {path.name}, the newest checkpoint that passes its checks"
                     + (f" ({len(failed) - 1} more passed over)" if len(failed) > 1 else ""))
            return path
        failed.append((path, problems[0]))
    if failed:
        raise KavaError(f"--resume auto: no checkpoint in {run} passes its checks: " + "; ".join(
            f"{p.name}: {why}" for p, why in failed) + "; start again with --overwrite")
    return None


def load_checkpoint(path: Path, state: RunState, rank: int, device: torch.device) -> Progress:
    """`path`'s weights, projectors, optimizer and scheduler state into `state`'s, this rank's RNG
    states restored; returns the checkpoint's progress."""
    from safetensors.torch import load_file
    model = state.model
    saved = json.loads((path / "state.json").read_text())
    sdir = path / "student"
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, load_file(str(sdir / "adapter_model.safetensors")))
    else:
        weights = {}
        for f in sorted(sdir.glob("*.safetensors")):
            weights.update(load_file(str(f)))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise KavaError(f"{sdir}: checkpoint does not fit the student (missing {missing}, "
                            f"unexpected {unexpected})")
    state.distiller.load_state_dict(load_file(str(path / "projector.safetensors")))
    o = load_state(path / "optimizer.pt")
    state.opt.load_state_dict(o["optimizer"])
    state.sched.load_state_dict(o["scheduler"])
    rngs = load_state(path / "rng.pt")
    set_rng_state(rngs["ranks"][rank] if "ranks" in rngs else rngs, device)   # else: one process's
    return Progress(**saved["progress"])


def load_state(path: Path) -> dict:
    """A checkpoint's state file, read without unpickling Python objects: a checkpoint
    someone sent cannot run code on --resume."""
    try:   # onto the CPU: a GPU run's file then resumes on any machine, and N ranks do not all
        # read rank 0's state onto its GPU; the optimizer moves its state to its parameters' device
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise KavaError(f"{path}: holds Python objects besides tensors and plain values; kava does "
                        "not unpickle them (loading such a file can run any code)") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise KavaError(f"{path}: cannot be read ({str(e).splitlines()[0]}); the checkpoint is "
                        f"incomplete or damaged: resume from an earlier one with --resume "
                        f"{path.parent.parent}/step-NNNNNN") from e


def rng_state(device: torch.device) -> dict:
    """Every RNG's state as tensors and plain numbers, which `torch.load(weights_only=True)`
    reads back without unpickling any object; on a GPU, that of the GPU the run trains on
    (the others' would not fit a machine with fewer GPUs)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64),
                       "gauss_next": gauss_next},
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(r: dict, device: torch.device) -> None:
    """The states `rng_state` saved, the GPU's onto the GPU this run trains on (another one
    than the saving run's, or none: on a CPU the GPU's state has nothing to drive)."""
    torch.set_rng_state(r["torch"])
    n = r["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = r["python"]
    random.setstate((p["version"], tuple(p["words"].tolist()), p["gauss_next"]))
    cuda = r["cuda"]
    if isinstance(cuda, list):          # a checkpoint holding every visible GPU's state: this one's
        cuda = cuda[device.index or 0] if device.type == "cuda" and (device.index or 0) < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def save_final(run: Path, state: RunState, teachers, s_geo, cfg) -> None:
    """final/: the student (LoRA merged into it), its tokenizer, the projectors and what they map."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        model = state.model
        student = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        save_pretrained(student, state.tok, tmp / "student")
        save_file({k: v.contiguous() for k, v in state.distiller.state_dict().items()},
                  str(tmp / "projector.safetensors"))
        (tmp / "projector.json").write_text(json.dumps({
            "kind": cfg.projector, "shared": cfg.projector_shared, "direction": cfg.direction,
            "fusion": cfg.fusion, "gate": cfg.gate,
            "student": {"num_kv_heads": s_geo.num_kv_heads, "head_dim": s_geo.head_dim},
            "teachers": [{"cache": t.path, "fingerprint": t.fingerprint, "num_kv_heads": t.heads,
                          "head_dim": t.head_dim, "layers": t.cache.layers,
                          "distilled": t.distilled} for t in teachers]}, indent=1))
    write_folder(run / "final", fill)

