"""Device choice: cuda when present unless told otherwise."""

from __future__ import annotations

import torch

from ctprune.errors import CtpruneError


def resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise CtpruneError(f"unknown device {device!r}; choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise CtpruneError("--device cuda was asked for but no CUDA device is available")
    return device
