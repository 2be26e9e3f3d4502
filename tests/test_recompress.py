"""python -m kava_common.recompress: a derived cache equals what stage 1 writes with the same
settings, resumes after an interruption, and names its parent."""

import pytest
import torch

from kava_common import KavaError
from kava_common import cache as kc
from kava_common.cache import open_cache
from kava_common.recompress import RecompressArgs, main, recompress
from stage1_extract.config import ExtractConfig
from stage1_extract.extract import main as extract

def cfg(teacher, out, **kw):
    return ExtractConfig(teachers=[str(teacher)], dataset="synthetic", out=str(out), max_samples=10, batch_size=3,
                         quantize=False, dtype="float32", kv_dtype="float16", shard_mb=0.2, device="cpu",
                         progress=False, **kw)

@pytest.fixture(scope="module")
def parent(teacher_dir, tmp_path_factory):
    (path,) = extract(cfg(teacher_dir, tmp_path_factory.mktemp("parent")))
    return path

def checksums(path):
    return [s["checksum"] for s in open_cache(path).manifest["shards"]]

@pytest.mark.parametrize("sym", [False, True])
def test_recompressed_int4_equals_direct_extraction_bit_for_bit(teacher_dir, parent, tmp_path, sym):
    (direct,) = extract(cfg(teacher_dir, tmp_path / "direct", kv_quant="int4", kv_quant_group=8,
                            kv_quant_v_symmetric=sym))
    derived = recompress(RecompressArgs(cache=str(parent), out=str(tmp_path / "derived"), kv_quant="int4",
                                        kv_quant_group=8, kv_quant_v_symmetric=sym, progress=False),
                         log=lambda *a: None)
    assert derived.name == direct.name and len(checksums(direct)) > 1
    assert checksums(derived) == checksums(direct)
    for shard in open_cache(direct).manifest["shards"]:
        assert (derived / shard["file"]).read_bytes() == (direct / shard["file"]).read_bytes()
    m = open_cache(derived).manifest
    assert m["parent"]["fingerprint"] == open_cache(parent).fingerprint
    assert m["fingerprint"] == open_cache(direct).fingerprint and m["kv_quant"] == open_cache(direct).manifest["kv_quant"]
    assert open_cache(derived).verify() > 0

def test_an_interrupted_recompression_resumes(parent, tmp_path, monkeypatch):
    args = RecompressArgs(cache=str(parent), out=str(tmp_path / "a"), kv_quant="int8", kv_quant_group=8,
                          progress=False)
    straight = recompress(args, log=lambda *a: None)
    real, calls = kc.write_shard, []

    def fail_on_the_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(kc, "write_shard", fail_on_the_second)
    resumed_args = RecompressArgs(**{**args.__dict__, "out": str(tmp_path / "b")})
    with pytest.raises(KeyboardInterrupt):
        recompress(resumed_args, log=lambda *a: None)
    (dest,) = (tmp_path / "b").iterdir()
    assert not (dest / "manifest.json").exists() and len(list(dest.glob("shard-*.json"))) == 1
    monkeypatch.setattr(kc, "write_shard", real)
    lines = []
    recompress(resumed_args, log=lines.append)
    assert "1 done before" in lines[0]
    assert checksums(dest) == checksums(straight)

def test_a_layer_subset_in_another_dtype_and_bad_settings(parent, tmp_path, capsys):
    derived = recompress(RecompressArgs(cache=str(parent), out=str(tmp_path), layers=[1], kv_dtype="float32",
                                        progress=False), log=lambda *a: None)
    a, b = open_cache(parent, layers=[1]), open_cache(derived)
    assert b.manifest["layers"] == [1] and b.manifest["kv_dtype"] == "float32"
    for i in range(len(a)):
        assert torch.equal(a[i]["k"].float(), b[i]["k"]) and torch.equal(a[i]["v"].float(), b[i]["v"])
    assert main([str(parent), "--out", str(tmp_path), "--no-progress"]) == 1
    assert "these settings give the parent cache itself" in capsys.readouterr().err
    assert main([str(parent), "--layers", "7", "--kv-quant", "int8", "--no-progress"]) == 1
    assert "--layers [7]:" in capsys.readouterr().err
    assert main([str(parent), "--kv-quant-v-symmetric", "--layers", "0", "--no-progress"]) == 1
    assert "--kv-quant-v-symmetric needs --kv-quant int8 or int4" in capsys.readouterr().err
    with pytest.raises(KavaError, match="quantized already; give --kv-dtype"):
        q = recompress(RecompressArgs(cache=str(parent), out=str(tmp_path), kv_quant="int8", progress=False),
                       log=lambda *a: None)
        recompress(RecompressArgs(cache=str(q), out=str(tmp_path), kv_quant="int4", progress=False),
                   log=lambda *a: None)


def test_a_quantized_parent_recompresses_from_its_dequantized_values(parent, tmp_path):
    q8 = recompress(RecompressArgs(cache=str(parent), out=str(tmp_path), kv_quant="int8", kv_quant_group=8,
                                   progress=False), log=lambda *a: None)
    back = recompress(RecompressArgs(cache=str(q8), out=str(tmp_path / "f"), kv_dtype="float32", layers=[0],
                                     progress=False), log=lambda *a: None)
    a, b = open_cache(q8, layers=[0], kv_dtype=torch.float32), open_cache(back)
    assert b.manifest["kv_quant"] is None and b.manifest["kv_dtype"] == "float32" and len(b) == len(a)
    for i in range(len(a)):
        assert torch.equal(a[i]["k"], b[i]["k"]) and torch.equal(a[i]["v"], b[i]["v"])


@pytest.mark.slow
def test_top_k_logits_token_logprobs_and_the_tokenizer_travel_with_the_kv(teacher_dir, tmp_path):
    """A parent made with --logits-topk: the derived int8 cache is the direct extraction's, bit for
    bit (top-K and token_logprobs included), and holds the teacher's tokenizer/ folder."""
    (parent,) = extract(cfg(teacher_dir, tmp_path / "p", logits_topk=3))
    (direct,) = extract(cfg(teacher_dir, tmp_path / "direct", logits_topk=3, kv_quant="int8", kv_quant_group=8))
    derived = recompress(RecompressArgs(cache=str(parent), out=str(tmp_path / "derived"), kv_quant="int8",
                                        kv_quant_group=8, progress=False), log=lambda *a: None)
    assert derived.name == direct.name and checksums(derived) == checksums(direct)
    a, b = open_cache(parent), open_cache(derived)
    assert b.manifest["token_logprobs"] and torch.equal(a[3]["token_logprobs"], b[3]["token_logprobs"])
    assert sorted(p.name for p in (derived / "tokenizer").iterdir()) == \
        sorted(p.name for p in (parent / "tokenizer").iterdir())
    assert (derived / "tokenizer" / "tokenizer.json").read_bytes() == (parent / "tokenizer" / "tokenizer.json").read_bytes()
