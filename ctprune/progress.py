"""Progress bars that stay quiet in logs.

On a terminal a bar redraws as usual; when stderr is a file or a pipe (a log, CI, `ctprune run`
under nohup) bars are off, so a log holds only the per-epoch / per-stage lines that the stages
print with ``tqdm.write`` (one seed-model training otherwise appended ~390 kB of redraws).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def bars_on() -> bool:
    """Whether progress bars may draw: stderr is open and a terminal. Libraries' own bars (Hugging
    Face's "Loading weights") follow the same rule (``ctprune.arch.hf.quiet_transformers``)."""
    return sys.stderr is not None and sys.stderr.isatty()


def progress(iterable: Iterable[T], disable: bool = False, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, ...)``, disabled unless stderr is a terminal."""
    return tqdm(iterable, disable=disable or not bars_on(), **kwargs)
