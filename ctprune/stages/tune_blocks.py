"""Stage `tune-blocks`: bank -> tuned bank, by local distillation against the frozen origin.

For each batch, ONE forward pass of the frozen origin model records every prunable module's
input and output; every variant of that module runs on the same input and learns to reproduce
the output (MSE normalised by the output's mean square, so modules of any scale weigh alike).
A variant's input is always the origin's activation, so variants stay independent and any
configuration can use any of them.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ctprune.arch import Architecture, arch_of
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
    refuse_symlinks,
    sweep_commits,
    write_json,
)
from ctprune.model.checkpoint import load_model_folder
from ctprune.model.flops import BACKWARD_FACTOR
from ctprune.model.weights import enforce_masks
from ctprune.progress import progress as progress_bar
from ctprune.pruning.bank import INDEX_FILE, Bank
from ctprune.pruning.block_history import plot_block_losses, write_block_history
from ctprune.pruning.configs import model_fingerprint
from ctprune.stages.args import TuneArgs
from ctprune.training.history import read_history
from ctprune.training.loop import Recipe, make_optimizer, optimizer_step, preset_max_tokens


class Recorder:
    """Hooks on the origin that keep each unit's last call: the inputs of the module that receives
    the unit's input and the output of the module that returns its output (the unit's own block,
    or e.g. a Marian FFN's fc1 and fc2), and the side (encoder/decoder) whose tokens it sees."""

    def __init__(self, arch: Architecture, model: nn.Module, names: list[str]) -> None:
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


def block_losses(arch: Architecture, origin: nn.Module, variants: dict[str, nn.Module], modules: dict[str, str],
                 rec: Recorder, batch: Batch) -> dict[str, Tensor]:
    """One teacher pass, then each variant's normalised MSE on its module's recorded call
    (computed in fp32 whatever precision the passes ran in)."""
    with torch.no_grad():
        arch.logits(origin, batch.src, batch.tgt_in)
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


def tuning_step_flops(arch: Architecture, origin: nn.Module, variants: dict[str, nn.Module], modules: dict[str, str],
                      batch: Batch) -> tuple[int, dict[str, int]]:
    """Analytic FLOPs of one tuning step on the padded batch: the teacher's forward pass, and per
    variant its forward and backward pass."""
    (b, s), t = batch.src.shape, batch.tgt_in.shape[1]
    teacher = b * arch.forward_flops(origin, s, t)
    return teacher, {k: (1 + BACKWARD_FACTOR) * b * arch.block_flops(origin, modules[k], v, s, t)
                     for k, v in variants.items()}


@torch.no_grad()
def _validate(arch: Architecture, origin: nn.Module, variants: dict[str, nn.Module], modules: dict[str, str],
              rec: Recorder, batches: list[Batch], bf16: bool) -> dict[str, float]:
    totals = torch.zeros(len(variants))
    for b in batches:
        with torch.autocast(b.src.device.type, dtype=torch.bfloat16, enabled=bf16):
            totals += torch.stack(list(block_losses(arch, origin, variants, modules, rec, b).values())).cpu()
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


OUTPUT_INDEX = "output_index.json"  # in a tuning state: the output bank's index at that epoch


def _write_state(out: Bank, variants: dict[str, nn.Module], state: dict[str, Any],
                 history: list[dict[str, Any]], folder: Path) -> None:
    """One tuning checkpoint in ``folder``: latest variant weights (a bank of its own), the
    output's index, optimizer and counters, history; committed whole by ``commit_dir``."""
    latest = Bank.create(folder, out.index["model_fingerprint"], out.index["plan_fingerprint"])
    for k, v in variants.items():
        latest.add(k, v, dict(out.variants[k]))
    latest.write()
    out.write_copy(folder / OUTPUT_INDEX)
    write_block_history(folder / "history.csv", history)
    atomic_write(folder / "state.pt", functools.partial(torch.save, state))


@dataclass
class TuningProgress:
    """Where block tuning stands after ``epoch``: what a tuning state stores (with the optimizer's
    state) and ``--resume`` restores."""

    epoch: int = 0
    wall: float = 0.0
    tokens: int = 0
    best: dict[str, float] = field(default_factory=dict)  # per variant: its best val block loss
    stale: dict[str, int] = field(default_factory=dict)  # per variant: epochs since it improved
    flops: dict[str, Any] = field(default_factory=dict)  # {"teacher": n, "variants": {key: n}}
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def new(cls, keys: list[str]) -> TuningProgress:
        return cls(stale=dict.fromkeys(keys, 0), flops={"teacher": 0, "variants": dict.fromkeys(keys, 0)})

    def active(self, keys: list[str], patience: int) -> list[str]:
        """The variants still tuned: all of them, or (``patience`` > 0) those that improved lately."""
        return [k for k in keys if not patience or self.stale[k] < patience]

    def state(self, opt: torch.optim.Optimizer, options: dict[str, Any]) -> dict[str, Any]:
        return {"optimizer": opt.state_dict(), "epoch": self.epoch, "wall": self.wall, "tokens": self.tokens,
                "best": self.best, "stale": self.stale, "flops": self.flops, "options": options}

    @classmethod
    def resume(cls, state_dir: Path, opt: torch.optim.Optimizer, options: dict[str, Any]) -> TuningProgress:
        """The progress kept in ``state_dir`` (its optimizer state loaded into ``opt``), refused when
        unreadable or recorded with other ``options``."""
        path = state_dir / "state.pt"
        unreadable = f"--resume: {path} is not a readable tuning state"
        try:
            state = torch.load(path, weights_only=True)
        except Exception as e:  # a corrupt or foreign state file fails in many ways
            raise CtpruneError(f"{unreadable} ({type(e).__name__})") from None
        check_same_options(state.get("options") if isinstance(state, dict) else None, options, path)
        try:
            opt.load_state_dict(state["optimizer"])
            progress = cls(int(state["epoch"]), float(state["wall"]), int(state["tokens"]), dict(state["best"]),
                           dict(state["stale"]), {"teacher": int(state["flops"]["teacher"]),
                                                  "variants": dict(state["flops"]["variants"])})
        except Exception as e:  # a corrupt or foreign state file fails in many ways
            raise CtpruneError(f"{unreadable} ({type(e).__name__})") from None
        progress.history = read_history(state_dir / "history.csv")
        return progress


@dataclass
class TuningSession:
    """What one block tuning holds fixed: the frozen origin with its recorder, the students (the
    variants being tuned) and their optimizer, the data."""

    arch: Architecture  # the origin's
    origin: nn.Module
    rec: Recorder
    modules: dict[str, str]  # variant key -> its module
    variants: dict[str, nn.Module]
    opt: torch.optim.Optimizer
    recipe: Recipe
    train: TokenizedSplit
    val_batches: list[Batch]
    max_tokens: int
    device: str

    def validate(self, keys: list[str]) -> dict[str, float]:
        students = {k: self.variants[k] for k in keys}
        return _validate(self.arch, self.origin, students, self.modules, self.rec, self.val_batches, self.recipe.bf16)

    def train_epoch(self, keys: list[str], epoch: int, progress: TuningProgress) -> list[float]:
        """One epoch of steps on the variants ``keys`` (their FLOPs and tokens counted into
        ``progress``); their mean train losses."""
        students = {k: self.variants[k] for k in keys}
        sums = torch.zeros(len(keys))
        batches = self.train.batches(self.max_tokens, shuffle_seed=self.recipe.seed * 1000 + epoch)
        for batch in progress_bar(batches, desc=f"tune-blocks {epoch}/{self.recipe.epochs}", unit="batch",
                                  leave=False):
            batch = batch.to(self.device)
            losses: list[Tensor] = []
            loss = functools.partial(_summed_loss, losses, self.arch, self.origin, students, self.modules, self.rec,
                                     batch)
            optimizer_step(self.opt, loss, self.recipe, self.recipe.lr, self.device)
            sums += torch.stack(losses).detach().cpu()
            teacher, per_variant = tuning_step_flops(self.arch, self.origin, students, self.modules, batch)
            progress.flops["teacher"] += teacher
            for k, f in per_variant.items():
                progress.flops["variants"][k] = progress.flops["variants"].get(k, 0) + f
            progress.tokens += batch.n_src_tokens + batch.n_tgt_tokens
        return (sums / len(batches)).tolist()


def _students(arch: Architecture, store: Bank, keys: list[str], origin: nn.Module, device: str
              ) -> tuple[dict[str, nn.Module], list[nn.Parameter]]:
    """The variants ``keys`` of ``store`` on ``device``, ready to tune, and the parameters tuning
    trains, in the order a tuning state's optimizer keeps them. The teacher runs without dropout,
    so do its students; masked Linears are parametrized, so their masks hold through every step."""
    variants = {k: store.load_variant(k, origin).to(device) for k in keys}
    trained = [p for v in variants.values() for p in arch.tuning_parameters(v)]  # before the parametrizations
    for v in variants.values():
        v.eval()
        v.requires_grad_(False)  # variants are copies of the frozen origin's modules
        enforce_masks(v)
    for p in trained:
        p.requires_grad_(True)
    return variants, trained


def _tuning_data(corpus: str, data_dir: str | None, tok: Any, max_len: int, device: str
                 ) -> tuple[TokenizedSplit, list[Batch]]:
    train_name, val_name, _ = default_splits(corpus)
    train = TokenizedSplit(load_split(corpus, train_name, data_dir), tok, max_len)
    val = TokenizedSplit(load_split(corpus, val_name, data_dir), tok, max_len)
    return train, [b.to(device) for b in val.batches(8192)]


def _check_paths(model_dir: Path, bank: Path, output: Path, data_dir: str | None, resume: bool) -> None:
    check_output(output, {"model folder": model_dir, "bank": bank, "data folder": data_dir})
    if output.exists() and not resume:
        raise CtpruneError(f"{output} already exists; pass --resume to continue tuning it or choose another -o")
    check_existing(output, _is_tuning_output, "a (partial) `tune-blocks` output")


def _check_folders(bank: Path, output: Path) -> None:
    """Refuse links in the bank or the output (the copy and the writes would follow them) and an
    output holding files that tune-blocks did not write and would delete."""
    refuse_symlinks(bank, "bank", own_links=(".state", "..state.link"))
    if not output.is_dir():
        return
    refuse_symlinks(output, "tune-blocks output", own_links=(".state", "..state.link"))
    foreign = _foreign_entries(output, bank)
    if foreign and not (output / ".state" / "state.pt").is_file():  # it would be deleted and made again
        raise CtpruneError(f"{output} holds files tune-blocks did not write ({', '.join(foreign[:3])}"
                           f"{', ...' if len(foreign) > 3 else ''}); it is never deleted: move them out or "
                           "choose another -o")


def _open_output(src: Bank, output: Path, resuming: bool) -> Bank:
    """The output bank: as the tuning state left it, or a fresh copy of ``src``."""
    if resuming:
        return Bank.open_copy(output, output / ".state" / OUTPUT_INDEX, "tuning state")
    if output.exists():
        shutil.rmtree(output)  # our own interrupted output (checked before), not yet tuned
    _copy_bank(src.path, output)  # untouched variants stay as they were
    return Bank.open(output)


def _start(s: TuningSession, out: Bank, keys: list[str]) -> TuningProgress:
    """Epoch 0: every variant's block loss as merely pruned."""
    progress = TuningProgress.new(keys)
    for k, loss in s.validate(keys).items():
        progress.best[k] = loss
        progress.history.append(dict(epoch=0, variant=k, train_loss="", val_loss=f"{loss:.6g}", wall_time_s=0))
        out.update_provenance(k, block_loss_pruned=round(loss, 6))
    return progress


def _epoch(s: TuningSession, out: Bank, progress: TuningProgress, active: list[str], epoch: int
           ) -> dict[str, float]:
    """Tune the ``active`` variants one epoch; each one that beats its best val block loss is
    written to ``out`` (the index in memory). Their val block losses."""
    t0 = time.perf_counter()
    train_losses = s.train_epoch(active, epoch, progress)
    progress.wall += time.perf_counter() - t0
    val = s.validate(active)
    for k, train_loss in zip(active, train_losses):
        progress.history.append(dict(epoch=epoch, variant=k, train_loss=f"{train_loss:.6g}",
                                     val_loss=f"{val[k]:.6g}", wall_time_s=f"{progress.wall:.1f}"))
        if val[k] < progress.best[k]:
            progress.best[k], progress.stale[k] = val[k], 0
            out.update_provenance(k, stage="tuned", epochs=epoch, block_loss=round(val[k], 6))
            out.add(k, s.variants[k], out.variants[k])
        else:
            progress.stale[k] += 1
    progress.epoch = epoch
    return val


def _finish(out: Bank, bank: Path, progress: TuningProgress, s: TuningSession, corpus: str) -> dict[str, Any]:
    """Record the tuning's cost in ``out`` and write its index, history and plot."""
    flops, wall = progress.flops, progress.wall
    total = flops["teacher"] + sum(flops["variants"].values())
    out.set_tuning(bank, {
        "epochs_done": max(int(r["epoch"]) for r in progress.history), "wall_time_s": round(wall, 2),
        "train_tokens": progress.tokens, "lr": s.recipe.lr, "variants": len(s.variants), "corpus": corpus,
        "bf16": s.recipe.bf16, "train_flops": total, "teacher_flops": flops["teacher"],
        "variant_flops": flops["variants"], "achieved_gflops": round(total / max(wall, 1e-9) / 1e9, 2)})
    out.write()
    write_block_history(out.path / "history.csv", progress.history)
    plot_block_losses(progress.history, out.path / "block_loss.png")
    return out.index


def tune_blocks(args: TuneArgs) -> dict[str, Any]:
    """Tune every variant of ``args.bank`` (or those in ``only``) and write the tuned bank ``output``.

    Each step is the training loop's ``optimizer_step`` (same precision policy and fused Adam as
    finetuning); ``precision="auto"`` follows the origin model's own training recipe, and
    ``max_tokens=None`` its preset's batches. The output holds the best epoch of every variant (by
    validation block loss); ``.state/`` beside it keeps the latest weights and optimizer for ``resume``."""
    output, bank, model_dir, corpus, data_dir = args.output, args.bank, args.model, args.corpus, args.data_dir
    state_dir = output / ".state"
    _check_paths(model_dir, bank, output, data_dir, args.resume)
    dev = resolve_device(args.device)
    origin, tok, origin_hparams = load_model_folder(model_dir, dev)
    arch = arch_of(origin)
    origin.requires_grad_(False)
    bf16 = args.precision == "bf16"
    if args.precision == "auto":  # the precision the origin model was trained with
        bf16 = bool((origin_hparams.get("recipe") or {}).get("bf16", False))
    max_tokens = args.max_tokens
    if max_tokens is None:  # the origin preset's batches (1024 tokens for tiny, 4096 for seed)
        max_tokens = preset_max_tokens(str(origin_hparams.get("preset", "seed")))
    recipe = Recipe.original(lr=args.lr, bf16=bf16, epochs=args.epochs, seed=args.seed)
    src = Bank.open(bank)
    src.check_model(model_fingerprint(model_dir))
    keys = src.select(None if args.only is None else list(args.only))
    modules = {k: src.variants[k]["module"] for k in keys}
    options = tuning_options(lr=args.lr, seed=args.seed, max_tokens=max_tokens, patience=args.patience, bf16=bf16,
                             corpus=corpus, data_dir=data_dir and str(Path(data_dir).resolve()), variants=keys)
    _check_folders(bank, output)
    with locked(output, "tune-blocks"):  # one writer; held until the tuned bank is written
        sweep_commits(state_dir)  # what a kill inside a state commit left
        resuming = args.resume and (state_dir / "state.pt").is_file()
        out = _open_output(src, output, resuming)
        variants, trained = _students(arch, Bank.open(state_dir) if resuming else src, keys, origin, dev)
        opt = make_optimizer(trained, recipe)
        train, val_batches = _tuning_data(corpus, data_dir, tok, arch.max_len(origin), dev)
        s = TuningSession(arch, origin, Recorder(arch, origin, sorted(set(modules.values()))), modules, variants, opt,
                          recipe, train, val_batches, max_tokens, dev)
        try:
            if resuming:
                progress = TuningProgress.resume(state_dir, opt, options)
                tqdm.write(f"resuming block tuning in {output} after epoch {progress.epoch}")
            else:
                progress = _start(s, out, keys)
            for epoch in range(progress.epoch + 1, args.epochs + 1):
                active = progress.active(keys, args.patience)
                if not active:
                    break
                val = _epoch(s, out, progress, active, epoch)
                commit_dir(state_dir, functools.partial(_write_state, out, variants, progress.state(opt, options),
                                                        progress.history))
                out.write()  # once per epoch, not once per saved variant
                write_block_history(output / "history.csv", progress.history)
                tqdm.write(f"tune-blocks epoch {epoch}: mean val block loss "
                           f"{sum(val.values()) / len(val):.4g} over {len(active)} variants ({progress.wall:.0f}s)")
        finally:
            s.rec.remove()
        return _finish(out, bank, progress, s, corpus)
