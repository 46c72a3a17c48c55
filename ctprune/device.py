"""Device choice: cuda when present unless told otherwise."""

from __future__ import annotations

import re

import torch

from ctprune.errors import CtpruneError


def resolve_device(device: str | None) -> str:
    """``auto`` (or None): cuda when present, else cpu; ``cpu``, ``cuda`` or ``cuda:N`` checked
    against what this process sees (so a worker resolves its own)."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if not re.fullmatch(r"cuda(:\d+)?", str(device)):
        raise CtpruneError(f"unknown device {device!r}; choose auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise CtpruneError(f"--device {device} was asked for but no CUDA device is available")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise CtpruneError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
