"""Stage-1 settings: one dataclass, checked as a whole."""

from __future__ import annotations

from dataclasses import dataclass

from kava_common.cache import FORMATS
from kava_common.cache.quant import KV_QUANT, V_SPANS, KVQuant
from kava_common.cli import choice_problems, coerce_settings, setting
from kava_common.geometry import DTYPES
from kava_common.rkv import SELECTS

CPU_4BIT_KERNELS = ("auto", "packed", "plain")


@dataclass
class ExtractConfig:
    """Stage-1 settings; each field is a flag of `python -m stage1_extract` (kava_common.cli)."""
    teachers: list[str] = setting(list, "hub id or local folder; repeat for several teachers, one cache each",
                                  flag="--teacher", repeat=True, metavar="NAME")
    dataset: str = setting("synthetic", "gsm8k (hub) | synthetic | synthetic-hard | synthetic-varied | PATH to "
                           ".jsonl/.json/.parquet or a saved datasets folder with `question` and `answer`")
    split: str = setting("train", "data set split")
    out: str = setting("data_cache", "root folder; each cache is a folder under it named by fingerprint")
    max_samples: int | None = setting(None, "first N rows of the split only")
    batch_size: int = setting(8, "samples per forward pass")
    max_length: int = setting(512, "tokens per sample; longer samples are cut and flagged `truncated`")
    layers: list[int] | None = setting(None, "teacher layers to keep, e.g. 0,2,5 (default: all)")
    kv_dtype: str = setting("float16", "stored dtype of K and V", choices=tuple(DTYPES))
    kv_quant: str = setting("none", "store K/V as int8 or int4 codes in groups (KIVI: keys per channel, values "
                            "per token; kava_common.cache.quant), read back dequantized", choices=KV_QUANT)
    kv_quant_group: int = setting(128, "tokens per key group and channels per value group of --kv-quant")
    kv_quant_v_span: str = setting("token", "a value group spans the channels of all KV heads of a token, or "
                                   "stays inside one head (fewer groups stored at a small head_dim, or "
                                   "per-head ranges)", choices=V_SPANS)
    kv_quant_v_symmetric: bool = setting(False, "value groups store a scale only, codes centred on zero "
                                         "(half the value groups' bytes, a range about twice as wide)")
    format: str = setting("safetensors", "shard format; one reader for both", choices=tuple(FORMATS))
    logits_topk: int = setting(0, "also store the teacher's top-K next-token log-probabilities and ids, and "
                               "the log-probability of the actual next token, at every position (for logit "
                               "distillation and confidence weighting; 0: none)")
    rkv_slots: int = setting(0, "also store the chain of thought's K/V compressed to M slots per stored layer and "
                             "KV head, chosen R-KV-style (importance to the answer and novelty; "
                             "kava_common.rkv), for a latent-reasoning student; 0: none")
    rkv_lambda: float = setting(0.1, "--rkv-slots: the weight of importance against redundancy, in [0, 1]")
    rkv_select: str = setting("rkv", "--rkv-slots: chosen by R-KV's score (rkv), evenly spaced over the chain of "
                              "thought (even, an ablation), or the tokens of its calculator results, GSM8K's "
                              "<<a*b=c>>c, one per step in order (results); the importance is stored either way",
                              choices=SELECTS)
    store_hidden: bool = setting(False, "also store the hidden state every teacher layer outputs at the token before "
                                 "the answer (the CODI target for a latent-reasoning student); every layer then runs")
    quantize: bool = setting(True, "run the teacher in 4-bit (bitsandbytes); --no-quantize: unquantized in --dtype")
    quant_type: str = setting("nf4", "4-bit data type", choices=("nf4", "fp4"))
    double_quant: bool = setting(False, "bitsandbytes nested quantization of the 4-bit scales")
    cpu_4bit_kernel: str = setting("auto", "bitsandbytes 4-bit path on a CPU: packed needs AVX512-BF16; "
                                   "auto takes it there unless the CPU also has AMX, where plain is faster",
                                   choices=CPU_4BIT_KERNELS)
    dtype: str = setting("auto", "unquantized teacher dtype (auto: float32 on a CPU, bfloat16 on a GPU)",
                         choices=("auto", *DTYPES))
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    revision: str | None = setting(None, "hub revision of every teacher")
    shard_mb: float = setting(128.0, "target shard size in MB (shards hold whole samples)")
    disk_check: bool = setting(True, "refuse to start when the size estimate exceeds the free space")
    seed: int = setting(0, "seed of the synthetic data sets")
    num_shards: int = setting(1, "processes splitting the work into one cache (one per GPU, a SLURM array, ...)")
    shard_index: int = setting(0, "this process's part, 0..N-1: shards i with i %% num_shards == index; "
                               "the last to finish writes the manifest")
    direct_io: bool = setting(True, "write shards with O_DIRECT where the file system allows "
                              "(--no-direct-io: through the page cache; same files)")
    progress: bool = setting(True, "show a progress bar")
    padding_side: str = setting("right", "padding inside a batch; results do not depend on it", cli=False,
                                choices=("right", "left"))
    writer_queue: int = setting(2, "shards waiting for the background writer", cli=False)

    def __post_init__(self):
        problems = coerce_settings(self)        # every other check needs the types right
        if problems:
            raise ValueError("invalid stage-1 settings:\n  " + "\n  ".join(problems))
        problems += choice_problems(self)
        if not self.teachers:
            problems.append("--teacher: give at least one teacher (hub id or local path)")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_length < 1:
            problems.append(f"--max-length must be >= 1, got {self.max_length}")
        if self.max_samples is not None and self.max_samples < 0:
            problems.append(f"--max-samples must be >= 0, got {self.max_samples}")
        if not self.quantize and self.double_quant:
            problems.append("--double-quant needs a quantized teacher (drop --no-quantize)")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            problems.append(f"--layers must list distinct layer indices, got {self.layers}")
        if self.kv_quant_group < 1:
            problems.append(f"--kv-quant-group must be >= 1, got {self.kv_quant_group}")
        if self.kv_quant_v_symmetric and self.kv_quant == "none":
            problems.append("--kv-quant-v-symmetric needs --kv-quant int8 or int4")
        if self.logits_topk < 0:
            problems.append(f"--logits-topk must be >= 0, got {self.logits_topk}")
        if self.rkv_slots < 0:
            problems.append(f"--rkv-slots must be >= 0, got {self.rkv_slots}")
        if not 0.0 <= self.rkv_lambda <= 1.0:
            problems.append(f"--rkv-lambda must lie in [0, 1], got {self.rkv_lambda}")
        if self.shard_mb <= 0:
            problems.append(f"--shard-mb must be > 0, got {self.shard_mb}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            problems.append(f"--shard-index must be in 0..{self.num_shards - 1} for --num-shards "
                            f"{self.num_shards}, got {self.shard_index}")
        if problems:
            raise ValueError("invalid stage-1 settings:\n  " + "\n  ".join(problems))

    @property
    def quant(self) -> KVQuant | None:
        """The K/V quantization of --kv-quant, or None."""
        return KVQuant.parse(self.kv_quant, self.kv_quant_group, self.kv_quant_v_span, self.kv_quant_v_symmetric)
