"""Nothing lost at the edges: damaged checkpoints are found and passed over, a full disk and
bad files are one line, and nothing earlier is lost or changed."""

import json
import shutil
from pathlib import Path

import pytest

from kava_common import KavaError
from kava_common.info import main as info_main
from stage2_train.config import TrainConfig
from stage2_train.train import main as train


def cfg(student, cache, out, **kw):
    base = dict(student=str(student), caches=[str(cache)], out=str(out), device="cpu", progress=False,
                eval_samples=8, batch_size=4, max_steps=6, save_every=2, log_every=2)
    base.update(kw)
    return TrainConfig(**base)


def files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, student_dir, caches):
    """A 6-step run with checkpoints at steps 2, 4 and 6, and its metrics."""
    out = tmp_path_factory.mktemp("run") / "r"
    train(cfg(student_dir, caches["qwen"], out), echo=lambda *a: None)
    return out


def resumed(finished, tmp_path, damage, student_dir, caches, max_steps=8):
    """A copy of the finished run with its step-6 checkpoint damaged, resumed to `max_steps`:
    (what it said, its folder)."""
    run = tmp_path / "r"
    shutil.copytree(finished, run)
    damage(run / "step-000006")
    before = {n: files(run / n) for n in ("step-000002", "step-000004")}
    said = []
    train(cfg(student_dir, caches["qwen"], run, max_steps=max_steps, resume="auto"), echo=said.append)
    assert {n: files(run / n) for n in before} == before              # earlier checkpoints untouched
    return said, run


def flip_a_byte(folder):
    f = folder / "student" / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x01
    f.write_bytes(bytes(b))


def cut(folder):
    f = folder / "student" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])


def minus_five(folder):
    s = json.loads((folder / "state.json").read_text())
    s["progress"]["step"] = -5
    (folder / "state.json").write_text(json.dumps(s))


def truncate_state(folder):
    (folder / "state.json").write_text((folder / "state.json").read_text()[:40])


@pytest.mark.parametrize("damage, why", [
    (flip_a_byte, r"step-000006/student/model\.safetensors: checksum does not match the record"),
    (cut, r"step-000006/student/model\.safetensors: 1000 bytes, the record says \d+"),
    (minus_five, r"step-000006/state\.json: \d+ bytes, the record says \d+"),
    (truncate_state, r"step-000006/state\.json: \d+ bytes, the record says \d+"),
])
def test_a_damaged_newest_checkpoint_is_passed_over_for_the_newest_that_passes(finished, tmp_path, student_dir, caches,
                                                                               damage, why):
    said, run = resumed(finished, tmp_path, damage, student_dir, caches)
    passed_over = [l for l in said if "passes its checks" in l]
    assert len(passed_over) == 1 and re_search(why + r".*; resuming from step-000004, the newest checkpoint that "
                                               r"passes its checks", passed_over[0])
    assert any(l.startswith(f"resumed from {run / 'step-000004'} at step 4") for l in said)
    m = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m] == [2, 4, 6, 8]
    straight = [json.loads(l) for l in (finished / "metrics.jsonl").read_text().splitlines()]
    assert m[:2] == straight[:2]
    assert not any(p.name.startswith("step--") for p in run.iterdir())


def re_search(pattern, text):
    import re
    return re.search(pattern, text) is not None


def test_state_json_fields_are_checked_without_a_record(finished, tmp_path, student_dir, caches):
    """A checkpoint's state.json is checked on its own too (an older checkpoint has no record, a
    forged one agrees with it): a negative step, or a state that is not JSON, named."""
    from kava_common.integrity import record_folder
    from stage2_train.checkpoint import checkpoint_problems
    run = tmp_path / "r"
    shutil.copytree(finished, run)
    step = run / "step-000006"
    minus_five(step)
    record_folder(step)
    (problem,) = checkpoint_problems(step)
    assert problem.startswith(f"{step / 'state.json'}: progress {{'step': -5,") and \
        "outside what a run of max_steps 6 writes" in problem
    truncate_state(step)
    (step / "checksums.json").unlink()
    (problem,) = checkpoint_problems(step)
    assert problem.startswith(f"{step / 'state.json'}: not valid JSON (")
    s = json.loads((run / "step-000004" / "state.json").read_text())
    s["progress"]["epoch"] = "1"
    (run / "step-000004" / "state.json").write_text(json.dumps(s))
    (run / "step-000004" / "checksums.json").unlink()
    assert checkpoint_problems(run / "step-000004") == [
        f"{run / 'step-000004' / 'state.json'}: progress field(s) ['epoch'] are not among "
        "['epoch', 'kd_ids_dropped', 'kd_samples_skipped', 'micro', 'seed', 'step', 'world_size'] or not whole numbers"]
    said = []
    train(cfg(student_dir, caches["qwen"], run, max_steps=8, resume="auto"), echo=said.append)
    assert any("passed over" in l or "passes its checks" in l for l in said)
    assert any(l.startswith(f"resumed from {run / 'step-000002'} at step 2") for l in said)


def test_no_checkpoint_that_passes_is_refused_naming_each(finished, tmp_path, student_dir, caches):
    run = tmp_path / "r"
    shutil.copytree(finished, run)
    for step in ("step-000002", "step-000004", "step-000006"):
        flip_a_byte(run / step)
    with pytest.raises(KavaError, match=r"--resume auto: no checkpoint in .* passes its checks: step-000006: .*; "
                                        r"step-000004: .*; step-000002: .*; start again with --overwrite"):
        train(cfg(student_dir, caches["qwen"], run, max_steps=8, resume="auto"), echo=lambda *a: None)
    with pytest.raises(KavaError, match=r"--resume .*step-000004: .*model\.safetensors: checksum does not match"):
        train(cfg(student_dir, caches["qwen"], run, max_steps=8, resume=str(run / "step-000004")),
              echo=lambda *a: None)


def test_info_verifies_a_run_folder(finished, tmp_path, capsys):
    assert info_main([str(finished), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "checkpoints  step-000002, step-000004, step-000006, final" in out
    assert "verify       ok: 4 checkpoint(s) match their checksums" in out
    run = tmp_path / "r"
    shutil.copytree(finished, run)
    cut(run / "step-000004")
    assert info_main([str(run), "--verify"]) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT {run / 'step-000004' / 'student' / 'model.safetensors'}: 1000 bytes, the record says" in out
    assert "verify       FAILED: 1 problem(s) in 4 checkpoint(s)" in out


def test_a_full_disk_while_saving_is_one_line_and_keeps_what_was_there(finished, tmp_path, student_dir, caches,
                                                                       monkeypatch, capsys):
    import errno
    import stage2_train.checkpoint as ck
    from stage2_train.__main__ import main as cli
    run = tmp_path / "r"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "final")
    before = files(run)

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(a[1]) if len(a) > 1 else "optimizer.pt")
    monkeypatch.setattr(ck.torch, "save", full)
    rc = cli(["--student", str(student_dir), "--cache", str(caches["qwen"]), "--out", str(run), "--device", "cpu",
              "--no-progress", "--eval-samples", "8", "--batch-size", "4", "--max-steps", "8", "--save-every", "2",
              "--log-every", "2", "--resume", "auto"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: writing {run / 'step-000008'} failed (No space left on device); nothing of it "
                          "is kept, earlier checkpoints are as they were")
    after = files(run)
    assert {k: v for k, v in after.items() if k.startswith("step-")} == \
        {k: v for k, v in before.items() if k.startswith("step-")}
    assert not list(run.glob("*.tmp"))


# --- one line instead of a traceback, and nothing overwritten ------------------------------------

def _edit_shard(src, dst, change):
    """A copy of cache `src` whose first shard's tensors `change(tensors)` edits, with the manifest's
    size and checksum updated, so that only the values are wrong."""
    from safetensors.torch import load_file
    from kava_common import cache as kc
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    entry = m["shards"][0]
    tensors = load_file(str(dst / entry["file"]))
    change(tensors)
    written = kc.write_shard(dst, m["format"], tensors, kc.ShardEntry(index=0))
    entry.update(bytes=written.bytes, checksum=written.checksum)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_a_held_out_sample_with_non_finite_teacher_kv_is_left_out_and_counted(student_dir, caches, tmp_path):
    from kava_common.cache import open_cache
    n = len(open_cache(caches["qwen"]))

    def inf_in_the_last(t):                      # the last sample: held out (eval_samples 8)
        t["k.0"][int(t["sample_offsets"][n - 1]) + 1, 0, 3] = float("inf")
    bad = _edit_shard(caches["qwen"], tmp_path / "c", inf_in_the_last)
    said = []
    train(cfg(student_dir, bad, tmp_path / "r", max_steps=4, save_every=0), echo=said.append)
    m = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_eval_samples"] for r in m] == [1, 1] and all(r["bad_samples"] == 0 for r in m)
    row = open_cache(bad)[n - 1]["row"]
    assert sum(l.startswith(f"left out of the held-out metrics: sample row(s) {row}: their teacher K/V hold NaN")
               for l in said) == 1
    assert all(r["cos_k"] == r["cos_k"] for r in m)                                   # finite, not NaN


def test_top_k_ids_outside_the_teachers_rows_are_refused_naming_cache_and_sample(student_dir, logit_caches,
                                                                               tmp_path, capsys):
    from kava_common.cache import open_cache
    rows = open_cache(logit_caches["qwen"]).manifest["teacher"]["vocab_size"]

    def foreign(t):
        t["topk_ids"][int(t["sample_offsets"][2]) + 4, 1] = rows + 1000
    bad = _edit_shard(logit_caches["qwen"], tmp_path / "c", foreign)
    assert info_main([str(bad), "--verify"]) == 1
    out = capsys.readouterr().out
    row = open_cache(bad)[2]["row"]
    ids = open_cache(bad)[2]["topk_ids"]
    assert f"top-K ids outside the teacher's {rows} output rows (sample row {row}, ids from {int(ids.min())} to " \
           f"{rows + 1000})" in out
    from stage2_train.__main__ import main as cli
    rc = cli(["--student", str(student_dir), "--cache", str(bad), "--out", str(tmp_path / "r"), "--device", "cpu",
              "--no-progress", "--kd-weight", "1", "--eval-samples", "8", "--max-steps", "20", "--batch-size", "8"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and err.startswith(
        f"error: {bad}: sample row {row} has top-K ids from {int(ids.min())} to {rows + 1000}, outside the teacher's "
        f"{rows} output rows")


def test_evaluate_never_writes_over_a_file_it_did_not_write(student_dir, tmp_path, capsys):
    from kava_common import save_pretrained
    from stage2_train.evaluate import main as evaluate_main
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = tmp_path / "m"
    save_pretrained(AutoModelForCausalLM.from_pretrained(student_dir), AutoTokenizer.from_pretrained(student_dir), model)
    weights = (model / "model.safetensors").read_bytes()
    capsys.readouterr()
    args = ["--model", str(model), "--max-samples", "2", "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]
    for overwrite in ([], ["--overwrite"]):
        assert evaluate_main([*args, "--out", str(model / "model.safetensors"), *overwrite]) == 1
        err = capsys.readouterr().err
        assert err.strip() == f"error: --out {model / 'model.safetensors'}: exists and is not a file evaluate wrote " \
                              "(it belongs to the model, cache or run in that folder); choose another path"
    assert (model / "model.safetensors").read_bytes() == weights
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert evaluate_main([*args, "--out", str(notes)]) == 1
    assert "pass --overwrite to replace it" in capsys.readouterr().err and notes.read_text() == "my notes\n"
    assert evaluate_main([*args, "--out", str(notes), "--overwrite"]) == 0
    assert evaluate_main([*args, "--out", str(notes)]) == 0        # its own output: written again
    assert len(notes.read_text().splitlines()) == 2


def test_evaluate_refuses_non_finite_weights_and_a_model_without_tokenizer_files(student_dir, tmp_path, capsys):
    import torch
    from kava_common import save_pretrained
    from stage2_train.evaluate import main as evaluate_main
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(student_dir)
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    save_pretrained(m, AutoTokenizer.from_pretrained(student_dir), tmp_path / "nan")
    capsys.readouterr()
    args = ["--max-samples", "2", "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]
    assert evaluate_main(["--model", str(tmp_path / "nan"), *args]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: {tmp_path / 'nan'}: weight model.layers.1.mlp.up_proj.weight holds NaN or Inf; " \
                          "its answers would mean nothing, so it is not evaluated"
    assert not (tmp_path / "nan" / "eval-test.jsonl").exists()
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(student_dir).save_pretrained(bare)
    capsys.readouterr()
    assert evaluate_main(["--model", str(bare), *args]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and err.startswith(f"error: model '{bare}':")


def test_a_column_of_mixed_types_and_a_yaml_that_does_not_parse_are_one_line(tmp_path, capsys):
    from conftest import write_jsonl
    from kava_common.data import load_rows
    from stage2_train.__main__ import main as cli
    rows = [{"question": "q", "answer": "a #### 1"}] * 3 + [{"question": "q", "answer": 7}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError) as e:
        load_rows(str(path))
    assert str(e.value) == f"{path}: line 4: `answer` is int, but line 1 has str; every row of a column must hold " \
                           "the same type"
    y = tmp_path / "c.yaml"
    y.write_text("max_steps: 3\nloss: [mse\nlr_student: 1\n")
    assert cli(["--config", str(y), "--student", "S", "--cache", "C"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {y}: not valid YAML (line 3: ")
    from stage2_train.sweep import main as sweep_main
    assert sweep_main([str(y)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {y}: not valid YAML (line 3: ")


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_exits_143_after_saving(student_dir, caches, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    run = tmp_path / "r"
    p = subprocess.Popen([sys.executable, "-m", "stage2_train", "--student", str(student_dir), "--cache",
                          str(caches["qwen"]), "--out", str(run), "--device", "cpu", "--no-progress", "--eval-samples",
                          "8", "--batch-size", "4", "--max-steps", "400", "--log-every", "1", "--save-every", "0"],
                         cwd=Path(__file__).parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 143, out[-2000:]
    assert "stopped by signal 15 at step" in out and "resume with --resume auto" in out and "Traceback" not in out
    assert list(run.glob("step-*")) and not (run / "final").exists()


@pytest.mark.slow
def test_a_torchrun_peer_that_dies_is_one_line_on_the_surviving_rank(student_dir, caches, tmp_path):
    import os
    import signal
    import subprocess
    import time
    from test_stage2 import _rank_pid, torchrun, torchrun_command
    args = ["--student", str(student_dir), "--cache", str(caches["qwen"]), "--device", "cpu", "--no-progress",
            "--batch-size", "4", "--max-steps", "200", "--log-every", "1", "--eval-samples", "8", "--save-every", "2",
            "--out", str(tmp_path / "r")]
    agent = subprocess.Popen(**torchrun_command(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert agent.poll() is None and time.monotonic() < deadline, "the run ended before step 3"
        time.sleep(0.05)
    os.kill(_rank_pid(agent.pid, 1), signal.SIGKILL)
    out = agent.communicate(timeout=300)[0]
    assert agent.returncode != 0
    said = [l for l in out.splitlines() if l.startswith("error: rank 0:")]
    assert len(said) == 1 and said[0].startswith("error: rank 0: rank 1 stopped or lost its connection (") and \
        said[0].endswith("this rank stops too; --resume auto continues from the last checkpoint"), out[-3000:]
    assert "Connection reset by peer\nTraceback" not in out
    r = torchrun([*args[:-2], "--max-steps", "6", "--out", str(tmp_path / "r"), "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "r" / "final").is_dir()
