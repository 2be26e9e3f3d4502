import hashlib
import json
import re
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_jsonl
from kava_common import KavaError, cpu_flags
from kava_common.cache import open_cache
from kava_common.data import load_rows
from kava_common.info import main as info_main
from stage1_extract.__main__ import main as cli
from stage1_extract.config import ExtractConfig
from kava_common.geometry import KVGeometry
from stage1_extract.capture import KVCapture, sample_spans, teacher_forward
from stage1_extract.extract import extract_teacher, main as extract_main
from stage1_extract.samples import collate

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(teacher, out, **kw):
    kw.setdefault("max_samples", 10)
    kw.setdefault("batch_size", 3)
    kw.setdefault("quantize", False)
    kw.setdefault("dtype", "float32")
    kw.setdefault("kv_dtype", "float32")
    return ExtractConfig(teachers=[str(teacher)], dataset="synthetic", out=str(out),
                         device="cpu", progress=False, **kw)


def reference_kv(model, ids):
    """K/V of one sample from its own unbatched forward pass: (L, H, T, D) each."""
    with torch.no_grad():
        c = model(input_ids=ids[None], use_cache=True).cache
    return (torch.stack([l.keys[0] for l in c.layers]), torch.stack([l.values[0] for l in c.layers]))


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_cached_kv_equal_unbatched_forward(teacher_dir, tmp_path, padding_side):
    (d,) = extract_main(cfg_for(teacher_dir, tmp_path, padding_side=padding_side, max_samples=11))
    c = open_cache(d)
    ref = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    m = c.manifest
    assert (m["num_layers"], m["num_kv_heads"], m["head_dim"]) == (3, 2, 32)
    assert m["layers"] == [0, 1, 2] and m["keys_post_rope"] and m["teacher"]["quantization"]["method"] == "none"
    lengths = {len(c.tokens(i)) for i in range(len(c))}
    assert len(c) == 11 and len(lengths) > 3                    # mixed lengths, batches of 3
    for i in range(len(c)):
        s = c[i]
        k, v = reference_kv(ref, s["input_ids"])
        assert s["k"].shape == (3, 2, len(s["input_ids"]), 32) == k.shape
        assert torch.allclose(s["k"], k, atol=1e-5, rtol=0), (i, (s["k"] - k).abs().max())
        assert torch.allclose(s["v"], v, atol=1e-5, rtol=0), (i, (s["v"] - v).abs().max())
    assert c[4]["row"] == 4 and c[4]["text"].startswith("Question: ")


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("gather", [False, True])
def test_capture_paths_equal_unbatched_forward(teacher_dir, padding_side, gather):
    """Both copy paths of KVCapture (direct strided copies: the CPU default; gather-then-copy:
    the GPU default) put each sample's real tokens at its destination rows, layers subset."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    seqs = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    lens = [len(q) for q in seqs]
    dest = [lens[1] + lens[2], 0, lens[1]]                      # not in batch order
    bufs = {l: (torch.full((sum(lens), 2, 32), float("nan")), torch.full((sum(lens), 2, 32), float("nan")))
            for l in (0, 2)}
    ids, mask, pos = collate(seqs, 0, padding_side)
    starts = sample_spans(lens, ids.shape[1], padding_side)
    grab = KVCapture("t", KVGeometry.from_config(model.config), gather=gather)
    with torch.inference_mode():
        dests = {l: ([k[d:d + n] for n, d in zip(lens, dest)], [v[d:d + n] for n, d in zip(lens, dest)])
                 for l, (k, v) in bufs.items()}
        teacher_forward(model, ids, mask, pos, grab.cache(
            dests, [(b, s, n) for b, (s, n) in enumerate(zip(starts, lens))], *ids.shape))
    grab.check_complete()
    for b, (n, d) in enumerate(zip(lens, dest)):
        k, v = reference_kv(model, torch.tensor(seqs[b]))
        for l in (0, 2):
            assert torch.allclose(bufs[l][0][d:d + n].transpose(0, 1), k[l], atol=1e-5, rtol=0)
            assert torch.allclose(bufs[l][1][d:d + n].transpose(0, 1), v[l], atol=1e-5, rtol=0)


@pytest.mark.parametrize("topk", [0, 3])
def test_forward_ends_after_the_last_stored_layer(teacher_dir, tmp_path, tok, topk):
    """Keeping layers 0 and 1 of 3, stage 1 runs no layer-2 module, no later part of layer 1
    (its attention output and MLP) and no head, and stores exactly the K/V of a full
    extraction's layers 0 and 1; with --logits-topk the whole forward runs."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    calls = {"mlp1": 0, "o_proj1": 0, "layer2": 0, "head": 0, "layer0": 0}
    for key, mod in (("mlp1", model.model.layers[1].mlp), ("o_proj1", model.model.layers[1].self_attn.o_proj),
                     ("layer2", model.model.layers[2]), ("head", model.lm_head), ("layer0", model.model.layers[0])):
        mod.register_forward_hook(lambda *a, key=key: calls.__setitem__(key, calls[key] + 1))
    cfg = cfg_for(teacher_dir, tmp_path, max_samples=7, layers=[0, 1], logits_topk=topk)
    d = extract_teacher(cfg, str(teacher_dir), load_rows("synthetic", "train", 7), model=model, tok=tok)
    batches = 3                                                     # 7 samples, batch 3
    ran = batches if topk else 0
    assert calls == {"mlp1": ran, "o_proj1": ran, "layer2": ran, "head": ran, "layer0": batches}
    (full,) = extract_main(cfg_for(teacher_dir, tmp_path / "full", max_samples=7))
    a, b = open_cache(d), open_cache(full, layers=[0, 1])
    for i in range(7):
        assert torch.equal(a[i]["k"], b[i]["k"]) and torch.equal(a[i]["v"], b[i]["v"])


@pytest.mark.slow
def test_layer_subset_and_reader_layer_selection(teacher_dir, tmp_path):
    (full,) = extract_main(cfg_for(teacher_dir, tmp_path, max_samples=4))
    (sub,) = extract_main(cfg_for(teacher_dir, tmp_path, max_samples=4, layers=[0, 2]))
    assert sub != full                                            # other settings, other folder
    a, b = open_cache(full, layers=[2, 0]), open_cache(sub)
    assert b.manifest["layers"] == [0, 2]
    assert torch.equal(a[1]["k"], b[1]["k"].flip(0))
    assert torch.equal(a[1]["v"][1], b[1]["v"][0])
    with pytest.raises(ValueError, match=r"layers \[1\] are not stored"):
        open_cache(sub, layers=[1])
    with pytest.raises(ValueError, match=r"--layers \[3\]: teacher .* has layers 0..2"):
        extract_main(cfg_for(teacher_dir, tmp_path, layers=[3]))


@pytest.mark.slow
def test_4bit_nf4_cache_close_to_unquantized(teacher_dir, tmp_path):
    (q,) = extract_main(cfg_for(teacher_dir, tmp_path, quantize=True, kv_dtype="float16", max_samples=6))
    (f,) = extract_main(cfg_for(teacher_dir, tmp_path, max_samples=6))
    cq, cf = open_cache(q), open_cache(f)
    quant = cq.manifest["teacher"]["quantization"]
    assert quant["method"] == "bitsandbytes" and quant["bits"] == 4 and quant["quant_type"] == "nf4"
    assert quant["linear4bit_modules"] == 3 * 7                   # q,k,v,o,gate,up,down per layer
    assert quant["cpu_kernel"] == ("packed" if has_packed_4bit_cpu_kernel() and "amx_bf16" not in cpu_flags()
                                   else "plain")
    assert quant["cpu_plain_modules"] == []                       # every width fits the packed kernel
    for key in ("k", "v"):
        a = torch.cat([cq[i][key].float().flatten() for i in range(len(cq))])
        b = torch.cat([cf[i][key].flatten() for i in range(len(cf))])
        cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
        # measured 0.9939 (K) and 0.9936 (V) on this tiny random teacher (fp32 reference)
        assert cos > 0.98, (key, cos)


def has_packed_4bit_cpu_kernel() -> bool:
    from kava_common import import_bitsandbytes
    return bool(import_bitsandbytes().functional.has_avx512bf16())


NO_PACKED = "this CPU has no AVX512-BF16, so bitsandbytes' packed 4-bit kernel cannot run here"


def test_auto_takes_the_plain_4bit_path_on_a_cpu_with_amx():
    from stage1_extract.teacher import cpu_4bit_path
    table = {(True, True): "plain", (True, False): "packed", (False, False): "plain", (False, True): "plain"}
    for (bf16, amx), want in table.items():
        assert cpu_4bit_path("auto", bf16, amx) == want, (bf16, amx)
        assert cpu_4bit_path("plain", bf16, amx) == "plain"
    assert cpu_4bit_path("packed", True, True) == "packed"          # asked for: taken even with AMX
    with pytest.raises(KavaError, match="--cpu-4bit-kernel packed: this CPU has no AVX512-BF16"):
        cpu_4bit_path("packed", False, True)
    with pytest.raises(ValueError, match="cpu 4-bit kernel 'fast': choose one of"):
        cpu_4bit_path("fast", True, False)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["plain", "packed"])
def test_4bit_on_both_bitsandbytes_cpu_paths(narrow_teacher_dir, tmp_path, kernel):
    """Stage 1 in 4-bit on each CPU path of bitsandbytes. On the packed path the linears it
    cannot pack (48-wide k/v_proj, o_proj with 96 inputs) stay on the plain path, still 4-bit,
    and the manifest lists them; the cache is close to the unquantized teacher's either way."""
    if kernel == "packed" and not has_packed_4bit_cpu_kernel():
        pytest.skip(NO_PACKED)
    (q,) = extract_main(cfg_for(narrow_teacher_dir, tmp_path, quantize=True, cpu_4bit_kernel=kernel,
                                kv_dtype="float16", max_samples=6))
    (f,) = extract_main(cfg_for(narrow_teacher_dir, tmp_path, max_samples=6))
    cq, cf = open_cache(q), open_cache(f)
    quant = cq.manifest["teacher"]["quantization"]
    plain = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "v_proj", "o_proj")]
    assert quant["cpu_kernel"] == kernel and quant["linear4bit_modules"] == 2 * 7
    assert quant["cpu_plain_modules"] == (plain if kernel == "packed" else [])
    for key in ("k", "v"):
        a = torch.cat([cq[i][key].float().flatten() for i in range(len(cq))])
        b = torch.cat([cf[i][key].flatten() for i in range(len(cf))])
        assert torch.nn.functional.cosine_similarity(a, b, dim=0).item() > 0.98, key


def test_packed_and_plain_4bit_paths_take_the_same_weights(narrow_teacher_dir):
    """The modules each path runs through are the ones chosen (bitsandbytes marks a repacked
    weight), and both paths give nearly the same K/V from the same NF4 weights."""
    if not has_packed_4bit_cpu_kernel():
        pytest.skip(NO_PACKED)
    from stage1_extract.teacher import load_teacher, packable, quantization_settings
    cpu = torch.device("cpu")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    out, packed_flags = {}, {}
    for kernel in ("plain", "packed"):
        quant = quantization_settings(True, "nf4", False, cpu, "auto")
        model = load_teacher(str(narrow_teacher_dir), quant, cpu, cpu_4bit_kernel=kernel)
        with torch.inference_mode():
            c = model(input_ids=ids, use_cache=True).cache
        out[kernel] = torch.stack([l.keys for l in c.layers] + [l.values for l in c.layers]).float()
        packed_flags[kernel] = {n: bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
                                for n, m in model.named_modules() if hasattr(m, "support_avx512bf16_for_cpu")}
        fits = {n: packable(m) for n, m in model.named_modules() if hasattr(m, "support_avx512bf16_for_cpu")}
    assert not any(packed_flags["plain"].values())
    assert packed_flags["packed"] == fits and 0 < sum(fits.values()) < len(fits)
    cos = torch.nn.functional.cosine_similarity(out["plain"].flatten(), out["packed"].flatten(), dim=0)
    assert cos > 0.999, cos.item()


@pytest.mark.slow
def test_hdf5_and_safetensors_give_the_same_samples(teacher_dir, tmp_path):
    """... and a bfloat16 cache holds exactly the float32 cache's K/V rounded to bfloat16 (the
    capture converts while it copies)."""
    (s,) = extract_main(cfg_for(teacher_dir, tmp_path, kv_dtype="bfloat16", max_samples=5))
    (h,) = extract_main(cfg_for(teacher_dir, tmp_path, kv_dtype="bfloat16", max_samples=5, format="hdf5"))
    (f,) = extract_main(cfg_for(teacher_dir, tmp_path, max_samples=5))
    cs, ch, cf = open_cache(s), open_cache(h), open_cache(f)
    for i in range(5):
        assert torch.equal(cs[i]["k"], cf[i]["k"].to(torch.bfloat16))
        assert torch.equal(cs[i]["v"], cf[i]["v"].to(torch.bfloat16))
    assert ch.manifest["shards"][0]["file"].endswith(".h5")
    assert len(cs) == len(ch) == 5
    for i in range(5):
        a, b = cs[i], ch[i]
        assert b["k"].dtype == torch.bfloat16
        for key in ("input_ids", "k", "v", "char_offsets"):
            assert torch.equal(a[key], b[key]), key
        assert (a["text"], a["token_segments"], a["row"]) == (b["text"], b["token_segments"], b["row"])


@pytest.mark.slow
def test_direct_and_buffered_writes_give_identical_shards(teacher_dir, tmp_path):
    kw = dict(kv_dtype="float16", max_samples=7, shard_mb=0.05)      # several shards
    (a,) = extract_main(cfg_for(teacher_dir, tmp_path / "direct", **kw))
    (b,) = extract_main(cfg_for(teacher_dir, tmp_path / "buffered", direct_io=False, **kw))
    assert a.name == b.name                              # not part of the cache's identity
    sa, sb = open_cache(a).manifest["shards"], open_cache(b).manifest["shards"]
    assert len(sa) > 1 and [s["checksum"] for s in sa] == [s["checksum"] for s in sb]
    for s in sa:
        assert (a / s["file"]).read_bytes() == (b / s["file"]).read_bytes()


@pytest.mark.slow
def test_resume_after_kill_9_equals_uninterrupted(teacher_dir, tmp_path):
    args = ["--teacher", str(teacher_dir), "--dataset", "synthetic", "--max-samples", "60",
            "--batch-size", "2", "--no-quantize", "--dtype", "float32", "--shard-mb", "0.01",
            "--device", "cpu", "--no-progress"]
    killed = tmp_path / "killed"
    # one thread for the child, so that on a 2-core machine its spinning OpenMP threads cannot
    # starve this process's polling and the kill lands after the last shard
    proc = subprocess.Popen([sys.executable, "-m", "stage1_extract", *args, "--out", str(killed)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not list(killed.glob("*/shard-00002.json")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (cdir,) = killed.iterdir()
    n_done = len(list(cdir.glob("shard-*.json")))
    print(f"killed after {n_done} of 60 shards")
    assert not (cdir / "manifest.json").exists() and 3 <= n_done < 60, n_done
    assert cli([*args, "--out", str(killed)]) == 0                 # resume
    assert cli([*args, "--out", str(tmp_path / "clean")]) == 0     # uninterrupted
    (clean,) = (tmp_path / "clean").iterdir()
    assert clean.name == cdir.name
    a, b = open_cache(cdir), open_cache(clean)
    assert len(a) == len(b) == 60 and len(a.manifest["shards"]) > 3
    assert [s["checksum"] for s in a.manifest["shards"]] == [s["checksum"] for s in b.manifest["shards"]]
    for i in range(60):
        assert torch.equal(a[i]["k"], b[i]["k"]) and torch.equal(a[i]["v"], b[i]["v"])
    assert not list(cdir.glob("*.tmp"))
    # a finished cache is left alone on a re-run
    before = (cdir / "manifest.json").stat().st_mtime_ns
    assert cli([*args, "--out", str(killed)]) == 0
    assert (cdir / "manifest.json").stat().st_mtime_ns == before


def test_verify_names_a_corrupted_shard(teacher_dir, tmp_path, capsys):
    (d,) = extract_main(cfg_for(teacher_dir, tmp_path, max_samples=6, shard_mb=0.05))
    shards = sorted(d.glob("shard-*.safetensors"))
    assert len(shards) >= 2
    assert info_main([str(d), "--verify"]) == 0
    assert "verify       ok" in capsys.readouterr().out
    data = bytearray(shards[1].read_bytes())
    data[-5] ^= 0xFF
    shards[1].write_bytes(bytes(data))
    assert info_main([str(d), "--verify"]) == 1
    out = capsys.readouterr().out
    assert [l for l in out.splitlines() if l.startswith("CORRUPT")] == [
        f"CORRUPT {shards[1]}: xxh3_128 checksum does not match the manifest"]
    assert "verify       FAILED: 1 problem(s) in the manifest or its 6 shards" in out


def test_schema_1_cache_reads_and_verifies(teacher_dir, tmp_path, capsys):
    """Caches written before schema 2 hold a bare sha256 per shard; they still open and verify."""
    (d,) = extract_main(cfg_for(teacher_dir, tmp_path, max_samples=6, shard_mb=0.05))
    new = open_cache(d)
    m = json.loads((d / "manifest.json").read_text())
    m["schema_version"] = 1
    for s in m["shards"]:
        del s["checksum"]
        s["sha256"] = hashlib.sha256((d / s["file"]).read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(m))
    old = open_cache(d)
    assert torch.equal(old[2]["k"], new[2]["k"]) and old.manifest["schema_version"] == 1
    assert info_main([str(d), "--verify"]) == 0
    m["shards"][0]["sha256"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(m))
    assert info_main([str(d), "--verify"]) == 1
    assert f"CORRUPT {d / m['shards'][0]['file']}: sha256 checksum does not match" in capsys.readouterr().out


def test_edge_rows(teacher_dir, tmp_path):
    long_q = "How many? " + "word " * 400
    rows = [{"question": "Ava has 3 pens. How many?", "answer": "3\n#### 3"},
            {"question": "   ", "answer": "#### 1"},                               # empty
            {"question": long_q, "answer": "Many.\n#### 9"},                        # over-long
            {"question": "Caf\u00e9 costs \u20ac5. \u201cHow much\u201d?", "answer": "\u20ac5\n#### 5"},
            {"question": "No final mark here?", "answer": "Just reasoning."}]
    data = write_jsonl(tmp_path / "edge.jsonl", rows)
    cfg = ExtractConfig(teachers=[str(teacher_dir)], dataset=str(data), out=str(tmp_path / "o"),
                        max_length=64, quantize=False, dtype="float32", device="cpu", progress=False)
    (d,) = extract_main(cfg)
    c = open_cache(d)
    m = c.manifest
    assert m["skipped_rows"] == [{"row": 1, "reason": "empty question"}]
    assert m["dataset"]["rows"] == 5 and len(c) == 4
    assert [c[i]["row"] for i in range(4)] == [0, 2, 3, 4]
    assert m["truncated_samples"] == 1 and m["rows_without_final_answer"] == 1
    long = c[1]
    assert long["truncated"] and len(long["input_ids"]) == 64 and long["k"].shape[2] == 64
    assert long["token_segments"]["answer"] == (64, 64)             # cut off
    euro = c[2]
    assert euro["text"] == "Question: Caf\u00e9 costs \u20ac5. \u201cHow much\u201d?\nAnswer: \u20ac5\n#### 5"
    s, e = euro["token_segments"]["answer"]
    a, b = euro["char_offsets"][s][0].item(), euro["char_offsets"][e - 1][1].item()
    assert euro["text"][a:b].strip() == "5"
    nofinal = c[3]
    assert nofinal["token_segments"]["answer"][0] == nofinal["token_segments"]["answer"][1] == len(nofinal["input_ids"])
    assert (d / "manifest.json").read_bytes().isascii()


def test_nan_sample_recorded_not_written(teacher_dir, tmp_path, tok):
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    zid = tok.convert_tokens_to_ids("Z")
    model.model.embed_tokens.register_forward_hook(
        lambda mod, inp, out: out.masked_fill((inp[0] == zid).any(1)[:, None, None], float("nan")))
    data = write_jsonl(tmp_path / "nan.jsonl", [
        {"question": "Ava has 3 pens.", "answer": "#### 3"},
        {"question": "Zed has ZZ pens.", "answer": "#### 2"},
        {"question": "Ben has 4 pens.", "answer": "#### 4"}])
    cfg = cfg_for(teacher_dir, tmp_path, max_samples=None)
    d = extract_teacher(cfg, str(teacher_dir), load_rows(str(data)), model=model, tok=tok)
    c = open_cache(d)
    assert c.manifest["bad_samples"] == [{"row": 1, "reason": "non-finite K/V (NaN or Inf)"}]
    assert len(c) == 2 and [c[i]["row"] for i in range(2)] == [0, 2]
    assert all(torch.isfinite(c[i]["k"]).all() for i in range(2))


def test_disk_check_refuses_before_loading(teacher_dir, tmp_path, monkeypatch):
    import stage1_extract.extract as ex
    monkeypatch.setattr(ex.shutil, "disk_usage", lambda p: SimpleNamespace(free=1000))
    monkeypatch.setattr(ex.T, "load_teacher", lambda *a, **k: pytest.fail("teacher was loaded"))
    with pytest.raises(KavaError, match=r"needs about \d+\.\d\d MB more but only 1\.00 kB is free.*--no-disk-check"):
        extract_main(cfg_for(teacher_dir, tmp_path))


def test_geometry_disagreement_is_a_clear_error(teacher_dir, tmp_path, tok):
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    model.config.num_key_value_heads = 4                          # the tensors still have 2
    with pytest.raises(KavaError, match=r"config gives 3 layers x 4 KV heads x head_dim 32, but the "
                                        r"model returned keys shaped \[3, 2, \d+, 32\] .* at layer 0"):
        extract_teacher(cfg_for(teacher_dir, tmp_path), str(teacher_dir),
                        load_rows("synthetic", max_samples=10), model=model, tok=tok)
    model.config.num_key_value_heads = 2
    model.config.num_hidden_layers = 4                            # the model still runs 3
    with pytest.raises(KavaError, match=r"config gives 4 layers, but the model stored K/V for 3"):
        extract_teacher(cfg_for(teacher_dir, tmp_path), str(teacher_dir),
                        load_rows("synthetic", max_samples=10), model=model, tok=tok)


@pytest.mark.slow
def test_cli_two_teachers_and_bad_settings(teacher_dir, llama_dir, tmp_path, capsys):
    rc = cli(["--teacher", str(teacher_dir), "--teacher", str(llama_dir), "--dataset", "synthetic",
              "--max-samples", "4", "--out", str(tmp_path), "--no-quantize", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    dirs = [Path(l.split("cache: ")[1]) for l in out.splitlines() if l.startswith("cache: ")]
    assert len(dirs) == 2
    llama = open_cache(dirs[1])
    assert llama.manifest["teacher"]["architecture"] == "LlamaForCausalLM"
    assert llama[0]["input_ids"][0].item() == AutoTokenizer.from_pretrained(llama_dir).bos_token_id
    assert llama[0]["char_offsets"][0].tolist() == [0, 0]
    assert cli(["--teacher", "x", "--batch-size", "0", "--kv-dtype", "int3"]) == 1
    err = capsys.readouterr().err
    assert "--batch-size must be >= 1, got 0" in err and "kv_dtype 'int3': choose one of float16, bfloat16, float32" in err


@pytest.mark.slow
def test_dataloader_workers_share_the_reader(teacher_dir, tmp_path):
    (d,) = extract_main(cfg_for(teacher_dir, tmp_path, max_samples=6, shard_mb=0.05))
    c = open_cache(d)
    c[0]  # opened in the parent before the fork
    dl = torch.utils.data.DataLoader(c, batch_size=None, num_workers=2)
    for i, s in enumerate(dl):
        assert torch.equal(s["k"], c[i]["k"])
    assert i == 5


GSM8K = ROOT.parent / "shared" / "gsm8k" / "test.jsonl"


@pytest.mark.slow
@pytest.mark.skipif(not GSM8K.is_file(), reason="the real GSM8K is not at ../shared/gsm8k")
def test_real_gsm8k_rows_by_path(teacher_dir, tmp_path):
    cfg = ExtractConfig(teachers=[str(teacher_dir)], dataset=str(GSM8K), split="test", max_samples=40,
                        out=str(tmp_path), quantize=False, device="cpu", progress=False, max_length=384)
    (d,) = extract_main(cfg)
    c = open_cache(d)
    m = c.manifest
    assert m["dataset"]["rows"] == 40 and len(c) == 40 and m["rows_without_final_answer"] == 0
    rows = load_rows(str(GSM8K), "test", 40)
    for i in range(40):
        s = c[i]
        assert s["text"].startswith("Question: " + rows.questions[i].strip())
        a, b = s["char_segments"]["answer"]
        assert s["text"][a:b] == rows.answers[i].rsplit("####", 1)[1].strip()
        assert s["k"].shape[2] == len(s["input_ids"])


def test_unknown_teacher_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert cli(["--teacher", str(missing), "--out", str(tmp_path), "--no-progress"]) == 1
    assert f"error: teacher '{missing}': no model config found" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_write_one_cache(teacher_dir, tmp_path, capsys):
    args = ["--teacher", str(teacher_dir), "--max-samples", "12", "--no-quantize", "--dtype", "float32",
            "--shard-mb", "0.05", "--device", "cpu", "--no-progress"]
    assert cli([*args, "--out", str(tmp_path / "one")]) == 0
    (single,) = (tmp_path / "one").iterdir()
    split = tmp_path / "two"
    assert cli([*args, "--out", str(split), "--num-shards", "2", "--shard-index", "1"]) == 0
    (d,) = split.iterdir()
    assert d.name == single.name and not (d / "manifest.json").exists()
    assert "cache (this part done, other processes pending)" in capsys.readouterr().out
    part1 = sorted(p.name for p in d.glob("shard-*.json"))
    assert part1 and all(int(n[6:11]) % 2 == 1 for n in part1)
    assert cli([*args, "--out", str(split), "--num-shards", "2", "--shard-index", "0"]) == 0
    a, b = open_cache(single), open_cache(d)
    assert [s["checksum"] for s in a.manifest["shards"]] == [s["checksum"] for s in b.manifest["shards"]]
    assert len(b) == 12 and torch.equal(a[7]["k"], b[7]["k"])
    assert cli([*args, "--out", str(split), "--num-shards", "2", "--shard-index", "2"]) == 1


def test_token_segments_of_all_samples_and_longest_answer(teacher_dir, tmp_path):
    from stage2_train.build import longest_answer
    (d,) = extract_main(cfg_for(teacher_dir, tmp_path, max_samples=7, shard_mb=0.05))
    c = open_cache(d)
    seg = c.token_segments()
    assert len(c.manifest["shards"]) >= 2 and seg.shape == (7, 3, 2)
    for i in range(7):
        assert [tuple(x) for x in seg[i]] == [c[i]["token_segments"][n] for n in ("question", "reasoning", "answer")]
    longest = max(c[i]["token_segments"]["answer"][1] - c[i]["token_segments"]["reasoning"][0] for i in range(7))
    one = [SimpleNamespace(cache=c)]                                       # a Teacher, as far as it is read
    assert longest_answer(one, 10_000) == longest + 1                       # + EOS
    assert longest_answer(one, 5) == 5                                      # capped at max_length


@pytest.mark.slow
def test_tokenizing_and_forward_loop_run_with_the_heap_frozen(teacher_dir, tmp_path, tok, monkeypatch):
    """Python's full garbage collections skip what was alive before tokenizing and before the
    forward loop (gc.freeze), and the heap is given back to the collector afterwards."""
    import gc
    import stage1_extract.extract as E
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    seen = {}
    model.register_forward_pre_hook(lambda mod, args: seen.setdefault("forward", gc.get_freeze_count()) and None)
    real_prepare = E.prepare_samples
    monkeypatch.setattr(E, "prepare_samples",
                        lambda *a: (seen.setdefault("tokenize", gc.get_freeze_count()), real_prepare(*a))[1])
    assert gc.get_freeze_count() == 0
    extract_teacher(cfg_for(teacher_dir, tmp_path, max_samples=4), str(teacher_dir),
                    load_rows("synthetic", "train", max_samples=4), model=model, tok=tok)
    assert seen["tokenize"] > 10_000 and seen["forward"] > 10_000    # model, tokenizer, transformers
    assert gc.get_freeze_count() == 0
    gc.freeze()                                   # a caller's own freeze is left as it is
    try:
        n = gc.get_freeze_count()
        extract_teacher(cfg_for(teacher_dir, tmp_path / "b", max_samples=4), str(teacher_dir),
                        load_rows("synthetic", "train", max_samples=4), model=model, tok=tok)
        assert gc.get_freeze_count() > n // 2      # not unfrozen (a few frozen objects may die)
    finally:
        gc.unfreeze()


@pytest.mark.slow
def test_resume_writes_again_a_finished_shard_that_changed(teacher_dir, tmp_path):
    """With the manifest gone (an interrupted run), a finished shard whose bytes changed but
    not its size is not taken as done: it is named, written again, and the cache verifies."""
    cfg = cfg_for(teacher_dir, tmp_path, max_samples=12, shard_mb=0.05)
    (d,) = extract_main(cfg)
    shard = sorted(d.glob("shard-*.safetensors"))[1]
    good = shard.read_bytes()
    data = bytearray(good)
    data[len(data) * 2 // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    (d / "manifest.json").unlink()
    lines = []
    extract_teacher(cfg, str(teacher_dir), load_rows("synthetic", "train", 12), log=lines.append)
    assert any(f"do not match their checksum and are written again: {shard.name}" in l for l in lines)
    assert shard.read_bytes() == good
    assert info_main([str(d), "--verify"]) == 0


@pytest.mark.parametrize("edit, expected", [
    ({"num_kv_heads": 4}, ["kv_bytes_per_token 768, but 3 layers x 2 x 4 KV heads x head_dim 32 in float16 is 1536",
                           "k.0 is shaped [{t}, 2, 32], the manifest implies [{t}, 4, 32]"]),
    ({"num_samples": 40}, ["num_samples 40, but its shards hold 24"]),
])
@pytest.mark.slow
def test_verify_checks_the_manifest_against_itself_and_its_shards(teacher_dir, tmp_path, capsys, edit, expected):
    (d,) = extract_main(cfg_for(teacher_dir, tmp_path, max_samples=24, kv_dtype="float16"))
    m = json.loads((d / "manifest.json").read_text())
    tokens = m["shards"][0]["tokens"]
    m.update(edit)
    (d / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert info_main([str(d), "--verify"]) == 1
    out = capsys.readouterr().out
    for e in expected:
        assert e.format(t=tokens) in out, (e, out)


@pytest.mark.slow
def test_changed_local_weights_give_a_new_cache(tok, tmp_path):
    """Bytes changed in the middle of a weight file (same size, same first and last MiB) make
    another fingerprint: the old cache is not reused."""
    from kava_common import save_pretrained
    from kava_demo import tiny
    from stage1_extract.teacher import weights_identity
    config = tiny.tiny_config("qwen2", len(tok), hidden=64, layers=1, heads=4, kv_heads=2, intermediate=4096, tok=tok)
    t = save_pretrained(tiny.build_model(config), tok, tmp_path / "teacher")
    cfg = cfg_for(t, tmp_path / "c", max_samples=4)
    (a,) = extract_main(cfg)
    w = t / "model.safetensors"
    data = bytearray(w.read_bytes())
    assert len(data) > 3 * (1 << 20)
    before = weights_identity(str(t), None)
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    assert weights_identity(str(t), None) != before
    (b,) = extract_main(cfg)
    assert b != a and (b / "manifest.json").is_file()


def test_max_length_that_cuts_every_sample_is_refused_and_cuts_are_reported(teacher_dir, tok, tmp_path):
    from kava_common.prompt import format_sample
    with pytest.raises(KavaError, match=r"--max-length 1 cuts every one of the 4 samples"):
        extract_main(cfg_for(teacher_dir, tmp_path, max_samples=4, max_length=1))
    assert not list(tmp_path.glob("*/shard-*"))
    rows = load_rows("synthetic", "train", 6)
    lengths = sorted(len(tok(format_sample(q, a).text)["input_ids"]) for q, a in zip(rows.questions, rows.answers))
    limit = lengths[3]                                   # cuts the two longest (or more, with ties)
    lines = []
    d = extract_teacher(cfg_for(teacher_dir, tmp_path, max_samples=6, max_length=limit), str(teacher_dir), rows,
                        log=lines.append)
    cut = open_cache(d).manifest["truncated_samples"]
    assert cut == sum(n > limit for n in lengths) and cut > 0
    assert any(f"{cut} samples cut at --max-length {limit}" in l for l in lines), lines


def test_disk_message_names_sizes_in_a_unit_that_shows_them():
    from stage1_extract.extract import _gb
    assert [_gb(n) for n in (3.2e9, 4.5e6, 1234, 12)] == ["3.20 GB", "4.50 MB", "1.23 kB", "12 B"]


def test_a_teacher_without_tokenizer_files_and_an_out_that_is_a_file_are_one_line(teacher_dir, tmp_path, capsys):
    t = tmp_path / "t"
    shutil.copytree(teacher_dir, t)
    for f in t.glob("tokenizer*.json"):
        f.unlink()
    rc = cli(["--teacher", str(t), "--max-samples", "4", "--out", str(tmp_path / "c"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert f"teacher '{t}': its tokenizer has 1 tokens and encodes 'Question: Tom has 3 apples.' into none" in err
    (tmp_path / "f").write_text("x")
    rc = cli(["--teacher", str(teacher_dir), "--max-samples", "4", "--out", str(tmp_path / "f"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and f"--out {tmp_path / 'f'}: {tmp_path / 'f'} is a file, not a folder" in err


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_weights_file_is_one_line(teacher_dir, tmp_path, capsys, damage):
    t = tmp_path / "t"
    shutil.copytree(teacher_dir, t)
    w = t / "model.safetensors"
    if damage == "truncated":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    else:
        w.unlink()
    rc = cli(["--teacher", str(t), "--max-samples", "4", "--out", str(tmp_path / "c"), "--no-progress",
              "--no-quantize"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and f"teacher '{t}': its weights could not be loaded (" in err
    assert ("incomplete metadata" if damage == "truncated" else "no file named model.safetensors") in err


@pytest.mark.slow
def test_a_failed_shard_write_is_one_line_and_leaves_no_temporary_file(teacher_dir, tmp_path, monkeypatch, capsys):
    """A full disk (ENOSPC) while a shard is written, with --no-disk-check: one line naming the
    file, no .tmp left behind, and the shards finished before it stay for a resume."""
    import errno
    import kava_common.cache.write as w
    real, calls = w.write_bytes, []

    def full_disk(path, buf, n, direct=True):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, buf, n, direct)
    monkeypatch.setattr(w, "write_bytes", full_disk)
    rc = cli(["--teacher", str(teacher_dir), "--max-samples", "12", "--out", str(tmp_path), "--no-progress",
              "--no-quantize", "--shard-mb", "0.05", "--no-disk-check"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert f"writing {calls[1]} failed: No space left on device; the shards finished before it are kept" in err
    (cache,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert not list(cache.glob("*.tmp")) and (cache / "shard-00000.safetensors").is_file()
    monkeypatch.setattr(w, "write_bytes", real)
    assert cli(["--teacher", str(teacher_dir), "--max-samples", "12", "--out", str(tmp_path), "--no-progress",
                "--no-quantize", "--shard-mb", "0.05"]) == 0
    assert info_main([str(cache), "--verify"]) == 0


@pytest.mark.slow
def test_a_second_process_on_the_same_part_of_a_cache_is_refused(teacher_dir, tmp_path):
    """While one process holds a part of a cache, another started on it (a second terminal,
    a repeated --shard-index) is refused in one line; once the first is done, it completes."""
    import fcntl
    from stage1_extract.extract import plan_teacher
    cfg = cfg_for(teacher_dir, tmp_path, max_samples=6)
    job = plan_teacher(cfg, str(teacher_dir), load_rows("synthetic", "train", 6))
    job.cache_dir.mkdir(parents=True)
    with open(job.cache_dir / ".lock-part-0-of-1", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (job.cache_dir / "shard-00000.json.999999999.tmp").write_text("{}")   # a dead process's
        with pytest.raises(KavaError, match=r"another stage-1 process is writing part 0 of 1 of this cache"):
            extract_main(cfg)
        assert (job.cache_dir / "shard-00000.json.999999999.tmp").exists()     # nothing touched
    (d,) = extract_main(cfg)
    assert d == job.cache_dir and not list(d.glob("*.tmp")) and info_main([str(d), "--verify"]) == 0


def test_a_live_process_keeps_its_temporary_files(tmp_path):
    from kava_common.cache import remove_partial_files
    names = ["shard-00001.safetensors.tmp", "shard-00002.safetensors.tmp", f"identity.json.{os.getpid()}.tmp",
             "manifest.json.999999999.tmp"]
    for n in names:
        (tmp_path / n).write_text("x")
    assert sorted(remove_partial_files(tmp_path, {1})) == ["manifest.json.999999999.tmp", "shard-00001.safetensors.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"identity.json.{os.getpid()}.tmp", "shard-00002.safetensors.tmp"]


def test_device_gpu_is_one_line(teacher_dir, tmp_path, capsys):
    rc = cli(["--teacher", str(teacher_dir), "--max-samples", "4", "--out", str(tmp_path), "--device", "gpu",
              "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "--device gpu: choose auto, cpu, cuda or cuda:N" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("fmt, padding_side", [("safetensors", "right"), ("hdf5", "left")])
def test_topk_logprobs_equal_an_unbatched_forward(teacher_dir, tmp_path, tok, fmt, padding_side):
    """--logits-topk 5 with a layer subset, batches of 4 over mixed lengths: at every position
    of every sample the cached top-5 log-probs are the log_softmax of an unbatched fp32 forward
    at the cached ids, sorted, and the ids are its top 5; token_logprobs hold, at position t,
    that forward's log-probability of token t+1, and at the last position of EOS."""
    (d,) = extract_main(cfg_for(teacher_dir, tmp_path, max_samples=9, batch_size=4, logits_topk=5,
                                layers=[0, 2], format=fmt, padding_side=padding_side))
    c = open_cache(d)
    assert c.manifest["logits_topk"] == 5 and c.manifest["layers"] == [0, 2] and c.manifest["token_logprobs"]
    ref = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    assert len({len(c.tokens(i)) for i in range(len(c))}) > 3
    for i in range(len(c)):
        s = c[i]
        with torch.no_grad():
            lp = ref(input_ids=s["input_ids"][None]).logits[0].float().log_softmax(-1)
        vals, ids = lp.topk(5)
        assert s["topk_ids"].dtype == torch.long and s["topk_logprobs"].dtype == torch.float32
        assert s["topk_logprobs"].shape == (len(s["input_ids"]), 5)
        assert torch.allclose(s["topk_logprobs"], vals, atol=1e-4, rtol=0), i
        assert torch.allclose(lp.gather(1, s["topk_ids"]), s["topk_logprobs"], atol=1e-4, rtol=0), i
        assert (s["topk_ids"] == ids).float().mean() > 0.99
        want = torch.cat([lp[:-1].gather(1, s["input_ids"][1:, None])[:, 0], lp[-1:, tok.eos_token_id]])
        assert s["token_logprobs"].dtype == torch.float32 and s["token_logprobs"].shape == (len(s["input_ids"]),)
        assert torch.allclose(s["token_logprobs"], want, atol=1e-4, rtol=0), i
    assert info_main([str(d), "--verify"]) == 0


@pytest.mark.slow
def test_topk_cache_resumes_to_the_same_files_and_keeps_old_fingerprints(teacher_dir, tmp_path):
    cfg = cfg_for(teacher_dir, tmp_path / "a", max_samples=12, logits_topk=3, shard_mb=0.05)
    (a,) = extract_main(cfg)
    shards = sorted(a.glob("shard-*.safetensors"))
    assert len(shards) > 2
    (a / "manifest.json").unlink()
    shards[1].unlink()                                    # as a kill would leave it
    (b,) = extract_main(cfg)
    (clean,) = extract_main(cfg_for(teacher_dir, tmp_path / "c", max_samples=12, logits_topk=3, shard_mb=0.05))
    ma, mc = (json.loads((x / "manifest.json").read_text()) for x in (b, clean))
    assert [s["checksum"] for s in ma["shards"]] == [s["checksum"] for s in mc["shards"]]
    (plain,) = extract_main(cfg_for(teacher_dir, tmp_path / "a", max_samples=12, shard_mb=0.05))
    assert plain.name != a.name and "logits_topk" not in json.loads((plain / "identity.json").read_text())


def test_launcher_environment_gives_the_part_and_flags_win():
    from kava_common.launch import launcher_part, stage1_defaults
    assert launcher_part({}) is None
    assert launcher_part({"WORLD_SIZE": "4", "RANK": "3"}) == (4, 3, "torchrun")
    slurm = {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5"}
    assert launcher_part(slurm) == (3, 2, "SLURM array")
    with pytest.raises(ValueError, match="launcher environment: .*must be integers"):
        launcher_part({"WORLD_SIZE": "two", "RANK": "0"})
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "KAVA_CACHE_DIR": "/scratch/caches"}
    got, said = stage1_defaults({"device": "cpu"}, env)
    assert got == {"num_shards": 2, "shard_index": 1, "out": "/scratch/caches"}
    assert said == ["--num-shards 2 --shard-index 1 from torchrun", "--out /scratch/caches from KAVA_CACHE_DIR"]
    got, _ = stage1_defaults({"device": "auto"}, env)
    assert got["device"] == ("cuda:1" if torch.cuda.is_available() else "cpu")
    assert stage1_defaults({"num_shards": 1, "out": "x"}, env) == ({}, [])      # flags win


@pytest.mark.slow
def test_torchrun_with_two_ranks_writes_one_cache_equal_to_one_process(teacher_dir, tmp_path):
    args = ["--teacher", str(teacher_dir), "--max-samples", "12", "--no-quantize", "--dtype", "float32",
            "--shard-mb", "0.05", "--device", "cpu", "--no-progress"]
    assert cli([*args, "--out", str(tmp_path / "one")]) == 0
    (single,) = (tmp_path / "one").iterdir()
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["KAVA_CACHE_DIR"] = str(tmp_path / "two")          # --out from the environment
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", "0", "-m", "stage1_extract", *args], env=env, cwd=Path(__file__).parents[1],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--num-shards 2 --shard-index 0 from torchrun" in r.stderr
    assert "--num-shards 2 --shard-index 1 from torchrun" in r.stderr
    (d,) = (tmp_path / "two").iterdir()
    a, b = open_cache(single), open_cache(d)
    assert d.name == single.name and len(b) == 12
    assert [s["checksum"] for s in a.manifest["shards"]] == [s["checksum"] for s in b.manifest["shards"]]


@pytest.mark.parametrize("kv_quant,fmt,group,span,sym", [
    ("int8", "safetensors", 8, "token", False), ("int4", "hdf5", 8, "head", False),
    ("int4", "safetensors", 64, "token", False), ("int8", "hdf5", 64, "token", True)])
@pytest.mark.slow
def test_quantized_cache_reads_back_the_float16_cache_quantized_by_hand(teacher_dir, tmp_path, kv_quant, fmt,
                                                                        group, span, sym, capsys):
    """The teacher has 2 KV heads x head_dim 32: groups of 8 stay inside a head either way; a
    group of 64 with v_span token takes all of a token's values; symmetric values store no low."""
    from kava_common.cache.quant import KVQuant, dequantize_k, dequantize_v, quantize_k, quantize_v
    base = dict(max_samples=10, shard_mb=0.2, format=fmt)
    (plain,) = extract_main(cfg_for(teacher_dir, tmp_path / "f16", **base))
    capsys.readouterr()
    (packed,) = extract_main(cfg_for(teacher_dir, tmp_path / "q", kv_quant=kv_quant, kv_quant_group=group,
                                     kv_quant_v_span=span, kv_quant_v_symmetric=sym, **base))
    a, b = open_cache(plain), open_cache(packed)
    # the size printed before the run counts the codes and groups (float32 would be ~4-8x more);
    # measured 12.5% under for int4 in HDF5 (the per-dataset headers of two tiny shards)
    est = re.search(rf"as float32 \(quantized to {kv_quant}\): estimated cache ([0-9.]+) (MB|kB)",
                    capsys.readouterr().out)
    written = b.manifest["total_bytes"] / (1e6 if est.group(2) == "MB" else 1e3)
    assert abs(float(est.group(1)) / written - 1) < 0.15, (est.group(0), written)
    assert a.fingerprint != b.fingerprint and len(a) == len(b) == 10
    assert len(a.manifest["shards"]) == len(b.manifest["shards"]) > 1      # same samples per shard
    q = KVQuant(int(kv_quant[3:]), group, span, sym)
    from kava_common.cache.verify import _shapes
    names = {n for f in Path(packed).glob(f"shard-*.{'h5' if fmt == 'hdf5' else fmt}") for n in _shapes(f, fmt)}
    assert ("v_low.0" in names) is not sym and {"v.0", "v_scale.0", "k_low.0"} <= names
    for i in range(10):
        x, y = a[i], b[i]
        assert torch.equal(x["input_ids"], y["input_ids"]) and y["k"].dtype == torch.float16
        for l in range(x["k"].shape[0]):
            k, v = x["k"][l].transpose(0, 1), x["v"][l].transpose(0, 1)          # (T, H, D) as stored
            kq, vq = quantize_k(k, q), quantize_v(v, q)
            want_k = dequantize_k(kq["codes"], kq["scale"], kq["low"], q, torch.float16)
            want_v = dequantize_v(vq["codes"], vq["scale"], vq.get("low"), q, torch.float16)
            assert torch.equal(y["k"][l], want_k.transpose(0, 1)) and torch.equal(y["v"][l], want_v.transpose(0, 1))
    m = b.manifest
    assert m["kv_quant"]["bits"] == q.bits and m["kv_quant"]["group"] == group
    assert m["kv_quant"].get("v_span", "head") == span and m["kv_quant"].get("v_symmetric", False) == sym
    # by hand, per sample of n tokens and layer: codes 2 x 64 x bits / 8 per token, 4 B (scale and
    # low) per key group (ceil(n / group) per channel) and per value group (64 / group per token
    # over both heads; 32 / min(group, 32) per head)
    lens = [len(a.tokens(i)) for i in range(10)]
    v_groups = 64 // group if span == "token" else 2 * (32 // min(group, 32))
    per_layer = sum(n * 128 * q.bits // 8 + -(-n // group) * 64 * 4 + n * v_groups * (2 if sym else 4) for n in lens)
    assert m["kv_quant"]["bytes_per_token"] == round(3 * per_layer / sum(lens), 2)
    assert m["kv_quant"]["k_cosine"] > (0.999 if q.bits == 8 else 0.98)
    assert m["kv_quant"]["v_cosine"] > (0.999 if q.bits == 8 else 0.98)
    assert info_main([str(packed), "--verify"]) == 0
    out = capsys.readouterr().out
    where = ("over a token's KV heads" if span == "token" else "inside each head") + (", symmetric" if sym else "")
    assert (f"kv quant     {kv_quant} kivi, group {group} (value groups {where}): "
            f"{m['kv_quant']['bytes_per_token']} K/V bytes per token") in out
    assert "verify       ok" in out
    assert b.verify() > 0
