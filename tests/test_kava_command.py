"""One command, `kava`, for every part: its subcommands are the `python -m` forms' entry points,
with one shape of exit statuses; and the stages run where POSIX-only calls do not exist."""

import importlib
import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kava.__main__ import COMMANDS, main as kava

ROOT = Path(__file__).resolve().parents[1]


def test_kava_help_lists_every_command(capsys):
    assert kava(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"kava {name} " in out for name in COMMANDS)
    assert kava([]) == 2 and kava(["fly"]) == 2
    assert "error: kava has no command 'fly'; it has extract, train, eval, sweep, plot, info, recompress, slots, demo" \
        in capsys.readouterr().err


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_takes_the_settings_of_its_python_m_form(name, capsys):
    module, prog = COMMANDS[name]
    main = importlib.import_module(module).main
    helps = []
    for argv, p in ((["--help"], None), (["--help"], f"kava {name}")):
        with pytest.raises(SystemExit) as e:
            main(argv, p)
        assert e.value.code == 0
        helps.append(capsys.readouterr().out)
    assert helps[0].startswith(f"usage: {prog}") and helps[1].startswith(f"usage: kava {name}")
    settings = [h.split("\n\n", 1)[1] for h in helps]       # description and settings, after the usage lines
    assert settings[1].replace(f"kava {name}", prog) == settings[0] and "--help" in settings[0]


@pytest.mark.parametrize("argv, message", [
    (["train", "--student", "S", "--cache", "C", "--max-steps", "0"], "max_steps must be >= 1, got 0"),
    (["train", "--student", "S", "--cache", "C", "--projector", "conv"], "projector 'conv': choose one of"),
    (["extract", "--teacher", "t", "--quant-type", "int3"], "quant_type 'int3': choose one of nf4, fp4"),
    (["eval", "--model", "m", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["recompress", "c", "--kv-quant", "int5"], "kv_quant 'int5': choose one of none, int8, int4"),
    (["slots", "c", "--slots", "4,0"], "--slots 0: must be at least 1"),
    (["plot", "no-such/metrics.jsonl"], "no-such/metrics.jsonl"),
    (["sweep", "no-such.yaml"], "no-such.yaml"),
    (["info", "no-such-cache"], "no-such-cache"),
])
def test_a_bad_setting_or_input_is_one_line_and_exit_1(argv, message, capsys):
    assert kava(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("error: ")


def test_a_usage_error_exits_2_and_ctrl_c_130_saying_what_is_kept(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        kava(["train", "--no-such-flag"])
    assert e.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    import stage1_extract.extract as ex

    def interrupted(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(ex, "main", interrupted)
    assert kava(["extract", "--teacher", "t"]) == 130
    assert "interrupted: finished shards are kept; run the same command again to resume" in capsys.readouterr().err


@pytest.mark.slow
def test_kava_extract_then_kava_train_on_the_tiny_models(teacher_dir, student_dir, tmp_path, capsys):
    assert kava(["extract", "--teacher", str(teacher_dir), "--dataset", "synthetic", "--max-samples", "24",
                 "--no-quantize", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "caches")]) == 0
    (cache,) = [Path(l.split("cache: ")[1]) for l in capsys.readouterr().out.splitlines() if l.startswith("cache: ")]
    assert kava(["train", "--student", str(student_dir), "--cache", str(cache), "--out", str(tmp_path / "run"),
                 "--device", "cpu", "--no-progress", "--max-steps", "2", "--batch-size", "4", "--eval-samples",
                 "4", "--log-every", "1"]) == 0
    assert (tmp_path / "run" / "final" / "student" / "config.json").is_file()
    assert kava(["info", str(tmp_path / "run"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "checkpoints  step-000002, final" in out and "verify       ok: 2 checkpoint(s) match their checksums" in out
    r = subprocess.run([sys.executable, "-m", "kava", "info", str(cache)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith(f"cache        {cache}")


@pytest.mark.slow
def test_stage_1_and_2_run_without_posix_only_calls(teacher_dir, student_dir, tmp_path, monkeypatch):
    """As on Windows: fcntl (and msvcrt) unimportable, no os.O_DIRECT, mmap.MAP_PRIVATE or
    mmap.MAP_POPULATE. The cache is the same, shard for shard, and stage 2 trains on it."""
    from kava_common.cache import open_cache
    from stage1_extract.config import ExtractConfig
    from stage1_extract.extract import main as extract
    from stage2_train.config import TrainConfig
    from stage2_train.train import main as train
    settings = dict(teachers=[str(teacher_dir)], dataset="synthetic", max_samples=24, batch_size=8, quantize=False,
                    device="cpu", progress=False, shard_mb=0.2)
    (posix,) = extract(ExtractConfig(**settings, out=str(tmp_path / "posix")))
    monkeypatch.setitem(sys.modules, "fcntl", None)
    monkeypatch.setitem(sys.modules, "msvcrt", None)
    for mod, name in ((os, "O_DIRECT"), (mmap, "MAP_PRIVATE"), (mmap, "MAP_POPULATE")):
        monkeypatch.delattr(mod, name, raising=False)
    with pytest.raises(ImportError):
        importlib.import_module("fcntl")
    (bare,) = extract(ExtractConfig(**settings, out=str(tmp_path / "bare")))
    shards = lambda d: [s["checksum"] for s in json.loads((d / "manifest.json").read_text())["shards"]]
    assert len(shards(bare)) > 1 and shards(bare) == shards(posix)
    assert open_cache(bare, verify=True).verify() > 0
    train(TrainConfig(student=str(student_dir), caches=[str(bare)], out=str(tmp_path / "run"), device="cpu",
                      progress=False, max_steps=2, batch_size=4, eval_samples=4, log_every=1, save_every=1),
          echo=lambda *a: None)
    assert (tmp_path / "run" / "final" / "student" / "config.json").is_file()
