"""Training histories: ``history.csv`` beside a trained model (one row per evaluation) and, read
by the same function, a bank's block-tuning history (one row per variant and epoch; its writer is
``ctprune.pruning.block_history``). Plain CSV, no torch: the bank, the report and the experiment
graph read them without loading the training loop.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from ctprune.errors import CtpruneError
from ctprune.fileio import read_json, read_text, verify_file, write_text

HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_bleu", "lr", "epoch_time_s",
                  "wall_time_s", "train_tokens", "train_flops")


def read_history(path: Path) -> list[dict[str, str]]:
    """Rows of a history CSV (training or block tuning), validated before any number is derived
    from them: complete rows, numeric columns that parse, epochs in order (a training history:
    increasing, no whole epoch skipped, fractional where evaluated within an epoch, ``eval_every``;
    block tuning: whole epochs). A history beside a ``train_summary.json`` must match the size and SHA-256 it
    records, so a truncated or edited finished history is refused. A missing file: no rows."""
    path = Path(path)
    if not path.is_file():
        return []
    summary = path.parent / "train_summary.json"
    if path.name == "history.csv" and summary.is_file():
        record = read_json(summary, "training summary")
        if isinstance(record, dict) and "history" in record:
            verify_file(path, record["history"], "history", str(summary))
    rows = list(csv.DictReader(io.StringIO(read_text(path, "history"), newline="")))
    fields = list(rows[0]) if rows else []
    if rows and "epoch" not in fields:
        raise CtpruneError(f"history {path} has no \"epoch\" column")
    prev = None
    for i, row in enumerate(rows, start=2):
        if None in row or any(v is None for v in row.values()):
            raise CtpruneError(f"history {path}, line {i}: truncated or extra fields")
        for col, value in row.items():
            if col == "variant" or value == "":
                continue
            try:
                float(value)
            except ValueError:
                raise CtpruneError(f"history {path}, line {i}: {col} {value!r} is not a number") from None
        training = "variant" not in row
        if not row["epoch"].isdigit() and not (training and _is_fraction(row["epoch"])):
            raise CtpruneError(f"history {path}, line {i}: epoch {row['epoch']!r} is not a whole number"
                               + (" or a fraction of epochs (1.25)" if training else ""))
        epoch = float(row["epoch"])
        if prev is not None and (not prev < epoch <= math.floor(prev) + 1 if training else epoch < prev):
            raise CtpruneError(f"history {path}, line {i}: epoch {row['epoch']} after epoch {prev:g}")
        prev = epoch
    return rows


def _is_fraction(text: str) -> bool:
    """``1.25``: digits, a point, digits (a sub-epoch evaluation's epoch)."""
    whole, point, frac = text.partition(".")
    return whole.isdigit() and point == "." and frac.isdigit()


def epoch_text(epoch: float) -> str:
    """A history's epoch: ``2`` at the end of an epoch, ``1.25`` within one."""
    return str(int(epoch)) if float(epoch).is_integer() else f"{epoch:.6f}".rstrip("0")


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write a training history (``HISTORY_FIELDS``; other keys of ``rows`` are left out) atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())
