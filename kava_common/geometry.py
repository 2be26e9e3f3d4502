"""KV-cache geometry of a decoder model, read from its config (never typed in)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def dtype_bytes(name: str) -> int:
    """Bytes per element of a stored K/V dtype name such as 'float16'."""
    if name not in DTYPES:
        raise ValueError(f"unknown kv dtype {name!r}; choose one of {sorted(DTYPES)}")
    return torch.empty(0, dtype=DTYPES[name]).element_size()


@dataclass(frozen=True)
class KVGeometry:
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    rope: dict  # RoPE settings as the config states them (theta, scaling type)

    @classmethod
    def from_config(cls, config: Any) -> "KVGeometry":
        """Read the geometry from a transformers config.

        KV heads come from `num_key_value_heads` (falling back to the query heads only for
        models without GQA), head_dim from the config when set, else hidden_size // heads.
        """
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        n_heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        rope = getattr(config, "rope_parameters", None)
        if rope is None:  # transformers 4.x configs
            rope = {"rope_theta": getattr(config, "rope_theta", None),
                    "rope_scaling": getattr(config, "rope_scaling", None)}
        return cls(config.num_hidden_layers, n_heads, kv_heads, head_dim, _jsonable(rope))

    def bytes_per_token(self, kv_dtype: str = "float16", layers: list[int] | None = None) -> int:
        """K+V bytes for one token over the given layers (all layers by default)."""
        n = self.num_layers if layers is None else len(layers)
        return n * 2 * self.num_kv_heads * self.head_dim * dtype_bytes(kv_dtype)

    def to_dict(self) -> dict:
        return asdict(self)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
