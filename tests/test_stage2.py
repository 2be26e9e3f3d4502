import json
import math
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from kava_common import KavaError
from stage1_extract.config import ExtractConfig
from stage1_extract.extract import main as extract
from stage2_train.__main__ import main as cli
from stage2_train.config import TrainConfig, load_config
from stage2_train.train import Stopped, main as train


def run(student, caches, out, **kw):
    kw.setdefault("max_steps", 40)
    kw.setdefault("log_every", 10)
    kw.setdefault("save_every", 0)
    kw.setdefault("batch_size", 8)
    kw.setdefault("lr_projector", 3e-3)
    kw.setdefault("eval_samples", 8)
    cfg = TrainConfig(student=str(student), caches=[str(c) for c in caches], out=str(out),
                      device="cpu", progress=False, **kw)
    train(cfg, echo=lambda *a: None)
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_shared_tokenizer_learns_above_shuffled(student_dir, caches, tmp_path):
    # default direction (student into teacher space); measured K 0.22 vs shuffled 0.14, V 0.40 vs 0.22
    m = run(student_dir, [caches["qwen"]], tmp_path / "r", lr_projector=1e-2)
    first, last = m[0], m[-1]
    assert [r["step"] for r in m] == [10, 20, 30, 40]
    assert {"step", "loss", "cos_k", "cos_v", "cos_k_shuffled", "loss_ce", "grad_norm"} <= set(last)
    assert last["cos_k"] > last["cos_k_shuffled"] + 0.05 and last["cos_k"] > first["cos_k"] + 0.1, last
    assert last["cos_v"] > last["cos_v_shuffled"] + 0.1 and last["cos_v"] > first["cos_v"] + 0.1, last
    assert last["loss_kv"] < first["loss_kv"]
    final = tmp_path / "r" / "final"
    student = AutoModelForCausalLM.from_pretrained(final / "student")
    assert student.config.num_hidden_layers == 2
    proj = json.loads((final / "projector.json").read_text())
    assert proj["kind"] == "linear" and proj["direction"] == "student_to_teacher"
    assert proj["teachers"][0]["distilled"] == [[0, [[0, 1.0]]], [1, [[1, 1.0]]]]
    assert (final / "projector.safetensors").is_file() and (tmp_path / "r" / "step-000040").is_dir()


@pytest.mark.slow
def test_frozen_student_projector_alone_raises_cosine(student_dir, caches, tmp_path):
    before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(student_dir).state_dict().items()}
    # the student cannot move, so projecting the teacher into its space cannot collapse
    m = run(student_dir, [caches["qwen"]], tmp_path / "r", freeze_student=True, ce_weight=0.0,
            projector="head", lr_projector=1e-2, direction="teacher_to_student")
    # measured: K 0.11 -> 0.27 (shuffled 0.07), V 0.22 -> 0.48 (shuffled 0.07)
    assert m[-1]["cos_k"] > m[0]["cos_k"] + 0.1 and m[-1]["cos_k"] > m[-1]["cos_k_shuffled"] + 0.15
    assert m[-1]["cos_v"] > m[0]["cos_v"] + 0.1 and m[-1]["cos_v"] > m[-1]["cos_v_shuffled"] + 0.15
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "final" / "student").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_frozen_embeddings_stay_fixed_and_the_rest_trains(student_dir, caches, tmp_path):
    before = AutoModelForCausalLM.from_pretrained(student_dir).state_dict()
    run(student_dir, [caches["qwen"]], tmp_path / "r", max_steps=5, log_every=5, freeze_embeddings=True)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "final" / "student").state_dict()
    emb = "model.embed_tokens.weight"
    assert torch.equal(before[emb], after[emb])            # the tied output head is the same tensor
    moved = [k for k in before if k != emb and not torch.equal(before[k], after[k])]
    assert "model.layers.0.self_attn.k_proj.weight" in moved and len(moved) > 10


@pytest.mark.slow
def test_two_tokenizers_llama_teacher_into_qwen2_student(student_dir, caches, tmp_path):
    # measured K 0.30 vs shuffled 0.09, V 0.55 vs 0.09
    m = run(student_dir, [caches["llama"]], tmp_path / "r", projector="mlp", lr_projector=1e-2)
    assert m[-1]["cos_k"] > m[-1]["cos_k_shuffled"] + 0.1, m[-1]
    assert m[-1]["cos_v"] > m[-1]["cos_v_shuffled"] + 0.1, m[-1]


@pytest.mark.slow
def test_two_teachers_fused(student_dir, caches, tmp_path):
    m = run(student_dir, [caches["qwen"], caches["llama"]], tmp_path / "r", max_steps=20,
            fusion="target", gate="learned", direction="teacher_to_student")
    assert m[-1]["cos_k"] > m[-1]["cos_k_shuffled"]
    m = run(student_dir, [caches["qwen"], caches["llama"]], tmp_path / "w", max_steps=10,
            teacher_weights=[0.7, 0.3], direction="student_to_teacher", loss="mse")
    assert m[-1]["loss"] > 0


def _as_if_saved_on_a_gpu(path: Path) -> None:
    """Rewrite a torch.save file so that its tensors say they were saved on cuda:0, as the
    optimizer state of a GPU run does (torch.load puts them back there unless told otherwise)."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        items = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, data in items:
            if info.filename.endswith("/data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            z.writestr(info, data)


@pytest.mark.slow
def test_stop_and_resume_gives_the_same_losses(student_dir, caches, tmp_path):
    kw = dict(max_steps=8, log_every=1, save_every=0, grad_accum=2, batch_size=4)
    straight = run(student_dir, [caches["qwen"]], tmp_path / "a", **kw)

    def stop_at_3(line):
        if line.startswith("step      3 "):
            os.kill(os.getpid(), signal.SIGINT)
    cfg = TrainConfig(student=str(student_dir), caches=[str(caches["qwen"])], out=str(tmp_path / "b"),
                      device="cpu", progress=False, eval_samples=8, lr_projector=3e-3, **kw)
    with pytest.raises(Stopped) as stop:
        train(cfg, echo=stop_at_3)
    assert stop.value.exit_code in (130, 143)
    assert (tmp_path / "b" / "step-000003").is_dir() and not (tmp_path / "b" / "final").exists()
    _as_if_saved_on_a_gpu(tmp_path / "b" / "step-000003" / "optimizer.pt")   # resumes on a CPU all the same
    rng = tmp_path / "b" / "step-000003" / "rng.pt"
    (states,) = torch.load(rng, weights_only=True)["ranks"]
    torch.save(states, rng)                   # rng.pt's other form: one process's states alone
    from kava_common.integrity import record_folder
    record_folder(tmp_path / "b" / "step-000003")     # as the machine that wrote these forms recorded them
    train(TrainConfig(**{**cfg.__dict__, "resume": "auto"}), echo=lambda *a: None)
    resumed = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a["step"], a["loss"], b["loss"])
        assert a["cos_k"] == pytest.approx(b["cos_k"], rel=1e-5, abs=1e-6)


def test_tensorboard_scalars_equal_metrics_across_a_resume(student_dir, caches, tmp_path):
    """--report-to tensorboard writes the metrics.jsonl numbers as scalars. Resumed from the
    step-4 checkpoint of a finished 6-step run, each step is there once: what the first run
    logged after step 4 is purged from both."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = TrainConfig(student=str(student_dir), caches=[str(caches["qwen"])], out=str(tmp_path / "b"),
                      device="cpu", progress=False, eval_samples=8, max_steps=6, log_every=1,
                      save_every=2, batch_size=4, report_to="tensorboard")
    train(cfg, echo=lambda *a: None)
    first = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    train(TrainConfig(**{**cfg.__dict__, "resume": str(tmp_path / "b" / "step-000004")}), echo=lambda *a: None)
    metrics = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6] and metrics[:4] == first[:4]
    ea = EventAccumulator(str(tmp_path / "b" / "tensorboard"))         # as TensorBoard reads it
    ea.Reload()
    for key in ("loss", "cos_k", "cos_v_shuffled", "lr_student", "grad_norm"):
        events = sorted((e.step, e.value) for e in ea.Scalars(key))
        assert [s for s, _ in events] == [1, 2, 3, 4, 5, 6], key
        assert [v for _, v in events] == pytest.approx([m[key] for m in metrics], rel=1e-6), key


def test_a_non_finite_weight_is_never_saved_and_every_rank_checks(student_dir, caches, tmp_path):
    from stage2_train.trainer import Trainer
    cfg = TrainConfig(student=str(student_dir), caches=[str(caches["qwen"])], out=str(tmp_path / "r"),
                      device="cpu", progress=False, eval_samples=8)
    tr = Trainer(cfg, echo=lambda *a: None)
    run = tmp_path / "r"
    first = tr.save(run)
    before = {p.name: p.read_bytes() for p in (first / "student").iterdir()}
    name, p = next(iter(tr.distiller.named_parameters()))
    with torch.no_grad():
        p.view(-1)[1] = float("nan")
    tr.prog.step = 5
    for save in (tr.save, tr.save_final):
        with pytest.raises(KavaError, match=rf"step 5: weight {re.escape(name)} holds NaN or Inf; not saved"):
            save(run)
    assert sorted(q.name for q in run.iterdir()) == [first.name]              # nothing new, nothing left over
    assert {q.name: q.read_bytes() for q in (first / "student").iterdir()} == before
    # a rank other than 0 refuses too, before any collective (it would wait for rank 0)

    class Rank1:
        rank, world = 1, 2

        def __getattr__(self, name):
            raise AssertionError(f"a collective ({name}) before the weights were checked")
    tr.ranks = Rank1()
    for save in (tr.save, tr.save_final):
        with pytest.raises(KavaError, match="holds NaN or Inf"):
            save(run)


def test_a_checkpoint_keeps_the_rng_of_its_gpu_and_restores_it_on_the_gpu_in_use(monkeypatch):
    """torch.cuda stood in for (no GPU here): the state of the GPU the run trains on is saved,
    and restored onto whichever GPU the resumed run uses; a CPU run restores none; a
    checkpoint holding every visible GPU's state gives the GPU in use its own."""
    from stage2_train.checkpoint import rng_state, set_rng_state
    put = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: torch.tensor([10 + d.index], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: put.append((s.tolist(), str(d))))
    torch.manual_seed(5)
    r = rng_state(torch.device("cuda:3"))
    assert r["cuda"].tolist() == [13] and rng_state(torch.device("cpu"))["cuda"] is None
    first = torch.rand(2)
    set_rng_state(r, torch.device("cuda:0"))
    assert torch.equal(torch.rand(2), first) and put == [([13], "cuda:0")]
    set_rng_state(r, torch.device("cpu"))
    every = dict(r, cuda=[torch.tensor([20 + i], dtype=torch.uint8) for i in range(8)])
    set_rng_state(every, torch.device("cuda:1"))
    set_rng_state(every, torch.device("cuda:9"))        # no state saved for that GPU: none set
    assert put == [([13], "cuda:0"), ([21], "cuda:1")]


def test_resume_never_unpickles_a_checkpoint(student_dir, caches, tmp_path):
    """A checkpoint whose optimizer file holds a pickled object is refused on --resume, and
    the object's code never runs."""
    cfg = TrainConfig(student=str(student_dir), caches=[str(caches["qwen"])], out=str(tmp_path / "r"),
                      device="cpu", progress=False, eval_samples=8, max_steps=2, batch_size=4, save_every=0)
    train(cfg, echo=lambda *a: None)
    from kava_common.integrity import record_folder
    marker = tmp_path / "ran"
    torch.save({"optimizer": Evil(str(marker)), "scheduler": {}}, tmp_path / "r" / "step-000002" / "optimizer.pt")
    record_folder(tmp_path / "r" / "step-000002")          # its checksums recorded anew, as a forger would
    with pytest.raises(KavaError, match=r"optimizer\.pt: holds Python objects besides tensors"):
        train(TrainConfig(**{**cfg.__dict__, "resume": "auto", "max_steps": 3}), echo=lambda *a: None)
    assert not marker.exists()


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_refuses_caches_from_another_data_set_or_template(student_dir, caches, tmp_path):
    with pytest.raises(ValueError, match=r"was made from synthetic-seed1 / train \(40 rows.*but .* from "
                                         r"synthetic-seed0 / train \(72 rows"):
        run(student_dir, [caches["qwen"], caches["other"]], tmp_path / "x")
    with pytest.raises(ValueError, match="made from data set 'synthetic-seed0', but the run asks for 'gsm8k'"):
        run(student_dir, [caches["qwen"]], tmp_path / "x", dataset="gsm8k")
    bad = tmp_path / "bad"
    shutil.copytree(caches["qwen"], bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["prompt_template"] = "alpaca-v0"
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="made with prompt template 'alpaca-v0', but stage 2 formats "
                                         "samples with 'kava-qa-v1'"):
        run(student_dir, [bad], tmp_path / "x")
    with pytest.raises(KavaError, match="no checkpoint there"):
        run(student_dir, [caches["qwen"]], tmp_path / "x", resume=str(tmp_path / "nothing"))


def test_config_file_overrides_and_unknown_keys(tmp_path, student_dir, caches, capsys):
    y = tmp_path / "c.yaml"
    y.write_text(f"student: {student_dir}\nmax_steps: 3\nloss: mse\nbogus: 1\nalso_bogus: 2\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['also_bogus', 'bogus'\]"):
        load_config(str(y), {})
    y.write_text(f"student: {student_dir}\nmax_steps: 3\nloss: mse\nlog_every: 1\n")
    cfg = load_config(str(y), {"loss": "l1", "caches": [str(caches["qwen"])]})
    assert (cfg.max_steps, cfg.loss) == (3, "l1")
    with pytest.raises(ValueError, match="gate learned needs fusion target"):
        TrainConfig(student="s", caches=["c"], gate="learned")
    out = tmp_path / "run"
    rc = cli(["--config", str(y), "--cache", str(caches["qwen"]), "--out", str(out), "--eval-samples", "8",
              "--no-progress", "--layer-map", "[null, 1]", "--device", "cpu"])
    assert rc == 0
    saved = (out / "config.yaml").read_text()
    assert "loss: mse" in saved and "cache_fingerprints:" in saved
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert cli(["--student", "s", "--cache", "c", "--projector", "conv"]) == 1
    assert "projector 'conv'" in capsys.readouterr().err


@pytest.mark.slow
def test_8gb_options_lora_adamw8bit_checkpointing_resume(student_dir, caches, tmp_path):
    kw = dict(max_steps=4, log_every=1, batch_size=4, lora_r=4, optimizer="adamw8bit",
              gradient_checkpointing=True)
    straight = run(student_dir, [caches["qwen"]], tmp_path / "a", **kw)

    def stop_at_2(line):
        if line.startswith("step      2 "):
            os.kill(os.getpid(), signal.SIGTERM)
    cfg = TrainConfig(student=str(student_dir), caches=[str(caches["qwen"])], out=str(tmp_path / "b"),
                      device="cpu", progress=False, eval_samples=8, lr_projector=3e-3, save_every=0, **kw)
    with pytest.raises(Stopped) as stop:
        train(cfg, echo=stop_at_2)
    assert stop.value.exit_code in (130, 143)
    assert (tmp_path / "b" / "step-000002" / "student" / "adapter_model.safetensors").is_file()
    train(TrainConfig(**{**cfg.__dict__, "resume": "auto"}), echo=lambda *a: None)
    resumed = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "final" / "student")
    base = AutoModelForCausalLM.from_pretrained(student_dir)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], base.state_dict()[q])      # LoRA merged in


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, dict(lora_r=4, gradient_checkpointing=True)])
def test_chunked_cross_entropy_run_matches_whole(student_dir, caches, tmp_path, extra):
    """--ce-chunk changes where logits live, not what is learned: the same losses step by step
    (plain and with LoRA + gradient checkpointing, where the head is reached through peft)."""
    kw = dict(max_steps=4, log_every=1, batch_size=4, **extra)
    whole = run(student_dir, [caches["qwen"]], tmp_path / "a", **kw)
    chunked = run(student_dir, [caches["qwen"]], tmp_path / "b", ce_chunk=7, **kw)
    assert [r["loss_ce"] for r in chunked] == pytest.approx([r["loss_ce"] for r in whole], rel=1e-5)
    assert [r["loss"] for r in chunked] == pytest.approx([r["loss"] for r in whole], rel=1e-5)
    assert whole[-1]["loss_ce"] > 0


@pytest.mark.parametrize("path", sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
                                        if not p.name.startswith("sweep")))
def test_every_example_config_is_valid(path):
    import yaml
    latent = bool((yaml.safe_load(path.read_text()) or {}).get("latent"))     # a latent run takes one cache
    cfg = load_config(str(path), {"student": "s", "caches": ["a"] if latent else ["a", "b"]})
    assert cfg.student == "s" and bool(cfg.latent) == latent


@pytest.mark.slow
def test_sweep_two_run_grid_and_skip_on_rerun(student_dir, caches, tmp_path, capsys):
    from stage2_train.sweep import combos, main as sweep_main
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"out: {tmp_path / 'sw'}\n"
        f"settings: {{student: {student_dir}, caches: [{caches['qwen']}], max_steps: 4, log_every: 2,\n"
        f"           batch_size: 8, eval_samples: 8, save_every: 0, device: cpu}}\n"
        "grid:\n  loss: [mercator, mse]\n"
        "eval: {dataset: synthetic, split: test, max_samples: 4, max_new_tokens: 4, device: cpu}\n")
    assert sweep_main([str(spec), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "[1/2] loss-mercator: training" in out and "[2/2] loss-mse: training" in out
    md = (tmp_path / "sw" / "results.md").read_text().splitlines()
    assert md[0] == "| run | loss | step | train_loss | loss_kv | loss_ce | cos_k | cos_k_shuffled | " \
                    "cos_v | cos_v_shuffled | accuracy |"
    assert len(md) == 4 and md[2].startswith("| loss-mercator | mercator | 4 |")
    csv_rows = (tmp_path / "sw" / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 3 and (tmp_path / "sw" / "results.png").stat().st_size > 1000
    assert len((tmp_path / "sw" / "loss-mse" / "eval.jsonl").read_text().splitlines()) == 4
    mtime = (tmp_path / "sw" / "loss-mse" / "metrics.jsonl").stat().st_mtime_ns
    assert sweep_main([str(spec), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "[1/2] loss-mercator: done before, skipped" in out and "[2/2] loss-mse: done before, skipped" in out
    assert (tmp_path / "sw" / "loss-mse" / "metrics.jsonl").stat().st_mtime_ns == mtime
    assert (tmp_path / "sw" / "results.md").read_text().splitlines() == md
    # the same cache through a link, and a config.yaml written before a setting existed (absent:
    # its default): still the same runs
    (tmp_path / "link").symlink_to(caches["qwen"])
    cfg_file = tmp_path / "sw" / "loss-mse" / "config.yaml"
    saved = yaml.safe_load(cfg_file.read_text())
    assert saved.pop("kv_dequant") == "device"
    cfg_file.write_text(yaml.safe_dump(saved))
    spec.write_text(spec.read_text().replace(str(caches["qwen"]), str(tmp_path / "link")))
    assert sweep_main([str(spec), "--no-progress"]) == 0
    assert "[2/2] loss-mse: done before, skipped" in capsys.readouterr().out
    # a finished run with other settings is refused before anything trains, naming them
    spec.write_text(spec.read_text().replace("max_steps: 4", "max_steps: 6").replace(
        str(tmp_path / "link"), str(caches["llama"])))
    assert sweep_main([str(spec), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'sw' / 'loss-mercator'} finished with other settings than the sweep gives it now " \
           "(caches, max_steps); remove that folder" in err and "Traceback" not in err
    assert (tmp_path / "sw" / "loss-mse" / "metrics.jsonl").stat().st_mtime_ns == mtime
    from stage2_train.sweep import load_sweep
    example = load_sweep(Path(__file__).resolve().parents[1] / "configs" / "sweep_example.yaml")
    assert len(combos(example["grid"])) == 4
    spec.write_text(f"out: {tmp_path / 'x'}\ngrid:\n  lossy: [a]\n")
    assert sweep_main([str(spec)]) == 1
    assert "grid names unknown setting(s) ['lossy']" in capsys.readouterr().err


def test_unknown_student_is_a_clear_error(caches, tmp_path, capsys):
    assert cli(["--student", str(tmp_path / "nope"), "--cache", str(caches["qwen"]), "--out",
                str(tmp_path / "r"), "--no-progress"]) == 1
    assert "no model config found" in capsys.readouterr().err


def cache_with_inf(src, dst, sample: int):
    """A copy of cache `src` whose sample `sample` holds +inf in layer 0's K (as float16
    overflow written by another tool would), with the manifest's size and checksum updated,
    so that only the values are wrong."""
    from safetensors.torch import load_file
    from kava_common import cache as kc
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    entry = m["shards"][0]
    tensors = load_file(str(dst / entry["file"]))
    start = int(tensors["sample_offsets"][sample])
    tensors[f"k.{m['layers'][0]}"][start + 1, 0, 3] = float("inf")
    written = kc.write_shard(dst, m["format"], tensors, kc.ShardEntry(index=0))
    entry.update(bytes=written.bytes, checksum=written.checksum)
    (dst / "manifest.json").write_text(json.dumps(m))
    return m["shards"][0]["rows"][0] + sample


@pytest.mark.slow
def test_a_sample_with_non_finite_teacher_kv_is_left_out_and_counted(student_dir, caches, tmp_path):
    bad = tmp_path / "bad-cache"
    row = cache_with_inf(caches["qwen"], bad, sample=3)
    lines = []
    cfg = TrainConfig(student=str(student_dir), caches=[str(bad)], out=str(tmp_path / "r"), device="cpu",
                      progress=False, eval_samples=8, max_steps=12, log_every=4, batch_size=8, save_every=0)
    train(cfg, echo=lines.append)
    m = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_samples"] for r in m][-1] == 1 and all(r["skipped_steps"] == 0 for r in m)
    assert all(math.isfinite(r["loss"]) for r in m)
    assert sum(f"left out sample row {row}: its teacher K/V hold NaN or Inf" in l for l in lines) == 1
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "final" / "student")
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_training_that_diverges_stops_before_saving_a_non_finite_weight(student_dir, caches, tmp_path):
    """A learning rate far too large: the steps whose loss or gradients are not finite update
    nothing, the run stops after max_skipped_steps of them with one clear message, every
    checkpoint written holds finite weights, and no final student is written."""
    cfg = TrainConfig(student=str(student_dir), caches=[str(caches["qwen"])], out=str(tmp_path / "r"),
                      device="cpu", progress=False, eval_samples=8, max_steps=30, log_every=1,
                      batch_size=4, save_every=1, lr_student=1e30, lr_projector=1e30, grad_clip=0,
                      warmup_steps=0, max_skipped_steps=2)
    with pytest.raises(KavaError, match=r"not finite for 2 steps in a row .* stopped without saving"):
        train(cfg, echo=lambda *a: None)
    assert not (tmp_path / "r" / "final").exists()
    steps = sorted((tmp_path / "r").glob("step-*"))
    assert steps
    for s in steps:
        w = AutoModelForCausalLM.from_pretrained(s / "student").state_dict()
        assert all(torch.isfinite(t).all() for t in w.values()), s


def flip_a_byte(path: Path, at: float = 0.7) -> None:
    """Change one byte well inside the file (tensor data, not the header); same size."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "hdf5"])
def test_stage2_refuses_a_shard_that_changed_naming_it(student_dir, teacher_dir, tmp_path, fmt):
    (cache,) = extract(ExtractConfig(teachers=[str(teacher_dir)], dataset="synthetic", max_samples=24,
                                     batch_size=8, quantize=False, device="cpu", progress=False,
                                     out=str(tmp_path / "c"), format=fmt, shard_mb=0.05))
    shards = sorted(cache.glob("shard-*.safetensors" if fmt == "safetensors" else "shard-*.h5"))
    assert len(shards) > 1
    flip_a_byte(shards[1])
    cfg = TrainConfig(student=str(student_dir), caches=[str(cache)], out=str(tmp_path / "r"), device="cpu",
                      progress=False, eval_samples=4, max_steps=2, batch_size=4)
    with pytest.raises(KavaError, match=rf"{shards[1].name}: xxh3_128 checksum does not match the manifest"):
        train(cfg, echo=lambda *a: None)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
    data = bytearray(shards[1].read_bytes())
    shards[1].write_bytes(bytes(data[:-10]))                          # truncated
    with pytest.raises(KavaError, match=rf"{shards[1].name}: {len(data) - 10} bytes, the manifest says {len(data)}"):
        train(cfg, echo=lambda *a: None)


def test_stage2_refuses_a_manifest_that_does_not_fit_its_shards(student_dir, caches, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(caches["qwen"], bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["num_kv_heads"] = 4
    (bad / "manifest.json").write_text(json.dumps(m))
    cfg = TrainConfig(student=str(student_dir), caches=[str(bad)], out=str(tmp_path / "r"), device="cpu",
                      progress=False, eval_samples=8, max_steps=2, batch_size=4)
    with pytest.raises(KavaError, match=r"manifest.json: kv_bytes_per_token \d+, but 3 layers x 2 x 4 KV heads"):
        train(cfg, echo=lambda *a: None)
    assert not (tmp_path / "r").exists()


def run_cfg(student_dir, cache, out, **kw):
    base = dict(device="cpu", progress=False, eval_samples=8, max_steps=4, log_every=1, batch_size=4, save_every=2)
    return TrainConfig(student=str(student_dir), caches=[str(cache)], out=str(out), **{**base, **kw})


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_existing_run_folder_is_refused_unless_resumed_or_overwritten(student_dir, caches, tmp_path):
    run = tmp_path / "r"
    train(run_cfg(student_dir, caches["qwen"], run), echo=lambda *a: None)
    before = snapshot(run)
    with pytest.raises(KavaError, match=r"holds an earlier run \(config.yaml, final, metrics.jsonl, step-000002, "
                                        r"\.\.\.\); pass --resume auto to continue it, --overwrite"):
        train(run_cfg(student_dir, caches["qwen"], run, max_steps=3), echo=lambda *a: None)
    assert snapshot(run) == before
    # --overwrite starts again: nothing of the old run is left to resume from or to mix with
    train(run_cfg(student_dir, caches["qwen"], run, max_steps=3, save_every=0, overwrite=True), echo=lambda *a: None)
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000003"]
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    (tmp_path / "file").write_text("x")
    with pytest.raises(KavaError, match=r"--out .*file/sub: .*file is a file, not a folder"):
        train(run_cfg(student_dir, caches["qwen"], tmp_path / "file" / "sub"), echo=lambda *a: None)


def test_a_resume_takes_new_learning_rates_and_refuses_what_it_cannot_honour(student_dir, caches, tmp_path):
    run = tmp_path / "r"
    train(run_cfg(student_dir, caches["qwen"], run, max_steps=4, save_every=2), echo=lambda *a: None)
    shutil.rmtree(run / "step-000004")
    with pytest.raises(KavaError, match=r"batch_size was 4, this run asks for 8\. A resume keeps these"):
        train(run_cfg(student_dir, caches["qwen"], run, batch_size=8, resume="auto"), echo=lambda *a: None)
    lines = []
    train(run_cfg(student_dir, caches["qwen"], run, resume="auto", lr_student=1e-4, lr_projector=2e-3,
                  warmup_steps=0, min_lr_ratio=1.0), echo=lines.append)
    assert any("resumed from" in l and "step-000002 at step 2; taken from this run:" in l
               and "lr_student 5e-05 -> 0.0001" in l and "lr_projector 0.001 -> 0.002" in l for l in lines), lines
    m = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    assert (m[2]["lr_student"], m[2]["lr_projector"]) == pytest.approx((1e-4, 2e-3))
    saved = json.loads((run / "step-000004" / "state.json").read_text())["config"]
    assert saved["lr_student"] == 1e-4


def test_resume_auto_with_nothing_to_resume_is_refused(student_dir, caches, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(KavaError, match=r"holds an earlier run \(metrics.jsonl\) but no checkpoint"):
        train(run_cfg(student_dir, caches["qwen"], run, resume="auto"), echo=lambda *a: None)


def test_a_truncated_optimizer_file_is_named_on_resume(student_dir, caches, tmp_path):
    cfg = run_cfg(student_dir, caches["qwen"], tmp_path / "r", max_steps=2, save_every=0)
    train(cfg, echo=lambda *a: None)
    opt = tmp_path / "r" / "step-000002" / "optimizer.pt"
    size = opt.stat().st_size
    opt.write_bytes(opt.read_bytes()[:100])
    with pytest.raises(KavaError, match=rf"--resume auto: no checkpoint in .* passes its checks: step-000002: "
                                        rf".*optimizer\.pt: 100 bytes, the record says {size}; start again with "
                                        r"--overwrite"):
        train(run_cfg(student_dir, caches["qwen"], tmp_path / "r", max_steps=3, resume="auto"), echo=lambda *a: None)
    from kava_common.integrity import record_folder
    record_folder(tmp_path / "r" / "step-000002")      # a record that agrees with the cut file: torch names it
    with pytest.raises(KavaError, match=r"optimizer\.pt: cannot be read .*incomplete or damaged: resume from an "
                                        r"earlier one with --resume"):
        train(run_cfg(student_dir, caches["qwen"], tmp_path / "r", max_steps=3, resume="auto"), echo=lambda *a: None)


def test_device_gpu_is_one_line(student_dir, caches, tmp_path, capsys):
    rc = cli(["--student", str(student_dir), "--cache", str(caches["qwen"]), "--out", str(tmp_path / "r"),
              "--device", "gpu"])
    err = capsys.readouterr().err
    assert rc == 1 and "--device gpu: choose auto, cpu, cuda or cuda:N" in err and "Traceback" not in err


def test_sweep_checks_every_grid_point_before_training(student_dir, caches, tmp_path):
    from stage2_train.sweep import run_sweep
    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"out: {tmp_path / 'sw'}\n"
                    f"settings: {{student: {student_dir}, caches: [{caches['qwen']}], max_steps: 2, device: cpu}}\n"
                    "grid:\n  projector: [linear, banana]\n")
    with pytest.raises(ValueError, match=r"(?s)grid point \{'projector': 'banana'\}: .*projector 'banana': choose one of"):
        run_sweep(spec, echo=lambda *a: None, progress=False)
    assert not list((tmp_path / "sw").glob("*/metrics.jsonl"))


def test_a_read_only_out_is_one_line(student_dir, caches, tmp_path, capsys, monkeypatch):
    """--out on a read-only file system (simulated: this test may run as root, which writes
    through permissions) fails in one line naming the folder, before anything trains."""
    import errno
    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if self.name == "run":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)
    monkeypatch.setattr(Path, "mkdir", read_only)
    rc = cli(["--student", str(student_dir), "--cache", str(caches["qwen"]), "--out", str(tmp_path / "run"),
              "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert f"error: [Errno 30] Read-only file system: '{tmp_path / 'run'}'" in err


def test_sweep_with_a_missing_student_is_one_line(caches, tmp_path, capsys):
    from stage2_train.sweep import main as sweep_main
    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"out: {tmp_path / 'sw'}\n"
                    f"settings: {{student: {tmp_path / 'nobody'}, caches: [{caches['qwen']}], max_steps: 2, device: cpu}}\n"
                    "grid:\n  loss: [mse]\n")
    assert sweep_main([str(spec), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"student '{tmp_path / 'nobody'}': no model config found" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["qwen", "llama"])
def test_relation_loss_trains_without_a_projector(student_dir, caches, tmp_path, teacher):
    """--loss relation on a same-tokenizer and an other-tokenizer (aligned) cache: the relation
    KL the student is trained on falls."""
    m = run(student_dir, [caches[teacher]], tmp_path / "r", loss="relation", ce_weight=0.0, max_steps=30,
            log_every=10, lr_student=3e-3)
    assert m[-1]["loss_kv"] < 0.9 * m[0]["loss_kv"], [r["loss_kv"] for r in m]


def test_relation_weight_adds_to_another_loss_and_bad_relation_heads_are_refused(student_dir, caches, tmp_path):
    base = run(student_dir, [caches["qwen"]], tmp_path / "a", max_steps=2, log_every=1)
    both = run(student_dir, [caches["qwen"]], tmp_path / "b", max_steps=2, log_every=1, relation_weight=0.5)
    assert both[0]["loss_kv"] > base[0]["loss_kv"]          # same first batch, one more term
    with pytest.raises(ValueError, match=r"relation_heads 3: the K/V widths per position \(teacher 64, student 16"):
        run(student_dir, [caches["qwen"]], tmp_path / "c", loss="relation", relation_heads=3)


@pytest.mark.slow
def test_logit_distillation_from_the_cache_lowers_the_kl(student_dir, logit_caches, tmp_path):
    m = run(student_dir, [logit_caches["qwen"]], tmp_path / "r", kd_weight=1.0, kv_weight=0.0, ce_weight=0.0,
            max_steps=30, log_every=10, lr_student=3e-3)
    assert m[-1]["loss_kd"] < 0.8 * m[0]["loss_kd"], [r["loss_kd"] for r in m]


def test_logit_distillation_refuses_another_tokenizer_or_a_cache_without_logits(student_dir, caches, logit_caches,
                                                                                tmp_path):
    with pytest.raises(ValueError, match=r"--kd-method topk: the teacher of .* has another vocabulary than the student \(token .* use --kd-method uld or chunk"):
        run(student_dir, [logit_caches["llama"]], tmp_path / "a", kd_weight=1.0)
    with pytest.raises(ValueError, match=r"--kd-weight: .* was made without --logits-topk"):
        run(student_dir, [caches["qwen"]], tmp_path / "b", kd_weight=1.0)
    with pytest.raises(ValueError, match="kd_weight needs the answer's logits whole; drop ce_chunk"):
        run(student_dir, [logit_caches["qwen"]], tmp_path / "c", kd_weight=1.0, ce_chunk=8)


def test_kv_tokens_reasoning_masks_all_but_the_reasoning(caches, tok, student_dir, tmp_path):
    from kava_common.cache import open_cache
    from stage2_train.data import DistillData, collate
    cache = open_cache(caches["qwen"])
    every = DistillData([cache], tok, 1024)
    reasoning = DistillData([cache], tok, 1024, kv_tokens="reasoning")   # none cut
    for i in range(4):
        a, r = every[i], reasoning[i]
        assert a["kv_mask"].all() and torch.equal(a["input_ids"], r["input_ids"])
        sample = cache[reasoning.index[i][0]]
        text = sample["text"]
        r0, r1 = sample["char_segments"]["reasoning"]
        kept = tok.decode(r["input_ids"][r["kv_mask"]].tolist())
        assert kept.strip() == text[r0:r1].strip() and 0 < r["kv_mask"].sum() < len(r["kv_mask"])
        assert r["kv_mask"].long().diff().abs().sum() <= 2       # one contiguous run
    batch = collate([reasoning[0], reasoning[1]], pad_id=tok.pad_token_id)
    assert torch.equal(batch["kv_mask"][0, :len(reasoning[0]["kv_mask"])], reasoning[0]["kv_mask"])
    assert not batch["kv_mask"][0, len(reasoning[0]["kv_mask"]):].any()
    # in training, only the reasoning positions enter the K/V loss: a lower first loss_kv than over all tokens
    m_all = run(student_dir, [caches["qwen"]], tmp_path / "a", max_steps=1, log_every=1, loss="mse")
    m_r = run(student_dir, [caches["qwen"]], tmp_path / "b", max_steps=1, log_every=1, loss="mse",
              kv_tokens="reasoning")
    assert m_r[0]["loss_kv"] != m_all[0]["loss_kv"] and m_r[0]["loss_ce"] == m_all[0]["loss_ce"]


def test_ce_and_kd_tokens_all_take_every_next_token_as_target(student_dir, logit_caches, tok, tmp_path):
    import torch.nn.functional as F
    from stage2_train.data import collate
    from stage2_train.trainer import Trainer
    cfg = TrainConfig(student=str(student_dir), caches=[str(logit_caches["qwen"])], out=str(tmp_path / "r"),
                      device="cpu", progress=False, kv_weight=0.0, ce_tokens="all", kd_weight=1.0,
                      kd_tokens="all", eval_samples=8)
    tr = Trainer(cfg, echo=lambda *a: None)
    batch = collate([tr.data[0], tr.data[1]], pad_id=tok.pad_token_id)
    with torch.no_grad():
        logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tgt = batch["attention_mask"][:, 1:].bool()                           # every real next token
    ce = F.cross_entropy(logits[:, :-1][tgt], batch["input_ids"][:, 1:][tgt])
    tb = batch["teachers"][0]
    p = tb["topk_logprobs"][:, :-1][tgt].exp()                             # teacher top-K, T 1
    q = torch.log_softmax(logits[:, :-1][tgt], -1).gather(-1, tb["topk_ids"][:, :-1][tgt])
    tail_p, tail_q = (1 - p.sum(-1)).clamp(min=0), (1 - q.exp().sum(-1)).clamp(min=1e-8)
    kl = (p * (p.clamp(min=1e-8).log() - q)).sum(-1) + tail_p * (tail_p.clamp(min=1e-8).log() - tail_q.log())
    parts = tr.step([batch])
    assert parts["loss_ce"] == pytest.approx(float(ce), rel=1e-5)
    assert parts["loss_kd"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert parts["loss_kv"] == 0.0                                         # kv_weight 0: not computed
    answer = Trainer(TrainConfig(**{**cfg.__dict__, "ce_tokens": "answer", "out": str(tmp_path / "a")}),
                     echo=lambda *a: None)
    ans = batch["ce_mask"][:, 1:]                                           # the answer's tokens only
    want = F.cross_entropy(logits[:, :-1][ans], batch["input_ids"][:, 1:][ans])
    assert ans.sum() < tgt.sum() and answer.step([batch])["loss_ce"] == pytest.approx(float(want), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["teacher_to_student", "student_to_teacher"])
def test_bottleneck_projector_trains_and_resumes_to_the_same_losses(student_dir, caches, tmp_path, direction):
    kw = dict(max_steps=6, log_every=1, save_every=0, batch_size=4, projector="bottleneck", direction=direction,
              bottleneck_hidden=64, lr_projector=1e-2)
    straight = run(student_dir, [caches["qwen"]], tmp_path / "a", **kw)
    assert straight[-1]["loss_kv"] < straight[0]["loss_kv"]
    proj = json.loads((tmp_path / "a" / "final" / "projector.json").read_text())
    assert proj["kind"] == "bottleneck" and [s for s, _ in proj["teachers"][0]["distilled"]] == [0, 1]

    def stop_at_3(line):
        if line.startswith("step      3 "):
            os.kill(os.getpid(), signal.SIGINT)
    cfg = TrainConfig(student=str(student_dir), caches=[str(caches["qwen"])], out=str(tmp_path / "b"),
                      device="cpu", progress=False, eval_samples=8, **kw)
    with pytest.raises(Stopped) as stop:
        train(cfg, echo=stop_at_3)
    assert stop.value.exit_code in (130, 143)
    lines = []
    train(TrainConfig(**{**cfg.__dict__, "resume": "auto"}), echo=lines.append)
    # teacher 3 layers x 2 heads x 32 = 192 values, student 2 x 1 x 16 = 32, hidden 64: K and V each
    n_in, n_out = (192, 32) if direction == "teacher_to_student" else (32, 192)
    each = 2 * n_in + n_in * 64 + 64 + 64 * n_out + n_out
    assert f"projectors (bottleneck, {direction}): {2 * each:,} trainable parameters" in lines
    resumed = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a["step"], a["loss"], b["loss"])


def test_bottleneck_refuses_a_layer_map_and_the_relation_loss(student_dir, caches, tmp_path):
    with pytest.raises(ValueError, match="projector bottleneck maps every teacher layer into every student layer"):
        TrainConfig(student="s", caches=["c"], projector="bottleneck", layer_map=[0, 1])
    with pytest.raises(ValueError, match="the relation loss pairs layers through layer_map"):
        TrainConfig(student="s", caches=["c"], projector="bottleneck", loss="relation")
    with pytest.raises(ValueError, match="layer_weights weigh student layers"):
        TrainConfig(student="s", caches=["c"], projector="bottleneck", layer_weights=[1, 0])


def torchrun_command(args, nproc=2, env_extra=None) -> dict:
    """Keyword arguments for subprocess.run / Popen: `torchrun -m stage2_train ARGS` on `nproc`
    ranks, one thread each, outside any launcher environment this process may have."""
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", **(env_extra or {}))
    return dict(args=[sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
                      "-m", "stage2_train", *args], env=env, cwd=Path(__file__).parents[1], text=True)


def torchrun(args, nproc=2, env_extra=None):
    import subprocess
    return subprocess.run(**torchrun_command(args, nproc, env_extra), capture_output=True, timeout=600)


@pytest.mark.slow
def test_two_gloo_ranks_under_torchrun_equal_one_process_with_the_same_global_batch(student_dir, caches, tmp_path):
    """2 ranks x batch 4 x grad_accum 1 against one process x batch 4 x grad_accum 2: the same
    micro-batches per step (dealt round-robin), gradients averaged by one all_reduce."""
    common = ["--student", str(student_dir), "--cache", str(caches["qwen"]), "--device", "cpu", "--no-progress",
              "--batch-size", "4", "--max-steps", "6", "--log-every", "1", "--eval-samples", "8",
              "--lr-projector", "3e-3"]
    one = run(student_dir, [caches["qwen"]], tmp_path / "one", batch_size=4, grad_accum=2, max_steps=6,
              log_every=1)
    r = torchrun([*common, "--out", str(tmp_path / "two"), "--save-every", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    two = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in two] == [1, 2, 3, 4, 5, 6]                 # one metrics file, rank 0's
    for a, b in zip(one, two):                # measured: equal to ~1e-7 (float sums in another order)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert a["loss_kv"] == pytest.approx(b["loss_kv"], rel=1e-5)
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final" / "student").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final" / "student").state_dict()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    assert sorted(p.name for p in (tmp_path / "two").glob("step-*")) == ["step-000003", "step-000006"]
    assert "2 processes (torchrun), one data-parallel rank each: global batch 2 x 1 x 4 samples" in r.stdout + r.stderr
    assert "find_unused_parameters" not in r.stderr          # every parameter in the graph: no search, no note
    # resumed from step 3 by 2 ranks: the same steps 4-6
    r = torchrun([*common, "--out", str(tmp_path / "two"), "--resume", str(tmp_path / "two" / "step-000003")])
    assert r.returncode == 0, r.stderr[-3000:]
    again = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in again] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(two, again):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), (a["step"], a["loss"], b["loss"])
    # one process cannot take over the data order of two
    with pytest.raises(KavaError, match=r"written by 2 process\(es\) and this run has 1; .* resume with 2 "
                                        r"\(torchrun --nproc-per-node 2\)"):
        run(student_dir, [caches["qwen"]], tmp_path / "two", batch_size=4, max_steps=6, resume="auto")


def test_parameters_in_one_samples_graph_are_what_the_settings_train(student_dir, caches, tmp_path):
    """Under torchrun DDP searches for unused parameters only where a step leaves some out: by
    default every trainable parameter is in one sample's graph; with kv_weight 0 the projectors
    are not, with layer weights [0, 1] the first student layer's projector is not."""
    from stage2_train.ranks import parameters_in_graph
    from stage2_train.trainer import Trainer

    def trainer(**kw):
        cfg = TrainConfig(student=str(student_dir), caches=[str(caches["qwen"])], out=str(tmp_path / "r"),
                          device="cpu", progress=False, eval_samples=8, **kw)
        return Trainer(cfg, echo=lambda *a: None)
    tr = trainer()
    rng = torch.get_rng_state()
    assert parameters_in_graph(tr) == tr.params and torch.equal(torch.get_rng_state(), rng)
    tr = trainer(kv_weight=0.0)
    projector = {id(p) for p in tr.distiller.parameters()}
    assert [id(p) for p in parameters_in_graph(tr)] == [id(p) for p in tr.params if id(p) not in projector]
    tr = trainer(layer_weights=[0.0, 1.0])
    layer0 = {id(p) for n, p in tr.distiller.named_parameters() if re.search(r"\.[kv]\.0\.", n)}   # proj.T.k.L.
    assert layer0 and [id(p) for p in parameters_in_graph(tr)] == [id(p) for p in tr.params if id(p) not in layer0]


def _rank_pid(agent_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK `rank` (a child of the agent), once started."""
    for child in Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(child)
    return None


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_one_step_and_the_run_resumes_to_the_same_weights(
        student_dir, caches, tmp_path):
    """SIGTERM to rank 1 alone: both ranks stop after the same step, rank 0 saves, and
    `--resume auto` with 2 ranks ends where an uninterrupted 2-rank run ends, dropout (in the
    bottleneck projector) included: each rank gets its own RNG state back."""
    import subprocess
    import time
    args = ["--student", str(student_dir), "--cache", str(caches["qwen"]), "--device", "cpu", "--no-progress",
            "--batch-size", "4", "--max-steps", "30", "--log-every", "1", "--eval-samples", "8",
            "--lr-projector", "3e-3", "--save-every", "0", "--projector", "bottleneck", "--bottleneck-dropout", "0.3"]
    straight = torchrun([*args, "--out", str(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr[-3000:]
    agent = subprocess.Popen(**torchrun_command([*args, "--out", str(tmp_path / "two")]),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = tmp_path / "two" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert agent.poll() is None and time.monotonic() < deadline, "the run ended before step 3"
        time.sleep(0.05)
    os.kill(_rank_pid(agent.pid, 1), signal.SIGTERM)
    out = agent.communicate(timeout=300)[0]
    assert agent.returncode != 0, out[-3000:]      # stopped, resumable: not finished
    stopped = re.search(r"stopped by signal 15 at step (\d+); checkpoint", out)
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    assert 3 <= step < 30 and (tmp_path / "two" / f"step-{step:06d}").is_dir()
    assert not (tmp_path / "two" / "final").exists()
    r = torchrun([*args, "--out", str(tmp_path / "two"), "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    got = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert [m["step"] for m in got] == list(range(1, 31))
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "final" / "student").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final" / "student").state_dict()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6


@pytest.mark.slow
def test_two_ranks_with_lora_chunked_cross_entropy_and_unused_projectors_equal_one_process(
        student_dir, caches, tmp_path):
    """DistributedDataParallel where the student is frozen but for LoRA and recomputes its
    activations (gradient checkpointing), the cross-entropy goes around the model's own forward
    (ce_chunk) and the projectors are in no graph (kv_weight 0): the losses of one process
    with twice the accumulation, step by step."""
    one = run(student_dir, [caches["qwen"]], tmp_path / "one", batch_size=4, grad_accum=2, max_steps=4,
              log_every=1, lora_r=4, ce_chunk=3, kv_weight=0.0, lr_student=1e-2, warmup_steps=0,
              gradient_checkpointing=True)
    r = torchrun(["--student", str(student_dir), "--cache", str(caches["qwen"]), "--device", "cpu",
                  "--no-progress", "--batch-size", "4", "--max-steps", "4", "--log-every", "1",
                  "--eval-samples", "8", "--lora-r", "4", "--ce-chunk", "3", "--kv-weight", "0",
                  "--lr-student", "1e-2", "--warmup-steps", "0", "--save-every", "0",
                  "--gradient-checkpointing", "--out", str(tmp_path / "two")])
    assert r.returncode == 0, r.stderr[-3000:]
    two = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    assert "find_unused_parameters" not in r.stderr          # the projectors are unused: DDP finds them
    assert one[-1]["loss_ce"] < one[0]["loss_ce"] - 0.01       # the steps change the student
    for a, b in zip(one, two):
        assert a["loss_ce"] == pytest.approx(b["loss_ce"], rel=1e-5), (a["step"], a["loss_ce"], b["loss_ce"])
        assert b["loss_kv"] == 0.0


def test_bottleneck_with_another_tokenizer_layer_weights_and_its_memory(student_dir, caches, tmp_path):
    """The bottleneck over an other-tokenizer (aligned) cache, with per-student-layer loss
    weights, and the memory estimate counting its parameters (4 bytes x weights, gradients and
    two AdamW moments)."""
    from stage2_train.build import memory_estimate
    from stage2_train.trainer import Trainer
    m = run(student_dir, [caches["llama"]], tmp_path / "r", projector="bottleneck", direction="teacher_to_student",
            layer_weights=[0.0, 1.0], bottleneck_hidden=32, max_steps=4, log_every=2, lr_projector=1e-2)
    assert m[-1]["loss_kv"] < m[0]["loss_kv"]
    cfg = TrainConfig(student=str(student_dir), caches=[str(caches["llama"])], out=str(tmp_path / "e"),
                      device="cpu", progress=False, projector="bottleneck", bottleneck_hidden=32,
                      direction="teacher_to_student", eval_samples=8, layer_weights=[0.0, 1.0])
    tr = Trainer(cfg, echo=lambda *a: None)
    n = sum(p.numel() for p in tr.distiller.parameters())
    line = memory_estimate(cfg, tr.teachers, torch.float32, torch.device("cpu"))
    assert f"projector {n * 16 / 1024 ** 3:.2f}" in line
    # layer weights: student layer 0 weighs nothing, so its pairs leave the K/V loss unchanged
    from stage2_train.data import collate
    batch = collate([tr.data[0], tr.data[1]], pad_id=0)
    with torch.no_grad(), tr.cap:
        tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    tr.distiller.eval()
    with torch.no_grad():
        loss, pairs = tr.distiller(batch, tr.cap, torch.device("cpu"))
    only_last = [p for p in pairs if p.layer == 1][0]
    assert float(loss) == pytest.approx(float(tr.distiller._kv(*only_last.k, *only_last.v, only_last.mask)),
                                        rel=1e-6)


@pytest.fixture(scope="session")
def int4_caches(tmp_path_factory, teacher_dir, llama_dir):
    cfg = ExtractConfig(teachers=[str(teacher_dir), str(llama_dir)], dataset="synthetic", max_samples=72,
                        batch_size=8, quantize=False, device="cpu", progress=False, kv_quant="int4",
                        kv_quant_group=8, out=str(tmp_path_factory.mktemp("int4-caches")))
    qwen, llama = extract(cfg)
    (qwen_h5,) = extract(ExtractConfig(**{**cfg.__dict__, "teachers": [str(teacher_dir)], "format": "hdf5",
                                          "out": str(tmp_path_factory.mktemp("int4-hdf5"))}))
    # value groups of 64 channels: both KV heads (2 x head_dim 32) of a token in one group
    (qwen_g64,) = extract(ExtractConfig(**{**cfg.__dict__, "teachers": [str(teacher_dir)], "kv_quant_group": 64,
                                           "out": str(tmp_path_factory.mktemp("int4-g64"))}))
    # and symmetric: each value group a scale, no low
    (qwen_sym,) = extract(ExtractConfig(**{**cfg.__dict__, "teachers": [str(teacher_dir)], "kv_quant_group": 64,
                                           "kv_quant_v_symmetric": True,
                                           "out": str(tmp_path_factory.mktemp("int4-sym"))}))
    return {"qwen": qwen, "llama": llama, "qwen-hdf5": qwen_h5, "qwen-g64": qwen_g64, "qwen-sym": qwen_sym}


# same tokenizer; another one (aligned); HDF5; value groups over both heads, with and without low
@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["qwen", "llama", "qwen-hdf5", "qwen-g64", "qwen-sym"])
def test_packed_batches_dequantize_on_the_device_to_the_loaders_values(int4_caches, tok, teacher):
    from kava_common.cache import open_cache
    from kava_common.cache.quant import dequantize_batch
    from stage2_train.data import DistillData, collate
    packed = open_cache(int4_caches[teacher], packed=True)
    loader = open_cache(int4_caches[teacher], kv_dtype=torch.float32)
    assert packed.packed and not loader.packed and "k" not in packed.kv(0)
    rows = [3, 0, 17, 9]                                  # mixed lengths
    a = collate([DistillData([packed], tok, 256)[i] for i in rows], tok.pad_token_id)["teachers"][0]
    b = collate([DistillData([loader], tok, 256)[i] for i in rows], tok.pad_token_id)["teachers"][0]
    k, v = dequantize_batch(a["kq"], packed.kv_quant)
    assert k.shape == b["k"].shape and torch.equal(k, b["k"]) and torch.equal(v, b["v"])
    assert (a["A"] is None or torch.equal(a["A"], b["A"])) and torch.equal(a["valid"], b["valid"])
    if teacher in ("qwen-g64", "qwen-sym"):
        assert a["kq"]["v_scale"].shape[3:] == (1, 1)                     # (B, L, T, 1, 1 group)
        assert ("v_low" in a["kq"]) == (teacher == "qwen-g64")
        return
    moved = sum(x.numel() * x.element_size() for x in a["kq"].values())
    # int4 codes are 1/4 of float16 and, at group 8, the scales and lows of K and V another 1/4
    # (float16 K and V: 4 bytes a value for both); group 128 makes the groups' share small
    assert moved / (b["k"].numel() * 4) == pytest.approx(0.5, abs=0.01)


@pytest.mark.slow
def test_stage2_from_an_int4_cache_dequantizes_on_the_device_or_in_the_loader(student_dir, int4_caches, tmp_path):
    dev = run(student_dir, [int4_caches["qwen"]], tmp_path / "d", max_steps=20, kv_dequant="device")
    load = run(student_dir, [int4_caches["qwen"]], tmp_path / "l", max_steps=20, kv_dequant="loader")
    assert [r["step"] for r in dev] == [10, 20]
    for x, y in zip(dev, load):       # the loader rounds to float16 first: the only difference
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-3) and x["cos_k"] == pytest.approx(y["cos_k"], abs=1e-3)
    assert dev[-1]["loss_kv"] < dev[0]["loss_kv"] or dev[-1]["cos_k"] > dev[0]["cos_k"]
    with pytest.raises(ValueError, match="kv_dequant 'gpu': choose one of device, loader"):
        TrainConfig(student=str(student_dir), caches=[str(int4_caches["qwen"])], kv_dequant="gpu")
