"""python -m kava_demo: the built-in demo, end to end on this machine, offline.

Builds once under data_cache/demo/ a tokenizer trained locally and a tiny Qwen2-architecture
teacher and student, runs stage 1 (4-bit NF4 teacher) over synthetic GSM8K-format problems,
verifies the cache, then runs stage 2 (student + projector) on it and draws its curves.
Re-running reuses the models and the cache and trains a fresh run.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kava_common import save_pretrained
from kava_demo import tiny
from kava_common.cache import verify_cache
from kava_common.cli import command, setting
from kava_common.info import summary


def build_models(root: Path) -> tuple[Path, Path]:
    teacher, student = root / "teacher", root / "student"
    if not (teacher / "config.json").is_file() or not (student / "config.json").is_file():
        tok = tiny.train_tokenizer(tiny.corpus(2000), vocab_size=384)
        tcfg, scfg = tiny.demo_pair(tok)
        save_pretrained(tiny.build_model(tcfg, seed=1), tok, teacher)
        save_pretrained(tiny.build_model(scfg, seed=2), tok, student)
    return teacher, student


@dataclass
class DemoArgs:
    """Settings of `python -m kava_demo` (kava_common.cli)."""
    root: str = setting("data_cache/demo", "where models, caches and the run go")
    samples: int = setting(512, "synthetic training problems")
    steps: int = setting(60, "stage-2 optimizer steps")


def demo(args: DemoArgs) -> int:
    t0 = time.perf_counter()
    root = Path(args.root)
    teacher, student = build_models(root)
    print(f"demo models: teacher {teacher}, student {student}")
    from stage1_extract.config import ExtractConfig
    from stage1_extract.extract import main as extract
    cfg = ExtractConfig(teachers=[str(teacher)], dataset="synthetic", split="train",
                        out=str(root / "caches"), max_samples=args.samples, batch_size=16,
                        max_length=256, device="cpu")
    (cache_dir,) = extract(cfg)
    print(summary(cache_dir))
    problems = verify_cache(cache_dir)
    for line in problems:
        print(f"CORRUPT {line}")
    if problems:
        return 1
    from stage2_train.config import TrainConfig
    from stage2_train.plot import plot
    from stage2_train.train import main as train
    run = root / "run"
    train(TrainConfig(student=str(student), caches=[str(cache_dir)], out=str(run), max_steps=args.steps,
                      batch_size=8, log_every=10, save_every=args.steps // 2, lr_projector=1e-2,
                      device="cpu", overwrite=True))    # each demo run trains afresh
    png = plot(run / "metrics.jsonl")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s\n"
          f"  cache    {cache_dir} (verified)\n"
          f"  run      {run} (metrics.jsonl, config.yaml, step-*/)\n"
          f"  student  {run / 'final' / 'student'} (loads with AutoModelForCausalLM)\n"
          f"  curves   {png}")
    return 0


main = command(DemoArgs, demo, prog="python -m kava_demo", description=__doc__.split("\n\n")[1],
               interrupted="interrupted: run the same command again (the demo starts its run afresh)")


if __name__ == "__main__":
    sys.exit(main())
