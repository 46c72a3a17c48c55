"""The one training loop: origin training and model finetuning both call ``fit``.

Every epoch it commits ``last/`` (weights + optimizer/RNG state + history, for ``--resume``) as
one unit: a new folder is written whole and ``last`` (a symlink) is switched to it by one
rename, so a kill at any instruction leaves the previous or the new checkpoint. It keeps the
best model (by val BLEU) as the output folder itself, and ``history.csv`` beside it; the final
``train_summary.json`` records the history's size and SHA-256.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import parametrize
from tqdm import tqdm

from ctprune.arch import Architecture, arch_of
from ctprune.data.batching import TokenizedSplit
from ctprune.data.corpus import Parallel
from ctprune.data.tokenizer import Tokenizer
from ctprune.errors import CtpruneError
from ctprune.fileio import (
    atomic_write,
    check_existing,
    commit_dir,
    file_record,
    locked,
    read_json,
    sweep_commits,
    write_json,
)
from ctprune.model.checkpoint import is_model_folder, load_model_folder
from ctprune.model.transformer import Seq2SeqTransformer
from ctprune.model.weights import enforce_masks, masked_linears, release_masks
from ctprune.progress import progress
from ctprune.spec import MAX_TOKENS, SELECTS, FinetuningSpec, OriginSpec, spec_default
from ctprune.task import TRANSLATION, Task, evaluate
from ctprune.training.history import epoch_text, read_history, write_history

RECIPES = ("fast", "original")  # and "finetune": the original optimizer on token-budget batches


# Recipe defaults that differ for the tiny preset (measured on the synthetic corpus: 8 epochs,
# about a minute on 2 cores, reach val BLEU ~95).
TINY_RECIPE: dict[str, Any] = {"lr": 3e-3, "max_tokens": 1024, "warmup_steps": 100}


def preset_bf16(preset: str) -> bool:
    """bf16 autocast for the seed preset (1.7-1.8x faster on this project's CPUs, see
    benchmarks/), fp32 for tiny models (bf16 kernels are re-specialised per batch shape, which
    costs more than tiny matmuls save); training, tuning and finetuning alike."""
    return preset != "tiny"


def preset_max_tokens(preset: str) -> int:
    """Token budget per batch of tuning and finetuning: small batches for the tiny preset."""
    return int(TINY_RECIPE["max_tokens"]) if preset == "tiny" else MAX_TOKENS


def preset_recipe(preset: str, name: str = "fast", precision: str = "auto", **overrides: Any) -> Recipe:
    """The recipe ``name`` (fast, original or finetune) with the preset's policy: bf16 unless
    ``precision`` says otherwise, and for ``tiny`` the fast recipe's tiny defaults; ``overrides``
    (None values ignored) win."""
    given = {k: v for k, v in overrides.items() if v is not None}
    policy: dict[str, Any] = {"bf16": precision == "bf16" or (precision == "auto" and preset_bf16(preset))}
    if preset == "tiny" and name == "fast":
        policy.update(TINY_RECIPE)
    if name == "finetune":
        return Recipe.finetune(**{**policy, **given})
    return Recipe.original(**{**policy, **given}) if name == "original" else Recipe(**{**policy, **given})


@dataclass
class Recipe:
    """How to train. ``fast`` is the default; ``original`` is the prototype's recipe
    (Adam 1e-4, betas 0.9/0.98, eps 1e-9, 128-sentence batches, plain cross-entropy)."""

    name: str = "fast"
    epochs: int = spec_default(OriginSpec, "epochs")
    lr: float = 8e-4
    warmup_steps: int = 250
    min_lr_ratio: float = 0.05
    label_smoothing: float = 0.1
    max_tokens: int = MAX_TOKENS
    batch_sentences: int = 0  # >0: fixed-size batches of this many sentences instead of tokens
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    bf16: bool = False
    seed: int = 0
    patience: int = 0  # >0: stop after this many epochs without a better val BLEU
    eval_every: float = spec_default(FinetuningSpec, "eval_every")  # <1: also evaluate within epochs
    select: str = spec_default(FinetuningSpec, "select")  # the evaluation whose weights are kept

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise CtpruneError(f"unknown recipe {self.name!r}; choose one of {', '.join(RECIPES)}")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise CtpruneError(f"epochs must be a non-negative integer, got {self.epochs!r}")
        if not self.lr > 0:
            raise CtpruneError(f"lr must be positive, got {self.lr!r}")
        if self.max_tokens < 64:
            raise CtpruneError(f"max_tokens must be at least 64, got {self.max_tokens!r}")
        if not 0 < self.eval_every <= 1:
            raise CtpruneError(f"eval_every must be a fraction of an epoch in (0, 1], got {self.eval_every!r}")
        if self.select not in SELECTS:
            raise CtpruneError(f"select must be one of {', '.join(SELECTS)}, got {self.select!r}")
        self.betas = tuple(self.betas)  # type: ignore[assignment]

    @classmethod
    def original(cls, **overrides: Any) -> Recipe:
        base = dict(name="original", lr=1e-4, warmup_steps=0, min_lr_ratio=1.0,
                    label_smoothing=0.0, batch_sentences=128, clip_norm=0.0)
        return cls(**{**base, **overrides})

    @classmethod
    def finetune(cls, **overrides: Any) -> Recipe:
        """The prototype's optimizer (Adam 1e-4, constant, plain cross-entropy) on length-sorted
        token-budget batches (``MAX_TOKENS``, about 128 Multi30k sentences): the prototype's random
        128-sentence batches pad every sentence to the longest one and took 3.7 s per batch
        here against about 1 s."""
        return cls.original(**{"batch_sentences": 0, "max_tokens": MAX_TOKENS, **overrides})

    def lr_at(self, step: int, total: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at ``total`` steps."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        frac = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass
class FitResult:
    best_bleu: float
    epochs_done: int
    wall_time_s: float
    train_tokens: int
    stopped_early: bool


def make_optimizer(params: Iterable[torch.nn.Parameter], recipe: Recipe) -> torch.optim.Adam:
    """The recipe's Adam, with PyTorch's fused kernel (one pass per parameter tensor: about a
    third of the for-loop version's time on CPU; same state, so checkpoints load either way)."""
    return torch.optim.Adam(params, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps,
                            weight_decay=recipe.weight_decay, fused=True)


def optimizer_step(opt: torch.optim.Optimizer, compute_loss: Callable[[], torch.Tensor], recipe: Recipe,
                   lr: float, device_type: str) -> torch.Tensor:
    """One optimizer step: ``compute_loss()`` under the recipe's precision (bf16 autocast or
    fp32), backward, gradient clipping, Adam. Model training and block tuning both use it."""
    for g in opt.param_groups:
        g["lr"] = lr
    with torch.autocast(torch.device(device_type).type, dtype=torch.bfloat16, enabled=recipe.bf16):
        loss = compute_loss()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if recipe.clip_norm:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], recipe.clip_norm)
    opt.step()
    return loss.detach()


def train_step(model: Seq2SeqTransformer, opt: torch.optim.Optimizer, batch: Any, recipe: Recipe,
               lr: float, task: Task = TRANSLATION) -> torch.Tensor:
    """One end-to-end optimizer step on ``batch`` (the task's loss); returns the loss."""
    return optimizer_step(opt, lambda: task.loss(model, batch, recipe.label_smoothing), recipe, lr,
                          batch.src.device.type)


@torch.no_grad()
def evaluate_loss(model: Seq2SeqTransformer, split: TokenizedSplit, device: str, task: Task = TRANSLATION) -> float:
    """The task's loss over ``split``, averaged over its real target tokens."""
    model.eval()
    total, n = 0.0, 0
    for b in split.batches(8192):
        b = b.to(device)
        tokens = b.n_tgt_tokens
        total += float(task.loss(model, b)) * tokens
        n += tokens
    return total / max(1, n)


def _batches(split: TokenizedSplit, recipe: Recipe, epoch: int) -> list[Any]:
    seed = recipe.seed * 1000 + epoch
    if recipe.batch_sentences:
        rng = random.Random(seed)
        idx = list(range(len(split)))
        rng.shuffle(idx)
        return [split._make(idx[i:i + recipe.batch_sentences])
                for i in range(0, len(idx), recipe.batch_sentences)]
    return split.batches(recipe.max_tokens, shuffle_seed=seed)


def _epoch_flops(arch: Architecture, model: torch.nn.Module, split: TokenizedSplit, recipe: Recipe) -> int:
    """Training FLOPs of the first epoch's batches (later epochs differ only by padding)."""
    return sum(arch.train_step_flops(model, *b.src.shape, b.tgt_in.shape[1]) for b in _batches(split, recipe, 1))


def epochs_for_flops(model: torch.nn.Module, tok: Tokenizer, train: Parallel, recipe: Recipe, flops: float) -> int:
    """Whole epochs of ``recipe`` on ``train`` that ``flops`` training FLOPs surely reach into: one more
    than the first epoch's FLOPs say, since later epochs' batches pad differently."""
    arch = arch_of(model)
    split = TokenizedSplit(train, tok, arch.max_len(model))
    return math.ceil(flops / _epoch_flops(arch, model, split, recipe)) + 1


# What ``fit`` (and `ctprune run` beside it) writes into its output folder.
FIT_FILES = {"config.json", "model.safetensors", "tokenizer.model", "hparams.json", "manifest.json",
             "history.csv", "history.png", "train_summary.json", "last", "eval", "test_metrics.json",
             # a Hugging Face model folder's own files (ctprune.arch.hf)
             "ctprune_layers.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "source.spm", "target.spm", "vocab.json", "spiece.model"}


def is_fit_output(path: Path) -> bool:
    """An output folder ``fit`` may write into: empty, or (an interrupted) training run's folder."""
    if not path.is_dir() or path.is_symlink():
        return False
    names = {p.name for p in path.iterdir()}
    if names & {"last", "history.csv", "train_summary.json"}:
        return True
    return all(n in FIT_FILES or n.startswith(".") for n in names)


def has_training_run(out: Path) -> bool:
    """Whether ``out`` holds a committed training checkpoint (or the history of one)."""
    return (out / "last").exists() or (out / "history.csv").exists()


def _reached(history: list[dict[str, Any]], target: float | None, min_epochs: int) -> bool:
    """Whether the last epoch of ``history`` (any of its evaluations) reached ``target``, at or
    after ``min_epochs``: training stops there."""
    if target is None or not history or float(history[-1]["epoch"]) < min_epochs:
        return False
    last = float(history[-1]["epoch"])
    return any(float(r["val_bleu"]) >= target for r in history if float(r["epoch"]) > last - 1)


def _check_same_recipe(recorded: Any, now: dict[str, Any], last: Path) -> None:
    """Refuse ``--resume`` with a recipe (lr, seed, batches, ...) other than the one the interrupted
    run recorded in ``last``'s hparams; the message names each changed field. More epochs are a
    continuation of the same run where the lr is constant (min_lr_ratio 1: the original and
    finetune recipes); under a decaying schedule they would change every remaining step's lr."""
    if recorded is None:
        return  # a checkpoint from before recipes were recorded: nothing to compare
    now = json.loads(json.dumps(now))  # tuples as the recorded JSON holds them (lists)
    if not isinstance(recorded, dict):
        raise CtpruneError(f"--resume: {last} records no readable recipe")
    same_schedule = recorded.get("min_lr_ratio") == 1.0 == now.get("min_lr_ratio")
    changed = [f"{k} {recorded[k]!r} -> {v!r}" for k, v in now.items()
               if k in recorded and recorded[k] != v and not (k == "epochs" and same_schedule)]
    if changed:
        raise CtpruneError(f"--resume with a changed recipe ({'; '.join(changed)}); resume with the options "
                           "of the interrupted run or choose another output folder")


def fit(model: Seq2SeqTransformer, tok: Tokenizer, train: Parallel, val: Parallel,
        recipe: Recipe, out: Path, hparams: dict[str, Any], resume: bool = False,
        device: str = "cpu", eval_before: bool = False, target_bleu: float | None = None,
        min_epochs: int = 0, snapshot_epochs: tuple[int, ...] = (), max_flops: float | None = None) -> FitResult:
    """Train ``model`` for ``recipe.epochs`` epochs and write the model folder ``out``.

    ``eval_before`` records epoch 0 (the model as given) in the history. Reaching
    ``target_bleu`` stops training, but not before ``min_epochs``. After each epoch K in
    ``snapshot_epochs`` the model is also saved as ``out/epoch-K`` (equal-budget comparisons).
    Every history row carries the analytic training FLOPs so far (forward + backward of the
    padded batches). With ``recipe.eval_every`` < 1 val BLEU and loss are also measured within
    epochs (rows at fractional epochs, their time and FLOPs up to that step; a target reached
    there stops training at the end of that epoch). The output folder keeps the weights of the
    evaluation that ``recipe.select`` prefers: the highest val BLEU or the lowest val loss.
    With ``max_flops`` training stops after the step that reaches that many training FLOPs (the
    last evaluation at that fraction of an epoch) and the lr schedule ends there
    (``epochs_for_flops`` gives the epochs it needs). A pruned model's masked Linears are
    parametrized while ``fit`` runs (``ctprune.model.weights``): their removed weights stay zero
    through every step, and every checkpoint stores them as before parametrizations (the masked
    weight beside its mask). When ``fit`` returns or raises, the parametrizations it added are
    removed again (``release_masks``): ``model`` is left a plain module, its weights those of the
    last step (not the kept evaluation's), masked, each the same Parameter object in the same
    order as before, so an optimizer the caller builds afterwards lists them as it would have.
    """
    out = Path(out)
    check_existing(out, is_fit_output, "a training run's folder")
    if not resume and has_training_run(out):
        raise CtpruneError(f"{out} already holds a training run; pass --resume to continue it "
                           "or choose another output folder")
    ours = [m for m in masked_linears(model) if not parametrize.is_parametrized(m, "weight")]
    try:
        with locked(out, "train/finetune"):  # one writer per output: a second resume is refused
            return _fit(model, tok, train, val, recipe, out, hparams, resume, device, eval_before, target_bleu,
                        min_epochs, snapshot_epochs, max_flops)
    finally:  # the caller's model as it came, its masked weights at their trained (masked) values
        release_masks(ours)


def _fit(model: Seq2SeqTransformer, tok: Tokenizer, train: Parallel, val: Parallel, recipe: Recipe, out: Path,
         hparams: dict[str, Any], resume: bool, device: str, eval_before: bool, target_bleu: float | None,
         min_epochs: int, snapshot_epochs: tuple[int, ...], max_flops: float | None = None) -> FitResult:
    """``fit``'s work, under its lock."""
    last = out / "last"
    state_path = last / "trainer_state.pt"
    sweep_commits(last)  # what a kill inside a checkpoint commit left
    if not resume and has_training_run(out):
        raise CtpruneError(f"{out} already holds a training run; pass --resume to continue it "
                           "or choose another output folder")
    torch.manual_seed(recipe.seed)  # dropout; the data order is seeded per epoch in _batches
    model.to(device)
    arch = arch_of(model)
    train_split = TokenizedSplit(train, tok, arch.max_len(model))
    val_split = TokenizedSplit(val, tok, arch.max_len(model))
    # The parameters in the module's own order, taken once, before ``enforce_masks`` below: a
    # parametrized weight is listed after its bias, and the optimizer's state (which every
    # checkpoint stores, those written before masks were parametrizations too) is by position.
    params = list(model.parameters())
    opt = make_optimizer(params, recipe)
    steps_per_epoch = len(_batches(train_split, recipe, 0))
    total_steps = steps_per_epoch * max(1, recipe.epochs)
    if max_flops is not None:  # the schedule ends where the FLOPs do
        total_steps = min(total_steps, math.ceil(max_flops / _epoch_flops(arch, model, train_split, recipe)
                                                 * steps_per_epoch))
    hparams = {**hparams, "recipe": asdict(recipe)}
    history: list[dict[str, Any]] = []
    start_epoch, step, wall, tokens, flops = 1, 0, 0.0, 0, 0
    best = float("-inf")  # best val BLEU so far
    kept = float("-inf")  # the kept evaluation's score under recipe.select (higher is better)
    kept_row: dict[str, Any] | None = None
    since_best = 0
    if resume and state_path.exists():
        last_model, _, last_hparams = load_model_folder(last, device)
        _check_same_recipe(last_hparams.get("recipe"), hparams["recipe"], last)
        try:
            model.load_state_dict(last_model.state_dict())
        except RuntimeError:
            raise CtpruneError(f"--resume: {last} holds a model of another architecture "
                               "(another preset or vocabulary?); choose another output folder") from None
        try:
            state = torch.load(state_path, weights_only=True)
            opt.load_state_dict(state["optimizer"])
            start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
            wall, tokens, best = float(state["wall"]), int(state["tokens"]), float(state["best"])
            kept = float(state.get("kept", best if recipe.select == "val_bleu" else kept))
            kept_row = state.get("kept_row")
            flops = int(state.get("flops", 0))
            since_best = int(state.get("since_best", 0))
            torch.set_rng_state(state["torch_rng"])
        except Exception as e:  # torch.load/pickle-free unpickler errors vary by corruption
            raise CtpruneError(f"--resume: {state_path} is not a readable trainer state "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        committed = last / "history.csv"  # the history that belongs to this checkpoint
        history = read_history(committed if committed.is_file() else out / "history.csv")
        tqdm.write(f"resuming {out} after epoch {start_epoch - 1}")
    elif resume and (out / "history.csv").exists():
        history = read_history(out / "history.csv")  # only epoch 0 was recorded (older runs)
        best = max((float(r["val_bleu"]) for r in history), default=best)
        kept = best if recipe.select == "val_bleu" else max((-float(r["val_loss"]) for r in history), default=kept)
    # After the resumed weights, which load by the stored names (a masked weight as ``weight``);
    # ``fit`` takes the parametrizations off again when it returns.
    enforce_masks(model)

    def commit(epoch: int) -> None:
        """Checkpoint ``last/`` (weights, optimizer, step, RNG, history) as one unit, then the
        history beside the best model."""
        state = {"optimizer": opt.state_dict(), "epoch": epoch, "step": step, "wall": wall,
                 "tokens": tokens, "flops": flops, "best": best, "since_best": since_best, "kept": kept,
                 "kept_row": kept_row,
                 "torch_rng": torch.get_rng_state()}

        def write(folder: Path) -> None:
            arch.save(folder, model, tok, {**hparams, "epoch": epoch})
            atomic_write(folder / "trainer_state.pt", functools.partial(torch.save, state))
            write_history(folder / "history.csv", history)

        commit_dir(last, write)
        write_history(out / "history.csv", history)

    def record(epoch: float, train_loss: float, epoch_time: float, lr: float, wall_s: float) -> float:
        """Evaluate, append the history row (``wall_s``: training seconds so far) and keep the
        weights when ``recipe.select`` prefers them; returns the val BLEU."""
        nonlocal best, kept, kept_row
        with parametrize.cached():  # a masked weight computed once per evaluation, not per forward
            bleu = evaluate(model, tok, val)
            vloss = evaluate_loss(model, val_split, device)
        history.append(dict(epoch=epoch_text(epoch), train_loss=f"{train_loss:.4f}", val_loss=f"{vloss:.4f}",
                            val_bleu=f"{bleu:.2f}", lr=f"{lr:.3g}", epoch_time_s=f"{epoch_time:.1f}",
                            wall_time_s=f"{wall_s:.1f}", train_tokens=tokens, train_flops=flops))
        best = max(best, bleu)
        score = bleu if recipe.select == "val_bleu" else -vloss
        if score > kept:
            kept, kept_row = score, {"epoch": epoch_text(epoch), "val_bleu": round(bleu, 2),
                                     "val_loss": round(vloss, 4)}
            arch.save(out, model, tok, {**hparams, "epoch": epoch, "val_bleu": bleu})
        head = "epoch 0 (before training)" if epoch == 0 else f"epoch {epoch_text(epoch)}: train loss {train_loss:.3f}"
        tqdm.write(f"{head}  val loss {vloss:.3f}  val BLEU {bleu:.2f}  ({epoch_time:.0f}s)")
        return bleu

    if eval_before and not history:
        record(0, float("nan"), 0.0, 0.0, wall)
        commit(0)
    stopped_early = _reached(history, target_bleu, min_epochs)
    if start_epoch <= recipe.epochs and not stopped_early:
        (out / "train_summary.json").unlink(missing_ok=True)  # the run is not finished any more
    for epoch in range(start_epoch, recipe.epochs + 1):
        if stopped_early or max_flops is not None and flops >= max_flops:
            break
        model.train()
        t0 = time.perf_counter()
        batches = _batches(train_split, recipe, epoch)
        # steps after which val BLEU is also measured within the epoch (eval_every < 1)
        within = {round(k * recipe.eval_every * len(batches)) for k in range(1, math.ceil(1 / recipe.eval_every))}
        loss_sum, loss_tokens, eval_s = 0.0, 0, 0.0
        best_before = best
        bar = progress(batches, desc=f"epoch {epoch}/{recipe.epochs}", unit="batch", leave=False)
        for i, batch in enumerate(bar, start=1):
            batch = batch.to(device)
            lr = recipe.lr_at(step, total_steps)
            loss = train_step(model, opt, batch, recipe, lr)
            flops += arch.train_step_flops(model, *batch.src.shape, batch.tgt_in.shape[1])
            step += 1
            n = batch.n_tgt_tokens
            tokens += batch.n_src_tokens + n
            loss_sum += float(loss) * n
            loss_tokens += n
            bar.set_postfix(loss=f"{loss_sum / loss_tokens:.3f}", lr=f"{lr:.2e}")
            if max_flops is not None and flops >= max_flops:
                stopped_early = True  # the FLOPs budget is spent: the last evaluation is here
                break
            if i in within and i < len(batches):  # evaluation time is not training time
                e0 = time.perf_counter()
                so_far = e0 - t0 - eval_s
                record(epoch - 1 + i / len(batches), loss_sum / max(1, loss_tokens), so_far, lr, wall + so_far)
                model.train()
                eval_s += time.perf_counter() - e0
        epoch_time = time.perf_counter() - t0 - eval_s
        wall += epoch_time
        at = epoch if i == len(batches) else epoch - 1 + i / len(batches)  # a spent FLOPs budget stops within it
        bleu = record(at, loss_sum / max(1, loss_tokens), epoch_time, lr, wall)
        since_best = 0 if best > best_before or bleu >= best else since_best + 1
        if epoch in snapshot_epochs and at == epoch:  # before the commit: a kill in between redoes the epoch
            arch.save(out / f"epoch-{epoch}", model, tok, {**hparams, "epoch": epoch, "val_bleu": bleu})
        commit(epoch)
        if stopped_early:
            break
        if epoch < min_epochs:
            continue
        if _reached(history, target_bleu, min_epochs):
            stopped_early = True
        elif recipe.patience and since_best >= recipe.patience:
            stopped_early = True
    if not is_model_folder(out):  # zero epochs and no eval: still leave a usable folder
        arch.save(out, model, tok, {**hparams, "epoch": 0})
    write_history(out / "history.csv", history)  # a kill may have come between commit and copy
    write_json(out / "train_summary.json", {
        "best_val_bleu": best, "epochs_done": int(float(history[-1]["epoch"])) if history else 0,
        "wall_time_s": round(wall, 2), "train_tokens": tokens, "stopped_early": stopped_early,
        "select": recipe.select, "kept": kept_row,
        "history": file_record(out / "history.csv")})
    summary = read_json(out / "train_summary.json")
    return FitResult(summary["best_val_bleu"], summary["epochs_done"], wall, tokens, stopped_early)
