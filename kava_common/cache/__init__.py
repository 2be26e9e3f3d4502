"""The K/V cache on disk: the contract between stage 1 (writer) and stage 2 (reader).

- `format`: what a shard holds (tensors, layout, names, checksums)
- `manifest`: a cache's identity, fingerprint and manifest.json
- `write`: shards and sidecars written under temporary names and renamed; the manifest last
- `shard`: one shard file read lazily (memory-mapped), checked against its entry when first opened
- `read`: `open_cache(path)` -> `KVCache`, samples as torch tensors, files opened lazily; its
  public methods (`rows()`, `shards()`, `tokens(i)`, `kv(i)`, ...) are how anything outside
  this package reads a cache
- `verify`: every shard re-hashed against the manifest
- `quant`: int8/int4 K/V in groups (KIVI), quantized when a shard is written, dequantized on read

docs/cache.md describes the format for readers outside kava.
"""

from .format import (ALIGN, CHECKSUM, FORMATS, MANIFEST, META_BYTES_PER_TOKEN, READABLE_SCHEMAS,
                     SCHEMA_VERSION, CacheSample, ShardLayout, checksum_bytes, checksum_file,
                     expected_checksum, round_up, shard_layout, shard_name, shard_tensors,
                     sidecar_name)
from .manifest import (CacheIdentity, DatasetRef, Manifest, ShardEntry, TokenizerRef, build_manifest,
                       fingerprint, is_complete)
from .quant import KV_QUANT, KVQuant, quantize_shard
from .read import KVCache, open_cache
from .verify import verify_cache
from .write import (aligned_bytes, atomic_write_text, completed_shards, remove_partial_files,
                    write_bytes, write_laid_out_shard, write_manifest, write_shard)

__all__ = [
    "ALIGN", "CHECKSUM", "FORMATS", "MANIFEST", "META_BYTES_PER_TOKEN", "READABLE_SCHEMAS",
    "SCHEMA_VERSION", "CacheSample", "ShardLayout", "checksum_bytes", "checksum_file",
    "expected_checksum", "round_up", "shard_layout", "shard_name", "shard_tensors", "sidecar_name",
    "CacheIdentity", "DatasetRef", "Manifest", "ShardEntry", "TokenizerRef", "build_manifest", "fingerprint",
    "is_complete",
    "KVCache", "open_cache", "verify_cache", "KV_QUANT", "KVQuant", "quantize_shard",
    "aligned_bytes", "atomic_write_text", "completed_shards", "remove_partial_files",
    "write_bytes", "write_laid_out_shard", "write_manifest", "write_shard",
]
