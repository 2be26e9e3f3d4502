"""Loading a teacher: tokenizer and config first (cheap), weights later, 4-bit by default."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from kava_common import KavaError, cpu_flags, import_bitsandbytes, no_hf_progress_bars
from kava_common.geometry import DTYPES

from .config import CPU_4BIT_KERNELS

PACK_BLOCK_N = 32   # bitsandbytes' packed CPU kernel takes output features in blocks of 32


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device supports it, else fp16 (older GPUs)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def load_tokenizer(name: str, revision: str | None = None):
    from kava_common.data import load_fast_tokenizer
    return load_fast_tokenizer(name, "teacher", revision)


def weights_identity(name: str, config) -> str:
    """Identify the weights: the hub commit, or for a local folder a hash of every byte of its
    weight and config files (xxh3, several GB/s: a second or so for a 1.5B teacher from the
    page cache, little beside its forward over a data set). Any changed weight gives another
    fingerprint, so another cache folder, never a resume into a mix."""
    path = Path(name)
    if not path.is_dir():
        return f"hub:{getattr(config, '_commit_hash', None) or 'unknown-revision'}"
    from kava_common.cache import checksum_file
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
            h.update(f"{f.name}:{checksum_file(f)}".encode())
    return f"local-xxh3:{h.hexdigest()[:32]}"


def quantization_settings(quantize: bool, quant_type: str, double_quant: bool,
                          device: torch.device, dtype: str) -> dict:
    """What the manifest records about how the teacher ran."""
    if quantize:
        return {"method": "bitsandbytes", "bits": 4, "quant_type": quant_type,
                "double_quant": double_quant,
                "compute_dtype": str(compute_dtype(device)).replace("torch.", "")}
    if dtype == "auto":
        dtype = "float32" if device.type == "cpu" else str(compute_dtype(device)).replace("torch.", "")
    return {"method": "none", "dtype": dtype}


def packable(module) -> bool:
    """Whether bitsandbytes' packed CPU kernel can take this 4-bit linear. Its repacking
    asserts out_features % 32 == 0 (a 48-wide k_proj fails) and reshapes the scales to one
    per quantization block of each row, so in_features must be a multiple of the block size
    (64 by default: a 48-wide hidden size fails)."""
    state = getattr(module.weight, "quant_state", None)
    block = getattr(state, "blocksize", None) or 64
    return module.out_features % PACK_BLOCK_N == 0 and module.in_features % block == 0


def cpu_4bit_path(kernel: str, has_avx512bf16: bool, has_amx: bool) -> str:
    """Which bitsandbytes CPU path `kernel` (auto, packed, plain) takes on a CPU with these
    features: "packed" or "plain".

    `auto` takes the plain path on a CPU with AMX: there dequantizing to bf16 and multiplying
    on AMX ran the tiny benchmark teacher 1.75x and a Qwen2.5-1.5B-shaped one 6x faster than
    the packed kernel (bench_extract.py, docs/benchmarks.md). On a CPU with AVX512-BF16 and no
    AMX it takes the packed path (bitsandbytes' own choice there); elsewhere there is only the
    plain path."""
    if kernel not in CPU_4BIT_KERNELS:
        raise ValueError(f"cpu 4-bit kernel {kernel!r}: choose one of {CPU_4BIT_KERNELS}")
    if kernel == "packed" and not has_avx512bf16:
        raise KavaError("--cpu-4bit-kernel packed: this CPU has no AVX512-BF16, which bitsandbytes' "
                        "packed 4-bit kernel needs; use auto or plain")
    packed = has_avx512bf16 and (kernel == "packed" or (kernel == "auto" and not has_amx))
    return "packed" if packed else "plain"


def choose_cpu_4bit_kernel(model, kernel: str = "auto") -> dict:
    """Set which bitsandbytes CPU path each 4-bit linear of `model` takes; returns what the
    manifest records.

    On a CPU with AVX512-BF16, bitsandbytes repacks each 4-bit weight on its first eval
    forward for a bf16 kernel ("packed"); elsewhere, or when told not to, it dequantizes on
    every call ("plain"). Both compute with the same NF4/FP4 weights; `cpu_4bit_path` says
    which one `kernel` takes. On the packed path the linears that it cannot pack (see
    `packable`) stay on the plain path instead of crashing. The choice is bitsandbytes'
    per-module flag `support_avx512bf16_for_cpu`, read at each forward."""
    bnb = import_bitsandbytes()
    from bitsandbytes.functional import has_avx512bf16
    use_packed = cpu_4bit_path(kernel, bool(has_avx512bf16()), "amx_bf16" in cpu_flags()) == "packed"
    plain = []
    for mname, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = use_packed and packable(m)
            if use_packed and not m.support_avx512bf16_for_cpu:
                plain.append(mname)
    return {"cpu_kernel": "packed" if use_packed else "plain", "cpu_plain_modules": plain}


def load_teacher(name: str, quant: dict, device: torch.device, revision: str | None = None,
                 cpu_4bit_kernel: str = "auto"):
    """Load the teacher's weights for inference as `quant` describes, in eval mode. A 4-bit
    teacher on the CPU gets its bitsandbytes kernel chosen (`choose_cpu_4bit_kernel`) and
    `quant` records the choice."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    device_map = "cpu" if device.type == "cpu" else {"": device.index or 0}
    kwargs = {"revision": revision, "device_map": device_map, "attn_implementation": "sdpa"}
    if quant["method"] == "bitsandbytes":
        import_bitsandbytes()
        cdt = DTYPES[quant["compute_dtype"]]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant["quant_type"],
            bnb_4bit_use_double_quant=quant["double_quant"], bnb_4bit_compute_dtype=cdt)
        kwargs["dtype"] = cdt
    else:
        kwargs["dtype"] = DTYPES[quant["dtype"]]
    from safetensors import SafetensorError
    try:
        with no_hf_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs).eval()
    except (OSError, SafetensorError) as e:      # missing, truncated or unreadable weight files
        raise KavaError(f"teacher {name!r}: its weights could not be loaded "
                        f"({str(e).strip().splitlines()[0]})") from e
    if quant["method"] == "bitsandbytes":
        bnb = import_bitsandbytes()
        n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        if n4 == 0:
            raise KavaError(f"teacher {name!r} was asked for 4-bit but holds no 4-bit layers")
        quant["linear4bit_modules"] = n4
        if device.type == "cpu":
            quant.update(choose_cpu_4bit_kernel(model, cpu_4bit_kernel))
    return model


def model_summary(name: str, config) -> dict:
    """What the manifest records of the teacher's model: name, architecture, the rows of its
    output layer (`vocab_size`: top-K ids are below it) and a hash of its config."""
    return {"name": name, "architecture": (config.architectures or [config.model_type])[0],
            "model_type": config.model_type, "vocab_size": config.get_text_config().vocab_size,
            "hidden_size": config.get_text_config().hidden_size,
            "config_sha256": hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True,
                                                       default=str).encode()).hexdigest()[:32]}
