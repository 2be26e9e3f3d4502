"""Which torch device a run uses (shared by both stages and evaluation)."""

from __future__ import annotations

import torch

from . import KavaError


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU; asking for CUDA without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise KavaError(f"--device {device}: choose auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KavaError(f"--device {device}: CUDA is not available on this machine")
    return dev
