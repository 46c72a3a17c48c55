"""Stage `tune-blocks`: bank -> tuned bank, by local distillation against the frozen origin.

For each batch, ONE forward pass of the frozen origin model records every prunable module's
input and output; every variant of that module runs on the same input and learns to reproduce
the output (MSE normalised by the output's mean square, so modules of any scale weigh alike).
A variant's input is always the origin's activation, so variants stay independent and any
configuration can use any of them.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ctprune.arch import arch_of
from ctprune.data.batching import Batch, TokenizedSplit
from ctprune.data.corpus import default_splits, load_split
from ctprune.device import resolve_device
from ctprune.errors import CtpruneError
from ctprune.fileio import (
    atomic_write,
    check_existing,
    check_output,
    commit_dir,
    locked,
    read_json,
    refuse_symlinks,
    sweep_commits,
    write_json,
    write_text,
)
from ctprune.model.checkpoint import load_model_folder
from ctprune.model.flops import BACKWARD_FACTOR
from ctprune.progress import progress
from ctprune.pruning.bank import (
    INDEX_FILE,
    check_bank_model,
    check_index,
    load_index,
    load_variant,
    save_variant,
)
from ctprune.pruning.configs import model_fingerprint
from ctprune.spec import TuningSpec
from ctprune.training.loop import Recipe, make_optimizer, optimizer_step, preset_max_tokens, read_history

HISTORY_FIELDS = ("epoch", "variant", "train_loss", "val_loss", "wall_time_s")


class Recorder:
    """Hooks on the origin that keep each unit's last call: the inputs of the module that receives
    the unit's input and the output of the module that returns its output (the unit's own block,
    or e.g. a Marian FFN's fc1 and fc2), and the side (encoder/decoder) whose tokens it sees."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        arch = arch_of(model)
        units = arch.units(model)
        self.sides = {n: units[n].side for n in names}
        self.inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.outputs: dict[str, Tensor] = {}
        self.handles = []
        for n in names:
            first, last = arch.io_modules(model, n)
            self.handles.append(first.register_forward_pre_hook(self._keep_inputs(n), with_kwargs=True))
            self.handles.append(last.register_forward_hook(self._keep_output(n)))

    def _keep_inputs(self, name: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.inputs[name] = (args, kwargs)
        return hook

    def _keep_output(self, name: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            self.outputs[name] = out[0] if isinstance(out, tuple) else out  # HF attention: (output, ...)
        return hook

    def call(self, name: str, block: nn.Module) -> tuple[Tensor, Tensor]:
        """(``block`` run on unit ``name``'s recorded input, the unit's recorded output)."""
        args, kwargs = self.inputs[name]
        out = block(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out, self.outputs[name]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def block_losses(origin: nn.Module, variants: dict[str, nn.Module], modules: dict[str, str],
                 rec: Recorder, batch: Batch) -> dict[str, Tensor]:
    """One teacher pass, then each variant's normalised MSE on its module's recorded call
    (computed in fp32 whatever precision the passes ran in)."""
    with torch.no_grad():
        arch_of(origin).logits(origin, batch.src, batch.tgt_in)
    keep = {"encoder": batch.src != batch.pad_id, "decoder": batch.tgt_out != batch.pad_id}  # (B, T) real tokens
    losses = {}
    for key, variant in variants.items():
        pred, target = rec.call(modules[key], variant)
        pred, target = pred.float(), target.float()
        m = keep[rec.sides[modules[key]]]
        err = ((pred - target) ** 2).mean(-1)[m].mean()
        losses[key] = err / target[m].pow(2).mean().clamp_min(1e-8)
    return losses


def _summed_loss(out: list[Tensor], *args: Any) -> Tensor:
    """Sum of ``block_losses(*args)``; the per-variant losses are appended to ``out``."""
    out.extend(block_losses(*args).values())
    return torch.stack(out).sum()


def tuning_step_flops(origin: nn.Module, variants: dict[str, nn.Module], modules: dict[str, str],
                      batch: Batch) -> tuple[int, dict[str, int]]:
    """Analytic FLOPs of one tuning step on the padded batch: the teacher's forward pass, and per
    variant its forward and backward pass."""
    (b, s), t = batch.src.shape, batch.tgt_in.shape[1]
    arch = arch_of(origin)
    teacher = b * arch.forward_flops(origin, s, t)
    return teacher, {k: (1 + BACKWARD_FACTOR) * b * arch.block_flops(origin, modules[k], v, s, t)
                     for k, v in variants.items()}


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


@torch.no_grad()
def _validate(origin: nn.Module, variants: dict[str, nn.Module], modules: dict[str, str],
              rec: Recorder, batches: list[Batch], bf16: bool) -> dict[str, float]:
    totals = torch.zeros(len(variants))
    for b in batches:
        with torch.autocast(b.src.device.type, dtype=torch.bfloat16, enabled=bf16):
            totals += torch.stack(list(block_losses(origin, variants, modules, rec, b).values())).cpu()
    return dict(zip(variants, (totals / max(1, len(batches))).tolist()))


TUNING_MARK = ".tune-blocks"  # in a bank that tune-blocks made: its own work, safe to resume or redo


# What tune-blocks writes into its output beside the copied bank's own entries.
OWN_ENTRIES = (TUNING_MARK, ".state", INDEX_FILE, "history.csv", "block_loss.png")


def _is_tuning_output(path: Path) -> bool:
    """A folder tune-blocks made: its mark (written before the copy is renamed into place), or a
    tuning state from before marks existed."""
    return path.is_dir() and not path.is_symlink() and (
        (path / TUNING_MARK).is_file() or (path / ".state" / "state.pt").is_file())


def _foreign_entries(output: Path, bank: Path) -> list[str]:
    """Entries of ``output`` that neither tune-blocks nor the copy of ``bank`` put there."""
    mine = set(OWN_ENTRIES) | {p.name for p in bank.iterdir()}
    return sorted(p.name for p in output.iterdir() if p.name not in mine
                  and not p.name.startswith(("..state.link", "..state-", f".{INDEX_FILE}.", ".history.csv.",
                                             ".block_loss.png.")))


def tuning_options(**options: Any) -> dict[str, Any]:
    """What a resumed tuning must share with the run it continues (a state records them). Epochs
    are not among them: the lr is constant, so resuming with more epochs continues the same run."""
    return {k: (sorted(v) if isinstance(v, list) else v) for k, v in options.items()}


def check_same_options(recorded: Any, now: dict[str, Any], state: Path) -> None:
    """Refuse ``--resume`` with options other than those the interrupted run recorded in ``state``;
    the message names every changed option with both values."""
    if recorded is None:
        return  # a state from before options were recorded: nothing to compare
    if not isinstance(recorded, dict):
        raise CtpruneError(f"--resume: {state} records no readable options")
    changed = [f"{k} {recorded[k]!r} -> {v!r}" for k, v in now.items() if k in recorded and recorded[k] != v]
    if changed:
        raise CtpruneError(f"--resume with changed options ({'; '.join(changed)}); resume with the options "
                           "of the interrupted run or choose another -o")


def _copy_bank(bank: Path, output: Path) -> None:
    """Copy ``bank`` (without its own tuning state) to ``output`` with the tune-blocks mark, and
    rename it into place whole."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        shutil.copytree(bank, tmp / "bank", ignore=shutil.ignore_patterns(".state", "..state-*", TUNING_MARK))
        write_json(tmp / "bank" / TUNING_MARK, {"tuned_from": str(bank)})
        os.replace(tmp / "bank", output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_state(index: dict[str, Any], variants: dict[str, nn.Module], state: dict[str, Any],
                 history: list[dict[str, Any]], folder: Path) -> None:
    """One tuning checkpoint in ``folder``: latest variant weights (a bank of its own), the
    output's index, optimizer and counters, history; committed whole by ``commit_dir``."""
    state_index = {k: index[k] for k in ("format", "model_fingerprint", "plan_fingerprint")}
    state_index["variants"] = {}
    for k, v in variants.items():
        save_variant(folder, state_index, k, v, dict(index["variants"][k]), write_index=False)
    write_json(folder / INDEX_FILE, state_index)
    write_json(folder / "output_index.json", index)
    write_block_history(folder / "history.csv", history)
    atomic_write(folder / "state.pt", functools.partial(torch.save, state))


def tune_blocks(model_dir: Path, bank: Path, output: Path, epochs: int = TuningSpec.epochs,
                corpus: str = "multi30k", data_dir: str | None = None, lr: float = TuningSpec.lr,
                max_tokens: int | None = None, patience: int = TuningSpec.patience, resume: bool = False,
                device: str | None = None,
                only: list[str] | None = None, seed: int = 0, bf16: bool | None = None) -> dict[str, Any]:
    """Tune every variant of ``bank`` (or those in ``only``) and write the tuned bank ``output``.

    Each step is the training loop's ``optimizer_step`` (same precision policy and fused Adam as
    finetuning); ``bf16=None`` follows the origin model's own training recipe. The output holds
    the best epoch of every variant (by validation block loss); ``.state/`` beside it keeps the
    latest weights and optimizer for ``resume``."""
    if epochs < 0:
        raise CtpruneError(f"epochs must be a non-negative integer, got {epochs}")
    if max_tokens is not None and max_tokens < 64:
        raise CtpruneError(f"--max-tokens must be at least 64, got {max_tokens}")
    if patience < 0:
        raise CtpruneError(f"--patience must be at least 0 (0: never stop early), got {patience}")
    if not (math.isfinite(lr) and lr > 0):
        raise CtpruneError(f"--lr must be a positive number, got {lr}")
    output, bank = Path(output), Path(bank)
    state_dir = output / ".state"
    check_output(output, {"model folder": model_dir, "bank": bank, "data folder": data_dir})
    if output.exists() and not resume:
        raise CtpruneError(f"{output} already exists; pass --resume to continue tuning it or choose another -o")
    check_existing(output, _is_tuning_output, "a (partial) `tune-blocks` output")
    dev = resolve_device(device)
    origin, tok, origin_hparams = load_model_folder(model_dir, dev)
    origin.requires_grad_(False)
    if bf16 is None:
        bf16 = bool((origin_hparams.get("recipe") or {}).get("bf16", False))
    if max_tokens is None:  # the origin preset's batches (1024 tokens for tiny, 4096 for seed)
        max_tokens = preset_max_tokens(str(origin_hparams.get("preset", "seed")))
    recipe = Recipe.original(lr=lr, bf16=bf16, epochs=epochs, seed=seed)
    src_index = load_index(bank)
    check_bank_model(src_index, model_fingerprint(model_dir), bank)
    keys = list(src_index["variants"]) if only is None else only
    unknown = [k for k in keys if k not in src_index["variants"]]
    if unknown:
        raise CtpruneError(f"bank {bank} has no variant {unknown[0]}")
    modules = {k: src_index["variants"][k]["module"] for k in keys}
    refuse_symlinks(bank, "bank", own_links=(".state", "..state.link"))  # the copy would follow them
    if output.is_dir():  # its writes would follow them
        refuse_symlinks(output, "tune-blocks output", own_links=(".state", "..state.link"))
    options = tuning_options(lr=lr, seed=seed, max_tokens=max_tokens, patience=patience, bf16=bf16, corpus=corpus,
                             data_dir=data_dir and str(Path(data_dir).resolve()), variants=keys)
    foreign = _foreign_entries(output, bank) if output.is_dir() else []
    if foreign and not (state_dir / "state.pt").is_file():  # it would be deleted and made again below
        raise CtpruneError(f"{output} holds files tune-blocks did not write ({', '.join(foreign[:3])}"
                           f"{', ...' if len(foreign) > 3 else ''}); it is never deleted: move them out or "
                           "choose another -o")
    with locked(output, "tune-blocks"):  # one writer; held until the tuned bank is written
        sweep_commits(state_dir)  # what a kill inside a state commit left
        resuming = resume and (state_dir / "state.pt").is_file()
        if not resuming:
            if output.exists():
                shutil.rmtree(output)  # our own interrupted output (checked above), not yet tuned
            _copy_bank(bank, output)  # untouched variants stay as they were
        index = check_index(read_json(state_dir / "output_index.json", "tuning state"), output) if resuming \
            else load_index(output)
        variants = {k: load_variant(state_dir if resuming else bank, load_index(state_dir)
                                    if resuming else src_index, k, origin).to(dev)
                    for k in keys}
        arch = arch_of(origin)
        trained = [p for v in variants.values() for p in arch.tuning_parameters(v)]
        for v in variants.values():
            v.eval()  # the teacher runs without dropout; so do its students
            v.requires_grad_(False)  # variants are copies of the frozen origin's modules
        for p in trained:
            p.requires_grad_(True)
        opt = make_optimizer(trained, recipe)
        train_name, val_name, _ = default_splits(corpus)
        max_len = arch.max_len(origin)
        train = TokenizedSplit(load_split(corpus, train_name, data_dir), tok, max_len)
        val_batches = [b.to(dev) for b in
                       TokenizedSplit(load_split(corpus, val_name, data_dir), tok, max_len).batches(8192)]
        rec = Recorder(origin, sorted(set(modules.values())))
        history: list[dict[str, Any]] = []
        start, wall, tokens = 1, 0.0, 0
        best: dict[str, float] = {}
        stale = dict.fromkeys(keys, 0)
        flops: dict[str, Any] = {"teacher": 0, "variants": dict.fromkeys(keys, 0)}  # 0 epochs: nothing spent
        if resuming:
            try:
                state = torch.load(state_dir / "state.pt", weights_only=True)
            except Exception as e:  # a corrupt or foreign state file fails in many ways
                raise CtpruneError(f"--resume: {state_dir / 'state.pt'} is not a readable tuning state "
                                   f"({type(e).__name__})") from None
            check_same_options(state.get("options") if isinstance(state, dict) else None, options,
                               state_dir / "state.pt")
            try:
                opt.load_state_dict(state["optimizer"])
                start, wall, tokens = int(state["epoch"]) + 1, float(state["wall"]), int(state["tokens"])
                best, stale = dict(state["best"]), dict(state["stale"])
                flops = {"teacher": int(state["flops"]["teacher"]), "variants": dict(state["flops"]["variants"])}
            except Exception as e:  # a corrupt or foreign state file fails in many ways
                raise CtpruneError(f"--resume: {state_dir / 'state.pt'} is not a readable tuning state "
                                   f"({type(e).__name__})") from None
            history = read_history(state_dir / "history.csv")
            tqdm.write(f"resuming block tuning in {output} after epoch {start - 1}")
        else:
            before = _validate(origin, variants, modules, rec, val_batches, bf16)
            for k, loss in before.items():
                best[k] = loss
                history.append(dict(epoch=0, variant=k, train_loss="", val_loss=f"{loss:.6g}", wall_time_s=0))
                index["variants"][k]["provenance"].update(block_loss_pruned=round(loss, 6))
        try:
            for epoch in range(start, epochs + 1):
                active = [k for k in keys if not patience or stale[k] < patience]
                if not active:
                    break
                t0 = time.perf_counter()
                students = {k: variants[k] for k in active}
                masked = [v for v in students.values() if hasattr(v, "weight_mask")]
                sums = torch.zeros(len(active))
                batches = train.batches(max_tokens, shuffle_seed=seed * 1000 + epoch)
                for batch in progress(batches, desc=f"tune-blocks {epoch}/{epochs}", unit="batch", leave=False):
                    batch = batch.to(dev)
                    losses: list[Tensor] = []
                    optimizer_step(opt, functools.partial(_summed_loss, losses, origin, students, modules, rec, batch),
                                   recipe, lr, dev)
                    with torch.no_grad():
                        for v in masked:
                            v.weight.mul_(v.weight_mask)
                        sums += torch.stack(losses).detach().cpu()
                    teacher, per_variant = tuning_step_flops(origin, students, modules, batch)
                    flops["teacher"] += teacher
                    for k, f in per_variant.items():
                        flops["variants"][k] = flops["variants"].get(k, 0) + f
                    tokens += batch.n_src_tokens + batch.n_tgt_tokens
                wall += time.perf_counter() - t0
                val = _validate(origin, students, modules, rec, val_batches, bf16)
                for k, train_loss in zip(active, (sums / len(batches)).tolist()):
                    history.append(dict(epoch=epoch, variant=k, train_loss=f"{train_loss:.6g}",
                                        val_loss=f"{val[k]:.6g}", wall_time_s=f"{wall:.1f}"))
                    if val[k] < best[k]:
                        best[k], stale[k] = val[k], 0
                        prov = index["variants"][k]["provenance"]
                        prov.update(stage="tuned", epochs=epoch, block_loss=round(val[k], 6))
                        save_variant(output, index, k, variants[k], index["variants"][k], write_index=False)
                    else:
                        stale[k] += 1
                state = {"optimizer": opt.state_dict(), "epoch": epoch, "wall": wall, "tokens": tokens,
                         "best": best, "stale": stale, "flops": flops, "options": options}
                commit_dir(state_dir, functools.partial(_write_state, index, variants, state, history))
                write_json(output / INDEX_FILE, index)  # once per epoch, not once per saved variant
                write_block_history(output / "history.csv", history)
                tqdm.write(f"tune-blocks epoch {epoch}: mean val block loss "
                           f"{sum(val.values()) / len(val):.4g} over {len(active)} variants ({wall:.0f}s)")
        finally:
            rec.remove()
        index["tuned_from"] = str(bank)
        total = flops["teacher"] + sum(flops["variants"].values())
        index["tuning"] = {"epochs_done": max(int(r["epoch"]) for r in history), "wall_time_s": round(wall, 2),
                           "train_tokens": tokens, "lr": lr, "variants": len(keys), "corpus": corpus, "bf16": bf16,
                           "train_flops": total, "teacher_flops": flops["teacher"], "variant_flops": flops["variants"],
                           "achieved_gflops": round(total / max(wall, 1e-9) / 1e9, 2)}
        write_json(output / INDEX_FILE, index)
        write_block_history(output / "history.csv", history)
        plot_block_losses(history, output / "block_loss.png")
        return index



def merge_shards(shards: list[tuple[Path, list[str]]], dst: Path) -> None:
    """Move the variants ``keys`` of every shard bank into bank ``dst`` (made if absent), adding
    up the shards' pruning or tuning cost and history; ``dst``'s index is written once, last (its
    single writer), so a crash loses nothing and a re-run finishes the move."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "variants").mkdir(exist_ok=True)
    dst_existed = (dst / INDEX_FILE).exists()
    index = load_index(dst) if dst_existed else None
    rows = {(r["variant"], r["epoch"]): r for r in read_history(dst / "history.csv")}
    for src, keys in shards:
        if index is not None and all(k in index["variants"] for k in keys) and (
                not (src / INDEX_FILE).exists()
                or all(index["variants"][k]["checksum"] == load_index(src)["variants"][k].get("checksum")
                       for k in keys)):
            continue  # merged before a kill stopped the clean-up: never count its cost twice
        new = load_index(src)
        if index is None:
            index = {**{k: v for k, v in new.items() if k != "tuning"}, "variants": {}}
        elif "prune_seconds" in new:
            index["prune_seconds"] = round(index.get("prune_seconds", 0.0) + new["prune_seconds"], 3)
        for key in keys:
            entry = new["variants"][key]
            if (src / entry["file"]).exists():  # absent only if an earlier merge moved it already
                os.replace(src / entry["file"], dst / entry["file"])
            index["variants"][key] = entry
        if "tuning" in new:
            t, old = {**new["tuning"], "sessions": 1}, index.get("tuning")
            if old:
                t.update(wall_time_s=round(old["wall_time_s"] + t["wall_time_s"], 2),
                         train_tokens=old["train_tokens"] + t["train_tokens"],
                         teacher_flops=old["teacher_flops"] + t["teacher_flops"],
                         train_flops=old["train_flops"] + t["train_flops"],
                         variant_flops={**old["variant_flops"], **t["variant_flops"]},
                         epochs_done=max(old["epochs_done"], t["epochs_done"]), sessions=old["sessions"] + 1)
                t["achieved_gflops"] = round(t["train_flops"] / max(t["wall_time_s"], 1e-9) / 1e9, 2)
            index["tuning"] = t
            rows.update({(r["variant"], r["epoch"]): r for r in read_history(src / "history.csv")})
    if index is None:
        raise CtpruneError(f"nothing to merge into {dst}")
    if "tuning" in index:
        index["tuning"]["variants"] = len(index["variants"])
        # one row per (variant, epoch), epochs in order (a merge redone after a kill sees its rows twice)
        history = sorted((r for r in rows.values() if r["variant"] in index["variants"]), key=lambda r: int(r["epoch"]))
        write_block_history(dst / "history.csv", history)
        plot_block_losses(history, dst / "block_loss.png")
    write_json(dst / INDEX_FILE, index)
    for src, _ in shards:
        shutil.rmtree(src, ignore_errors=True)
