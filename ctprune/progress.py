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


def progress(iterable: Iterable[T], disable: bool = False, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, ...)``, disabled unless stderr is a terminal."""
    return tqdm(iterable, disable=disable or not sys.stderr.isatty(), **kwargs)
