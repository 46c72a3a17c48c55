"""Stage `report`: RUN_DIR/summary.json + histories -> report.md, report.html (plots embedded)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from ctprune.errors import CtpruneError
from ctprune.fileio import atomic_write, read_json, write_text
from ctprune.training.loop import read_history


def _fmt(x: Any, suffix: str = "") -> str:
    if x is None:
        return "not reached"
    if isinstance(x, float):
        return f"{x:.2f}{suffix}"
    return f"{x}{suffix}"


def saving(summary: dict[str, Any]) -> dict[str, Any]:
    """Total wall time for all configurations to reach the target: baseline vs composed
    (block tuning included). A configuration that never reached it counts its whole
    finetuning time, and the total is marked as a lower bound."""
    out: dict[str, Any] = {}
    for side in ("baseline", "composed"):
        secs = [c[side]["seconds_to_target"] for c in summary["configurations"]]
        out[f"{side}_all_reached"] = all(s is not None for s in secs)
        out[f"{side}_seconds"] = sum(s if s is not None else c[side]["finetune_seconds"]
                                     for s, c in zip(secs, summary["configurations"]))
    out["tuning_seconds"] = summary["tuning"]["wall_time_s"]
    out["composed_total_seconds"] = out["composed_seconds"] + out["tuning_seconds"]
    out["ratio"] = out["baseline_seconds"] / max(1e-9, out["composed_total_seconds"])
    return out


def _plots(run_dir: Path, summary: dict[str, Any]) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confs = summary["configurations"]
    figs: list[tuple[str, Path]] = []
    fig, axes = plt.subplots(1, len(confs), figsize=(4 * len(confs), 3.4), squeeze=False)
    for ax, c in zip(axes[0], confs):
        for side, color in (("baseline", "tab:gray"), ("composed", "tab:blue")):
            rows = read_history(run_dir / c[side]["dir"] / "history.csv")
            x = [float(r["wall_time_s"]) for r in rows]
            if side == "composed":
                x = [v + summary["tuning"]["wall_time_s"] for v in x]
            ax.plot(x, [float(r["val_bleu"]) for r in rows], marker="o", color=color, label=side)
        if summary["target_bleu"] is not None:
            ax.axhline(summary["target_bleu"], ls="--", color="tab:red", lw=1, label="target")
        ax.set(title=f"configuration {c['index']}", xlabel="wall time (s; composed incl. block tuning)",
               ylabel="val BLEU")
        ax.legend(fontsize=7)
    fig.tight_layout()
    figs.append(("val BLEU vs finetuning wall time", run_dir / "plot_bleu_vs_time.png"))
    atomic_write(figs[-1][1], lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    o = summary["origin"]
    ax.scatter([o["nonzero_params"] / 1e6], [o["test_bleu"]], marker="*", s=150, color="k", label="origin")
    for side, color in (("baseline", "tab:gray"), ("composed", "tab:blue")):
        ax.scatter([c[side]["nonzero_params"] / 1e6 for c in confs], [c[side]["test_bleu_best"] for c in confs],
                   color=color, label=side)
    for c in confs:
        ax.annotate(str(c["index"]), (c["composed"]["nonzero_params"] / 1e6, c["composed"]["test_bleu_best"]))
    ax.set(xlabel="non-zero parameters (M)", ylabel="test BLEU (best)", title="size vs BLEU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    figs.append(("size vs BLEU", run_dir / "plot_size_vs_bleu.png"))
    atomic_write(figs[-1][1], lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    block = run_dir / summary["tuned_bank"] / "block_loss.png"
    if block.exists():
        figs.append(("block-tuning loss", block))
    return figs


def write_report(run_dir: Path) -> Path:
    """Write report.md and a self-contained report.html from RUN_DIR/summary.json."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").exists():
        raise CtpruneError(f"{run_dir} has no summary.json; is it a finished `ctprune run` folder?")
    s = read_json(run_dir / "summary.json")
    sv = saving(s)
    o = s["origin"]
    lines = [f"# ctprune experiment report: {s['experiment']}", "",
             f"Origin model: val BLEU {o['val_bleu']}, test BLEU {o['test_bleu']}, {o['params']:,} parameters, "
             f"{o['flops_per_token'] / 1e6:.1f} MFLOPs per target token. Target BLEU (val, greedy): "
             f"{_fmt(s['target_bleu'])}.", "",
             "## What composability saved", "",
             f"Total wall time for all {len(s['configurations'])} configurations to reach the target: "
             f"baseline {'' if sv['baseline_all_reached'] else '>= '}{sv['baseline_seconds']:.1f} s, "
             f"composed {sv['composed_total_seconds']:.1f} s ({sv['composed_seconds']:.1f} s finetuning + "
             f"{sv['tuning_seconds']:.1f} s block tuning, once for all). "
             f"**Saving: {sv['ratio']:.2f}x**"
             + ("" if sv["composed_all_reached"] else " (some composed runs did not reach the target)") + ".",
             "", "## Configurations", "",
             "| # | params | non-zero | FLOPs/token | latency vs origin | test BLEU base ep0 / best | "
             "test BLEU comp ep0 / best | epochs to target base / comp | seconds to target base / comp |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in s["configurations"]:
        b, m = c["baseline"], c["composed"]
        lines.append(
            f"| {c['index']} | {m['params']:,} | {m['nonzero_params']:,} | {m['flops_per_token'] / 1e6:.1f}M "
            f"({m['flops_per_token'] / o['flops_per_token']:.2f}x) | {m['latency_ratio']:.2f}x | "
            f"{b['test_bleu_epoch0']} / {b['test_bleu_best']} | {m['test_bleu_epoch0']} / {m['test_bleu_best']} | "
            f"{_fmt(b['epochs_to_target'])} / {_fmt(m['epochs_to_target'])} | "
            f"{_fmt(b['seconds_to_target'])} / {_fmt(m['seconds_to_target'])} |")
    lines += ["", "Seconds are training wall time (evaluation excluded). Composed configurations start "
              "from block variants tuned once against the frozen origin; baseline from merely pruned ones.",
              "", "## Plots", ""]
    figs = _plots(run_dir, s)
    lines += [f"![{title}]({p.relative_to(run_dir)})" for title, p in figs]
    t = s["tuning"]
    lines += ["", "## Provenance", "",
              f"- block tuning: {t['variants']} variants, {t['epochs_done']} epochs, {t['wall_time_s']} s, "
              f"{t['train_tokens']:,} tokens",
              f"- sacreBLEU signature: `{s['bleu_signature']}`; chrF: `{s['chrf_signature']}`",
              f"- seed {s['seed']}, corpus {s['corpus']}, versions {s['versions']}",
              f"- machine: {s['machine']}", ""]
    md = "\n".join(lines)
    write_text(run_dir / "report.md", md)
    body = [html.escape(x) for x in lines if not x.startswith("![")]
    imgs = "".join(f"<h3>{html.escape(title)}</h3><img src='data:image/png;base64,"
                   f"{base64.b64encode(p.read_bytes()).decode()}'/>" for title, p in figs)
    page = ("<!doctype html><meta charset='utf-8'><title>ctprune report</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}pre{white-space:pre-wrap}"
            "img{max-width:100%}</style>"
            f"<pre>{chr(10).join(body)}</pre>{imgs}")
    write_text(run_dir / "report.html", page)
    return run_dir / "report.md"
