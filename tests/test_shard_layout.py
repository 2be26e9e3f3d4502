"""The laid-out safetensors shard: the file stage 1 writes from its flat buffer must be one that
safetensors itself reads back, tensor for tensor, whether or not the page cache is bypassed."""

import hashlib

import pytest
import xxhash
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kava_common import cache as kc
from kava_common.cache.shard import Shard


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "k.0": torch.randn(37, 2, 8, generator=g).half(),
        "v.0": torch.randn(37, 2, 8, generator=g).half(),
        "k.3": torch.randn(37, 2, 8, generator=g).bfloat16(),
        "input_ids": torch.arange(37, dtype=torch.int64) * 7,
        "char_offsets": torch.arange(74, dtype=torch.int32).reshape(37, 2),
        "truncated": torch.tensor([0, 1, 0], dtype=torch.uint8),
        "text_bytes": torch.frombuffer(bytearray(b"odd length!"), dtype=torch.uint8),
        "empty": torch.zeros(0, 3, 2, dtype=torch.int32),
        "x32": torch.randn(5, generator=g),
    }


def _laid_out(tensors):
    layout = kc.ShardLayout([(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], {"kava_schema": "1"})
    flat = kc.aligned_bytes(kc.round_up(layout.nbytes))
    for k, v in layout.views(flat).items():
        v.copy_(tensors[k])
    return layout, flat


@pytest.mark.parametrize("direct", [True, False])
def test_laid_out_shard_reads_back_with_safetensors(tmp_path, direct):
    tensors = _tensors()
    layout, flat = _laid_out(tensors)
    assert flat.data_ptr() % kc.ALIGN == 0
    entry = kc.write_laid_out_shard(tmp_path, layout, flat, kc.ShardEntry(index=4), direct=direct)
    path = tmp_path / "shard-00004.safetensors"
    assert entry.file == path.name and entry.bytes == path.stat().st_size == layout.nbytes
    assert entry.checksum == "xxh3_128:" + xxhash.xxh3_128(path.read_bytes()).hexdigest()
    assert kc.checksum_file(path) == entry.checksum
    assert kc.checksum_file(path, "sha256") == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert kc.ShardEntry.from_json((tmp_path / "shard-00004.json").read_text()) == entry
    got = load_file(str(path))
    assert got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"kava_schema": "1"}
        assert torch.equal(f.get_slice("k.0")[5:9], tensors["k.0"][5:9])
    # the data area starts 8-byte aligned and each tensor at a multiple of its element size
    assert len(layout.prefix) % 8 == 0
    for pos, _, dtype, _ in layout.places.values():
        assert pos % dtype.itemsize == 0


def test_direct_and_buffered_files_are_byte_identical(tmp_path):
    layout, flat = _laid_out(_tensors())
    flat[:len(layout.prefix)].copy_(torch.frombuffer(bytearray(layout.prefix), dtype=torch.uint8))
    arr = flat.numpy()
    a, b = tmp_path / "a", tmp_path / "b"
    kc.write_bytes(a, arr, layout.nbytes, direct=True)
    assert kc.write_bytes(b, arr, layout.nbytes, direct=False) is False
    assert a.read_bytes() == b.read_bytes() == bytes(arr[:layout.nbytes])


def test_unaligned_or_short_buffer_falls_back_to_a_buffered_write(tmp_path):
    data = bytes(range(256)) * 20                       # 5120 bytes
    buf = kc.aligned_bytes(kc.ALIGN * 3)
    buf[1:1 + len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    arr = buf.numpy()[1:]                               # address not aligned
    assert kc.write_bytes(tmp_path / "u", arr, len(data)) is False
    assert (tmp_path / "u").read_bytes() == data
    short = kc.aligned_bytes(len(data))                 # no room to round up to ALIGN
    short.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    assert kc.write_bytes(tmp_path / "s", short.numpy(), len(data)) is False
    assert (tmp_path / "s").read_bytes() == data


@pytest.mark.parametrize("how", ["save_file", "laid_out"])
def test_mapped_reader_equals_safe_open(tmp_path, how):
    """The reader's memory-mapped slices equal safetensors' own, for shards written either way."""
    tensors = _tensors()
    if how == "save_file":
        kc.write_shard(tmp_path, "safetensors", tensors, kc.ShardEntry(index=0))
    else:
        layout, flat = _laid_out(tensors)
        kc.write_laid_out_shard(tmp_path, layout, flat, kc.ShardEntry(index=0))
    path = tmp_path / "shard-00000.safetensors"
    shard = Shard(path, "safetensors")
    with safe_open(str(path), framework="pt") as f:
        for name, t in tensors.items():
            whole = shard.read(name)
            assert whole.dtype == t.dtype and torch.equal(whole, f.get_tensor(name)), name
            for a, b in [(0, 1), (3, 11), (len(t) - 1, len(t)), (5, 5), (2, 999)]:
                got = shard.read(name, a, b)
                assert got.shape == t[a:b].shape and torch.equal(got, t[a:b]), (name, a, b)
    got = shard.read("k.0", 1, 3)
    got.mul_(0)                                  # a private mapping: the file stays as written
    assert torch.equal(Shard(path, "safetensors").read("k.0", 1, 3), tensors["k.0"][1:3])
    with pytest.raises(KeyError, match="no tensor 'k.9'"):
        shard.read("k.9")


@pytest.mark.parametrize("how", ["laid_out-direct", "laid_out-buffered", "safetensors", "hdf5"])
def test_each_shard_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch, how):
    """A shard whose sidecar says complete must be on disk, not only in a cache: the shard's
    own file is fsynced under its temporary name, then renamed, then the sidecar written."""
    import os
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))),
                                                     real_replace(a, b))[1])
    tensors = _tensors()
    if how.startswith("laid_out"):
        layout, flat = _laid_out(tensors)
        entry = kc.write_laid_out_shard(tmp_path, layout, flat, kc.ShardEntry(index=2), direct=how.endswith("direct"))
    else:
        entry = kc.write_shard(tmp_path, how, tensors, kc.ShardEntry(index=2))
    final = tmp_path / entry.file
    tmp = str(final) + ".tmp"
    sidecar = tmp_path / "shard-00002.json"
    assert events == [("fsync", tmp), ("replace", tmp, str(final)),
                      ("replace", f"{sidecar}.{os.getpid()}.tmp", str(sidecar))]
    assert final.stat().st_size == entry.bytes and kc.ShardEntry.from_json(sidecar.read_text()) == entry


def test_the_manifest_read_as_fields_equals_its_json_and_an_older_one_reads_with_defaults(caches, logit_caches):
    import json
    from kava_common.cache import open_cache
    c = open_cache(caches["llama"])
    m, raw = c.meta, json.loads((caches["llama"] / "manifest.json").read_text())
    assert (m.fingerprint, m.layers, m.num_layers, m.num_kv_heads, m.head_dim, m.kv_dtype, m.num_samples) == (
        raw["fingerprint"], raw["layers"], raw["num_layers"], raw["num_kv_heads"], raw["head_dim"], raw["kv_dtype"],
        raw["num_samples"])
    assert (m.dataset.name, m.dataset.split, m.dataset.rows, m.dataset.content_sha256) == (
        raw["dataset"]["name"], "train", raw["dataset"]["rows"], raw["dataset"]["content_sha256"])
    assert (m.tokenizer.sha256, m.tokenizer.bos_token_id, m.tokenizer.eos_token_id) == (
        raw["tokenizer"]["sha256"], raw["tokenizer"]["bos_token_id"], raw["tokenizer"]["eos_token_id"])
    assert (m.logits_topk, m.token_logprobs, m.kv_quant, m.shards, m.raw) == (0, False, None, raw["shards"], raw)
    assert m.teacher_vocab_size == raw["teacher"]["vocab_size"]
    lm = open_cache(logit_caches["qwen"]).meta
    assert (lm.logits_topk, lm.token_logprobs) == (8, True)
    # a manifest from before top-K logits, token_logprobs and BOS/EOS ids were recorded
    old = {k: v for k, v in raw.items() if k not in ("logits_topk", "token_logprobs", "kv_quant")}
    old["tokenizer"] = {k: v for k, v in raw["tokenizer"].items() if k in ("name", "sha256")}
    o = kc.Manifest.from_dict(old)
    assert (o.logits_topk, o.token_logprobs, o.kv_quant, o.tokenizer.eos_token_id) == (0, False, None, None)


def test_info_summary_reads_the_manifests_fields(caches):
    import json
    from kava_common.info import summary
    raw = json.loads((caches["llama"] / "manifest.json").read_text())
    lines = summary(str(caches["llama"])).splitlines()
    assert lines[1] == f"fingerprint  {raw['fingerprint']}"
    assert lines[3] == (f"data         {raw['dataset']['name']} split train, {raw['dataset']['rows']} rows, "
                        f"template {raw['prompt_template']}")
    assert lines[5] == (f"samples      {raw['num_samples']} ({len(raw['skipped_rows'])} rows skipped, "
                        f"{len(raw['bad_samples'])} bad, {raw['truncated_samples']} truncated at {raw['max_length']} tokens)")
    assert f"{raw['num_tokens']} tokens, {raw['kv_bytes_per_token']} K/V bytes per token" in lines[6]
