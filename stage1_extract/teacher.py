"""Loading a teacher: tokenizer and config first (cheap), weights later, 4-bit by default."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from kava_common import KavaError, no_hf_progress_bars
from kava_common.geometry import DTYPES


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device supports it, else fp16 (older GPUs)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def load_tokenizer(name: str, revision: str | None = None):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(name, revision=revision)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"teacher {name!r}: a fast tokenizer is needed (character offsets); "
                         "this one is a slow Python tokenizer")
    return tok


def weights_identity(name: str, config) -> str:
    """Identify the weights without reading them all: the hub commit, or for a local folder a
    hash of the config and each weight file's name, size, first and last MiB."""
    path = Path(name)
    if not path.is_dir():
        return f"hub:{getattr(config, '_commit_hash', None) or 'unknown-revision'}"
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
    return f"local:{h.hexdigest()[:32]}"


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


def load_teacher(name: str, quant: dict, device: torch.device, revision: str | None = None):
    """Load the teacher's weights for inference as `quant` describes, in eval mode."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    device_map = "cpu" if device.type == "cpu" else {"": device.index or 0}
    kwargs = {"revision": revision, "device_map": device_map, "attn_implementation": "sdpa"}
    if quant["method"] == "bitsandbytes":
        cdt = DTYPES[quant["compute_dtype"]]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant["quant_type"],
            bnb_4bit_use_double_quant=quant["double_quant"], bnb_4bit_compute_dtype=cdt)
        kwargs["dtype"] = cdt
    else:
        kwargs["dtype"] = DTYPES[quant["dtype"]]
    with no_hf_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs).eval()
    if quant["method"] == "bitsandbytes":
        import bitsandbytes as bnb
        n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        if n4 == 0:
            raise KavaError(f"teacher {name!r} was asked for 4-bit but holds no 4-bit layers")
        quant["linear4bit_modules"] = n4
    return model


def model_summary(name: str, config) -> dict:
    return {"name": name, "architecture": (config.architectures or [config.model_type])[0],
            "model_type": config.model_type,
            "config_sha256": hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True,
                                                       default=str).encode()).hexdigest()[:32]}
