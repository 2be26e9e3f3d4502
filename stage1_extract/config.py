"""Stage-1 settings: one dataclass, checked as a whole."""

from __future__ import annotations

from dataclasses import dataclass

from kava_common.cache import FORMATS
from kava_common.geometry import DTYPES


@dataclass
class ExtractConfig:
    teachers: list[str]                  # hub ids or local paths, one cache each
    dataset: str = "synthetic"           # gsm8k | synthetic | PATH (.jsonl/.json/.parquet/folder)
    split: str = "train"
    out: str = "data_cache"              # root; each cache is a folder under it named by fingerprint
    max_samples: int | None = None       # first N rows of the split (None: all)
    batch_size: int = 8                  # samples per forward pass
    max_length: int = 512                # tokens; longer samples are cut and flagged `truncated`
    layers: list[int] | None = None      # teacher layer indices to keep (None: all)
    kv_dtype: str = "float16"            # stored dtype of K and V
    format: str = "safetensors"          # safetensors | hdf5
    quantize: bool = True                # 4-bit bitsandbytes teacher; False: unquantized
    quant_type: str = "nf4"              # nf4 | fp4
    double_quant: bool = False           # bitsandbytes nested quantization of the scales
    cpu_4bit_kernel: str = "auto"        # 4-bit on a CPU: auto | packed (AVX512-BF16) | plain
    dtype: str = "auto"                  # unquantized teacher dtype (auto: float32 on CPU, bf16 on GPU)
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    revision: str | None = None          # hub revision of every teacher
    shard_mb: float = 128.0              # target shard size in MB (shards hold whole samples)
    disk_check: bool = True              # refuse to start when the estimate exceeds free space
    seed: int = 0                        # seed of the synthetic data set
    num_shards: int = 1                  # processes splitting the work (one per GPU, SLURM array, ...)
    shard_index: int = 0                 # this process: takes shards i with i % num_shards == index
    padding_side: str = "right"          # padding inside a batch; results do not depend on it
    progress: bool = True                # show a progress bar
    writer_queue: int = 2                # shards waiting for the background writer
    direct_io: bool = True               # O_DIRECT shard writes where the file system allows

    def __post_init__(self):
        problems = []
        if not self.teachers:
            problems.append("--teacher: give at least one teacher (hub id or local path)")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_length < 1:
            problems.append(f"--max-length must be >= 1, got {self.max_length}")
        if self.max_samples is not None and self.max_samples < 0:
            problems.append(f"--max-samples must be >= 0, got {self.max_samples}")
        if self.kv_dtype not in DTYPES:
            problems.append(f"--kv-dtype {self.kv_dtype!r}: choose one of {sorted(DTYPES)}")
        if self.format not in FORMATS:
            problems.append(f"--format {self.format!r}: choose one of {sorted(FORMATS)}")
        if self.quant_type not in ("nf4", "fp4"):
            problems.append(f"--quant-type {self.quant_type!r}: choose nf4 or fp4")
        if self.cpu_4bit_kernel not in ("auto", "packed", "plain"):
            problems.append(f"--cpu-4bit-kernel {self.cpu_4bit_kernel!r}: choose auto, packed or plain")
        if self.dtype not in ("auto", *DTYPES):
            problems.append(f"--dtype {self.dtype!r}: choose auto or one of {sorted(DTYPES)}")
        if not self.quantize and self.double_quant:
            problems.append("--double-quant needs a quantized teacher (drop --no-quantize)")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            problems.append(f"--layers must list distinct layer indices, got {self.layers}")
        if self.shard_mb <= 0:
            problems.append(f"--shard-mb must be > 0, got {self.shard_mb}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            problems.append(f"--shard-index must be in 0..{self.num_shards - 1} for --num-shards "
                            f"{self.num_shards}, got {self.shard_index}")
        if self.padding_side not in ("left", "right"):
            problems.append(f"padding_side must be left or right, got {self.padding_side!r}")
        if problems:
            raise ValueError("invalid stage-1 settings:\n  " + "\n  ".join(problems))
