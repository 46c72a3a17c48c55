"""A bank's block-tuning history: ``history.csv`` (one row per variant and epoch, epoch 0 being the
merely pruned variant) and its plot ``block_loss.png``."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ctprune.fileio import atomic_write, write_text

HISTORY_FIELDS = ("epoch", "variant", "train_loss", "val_loss", "wall_time_s")


def write_block_history(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def plot_block_losses(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in dict.fromkeys(r["variant"] for r in history):
        rows = [r for r in history if r["variant"] == key]
        ax.plot([int(r["epoch"]) for r in rows], [float(r["val_loss"]) for r in rows], marker="o",
                lw=1, ms=3, label=key)
    ax.set(xlabel="block-tuning epoch (0 = merely pruned)", ylabel="normalised block MSE (val)",
           yscale="log", title="Block tuning: every variant against the frozen origin")
    if len({r["variant"] for r in history}) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
