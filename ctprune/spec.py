"""The one typed specification: every option of an experiment, with its type, default and help,
declared once as a dataclass field.

The sections of `ctprune run`'s experiment file are these dataclasses (``from_table`` reads one),
each checking itself on construction. Every stage's arguments are dataclasses of the same kind
(``Args``, in ``ctprune/stages/args.py``), their fields declared by ``opt`` or taken from a section's
field by ``like``; ``add_arguments`` generates a command's parser from them, so a default, choice or
limit is written once and a command line, an experiment file and a job check it alike. The defaults
and limits that several stages share (batch tokens, scoring batches, latency repeats) are here too.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from ctprune.arch import names as arch_names
from ctprune.budget import budget_sweep
from ctprune.errors import CtpruneError

PRESETS = ("seed", "tiny")
ARCHS = arch_names()  # the families ctprune.arch registers
KINDS = ("attention", "ffn", "linear")
EXECUTORS = ("local", "process", "ray")
PRECISIONS = ("auto", "bf16", "fp32")
MAX_WORKERS = 1024  # parallel jobs or tuning shards of one run (also bounds what a typo can ask of a pool)
MAX_K = 256  # configurations per budget: each is a MIP solve with one more diversity cut, then a finetuning
RECIPES = ("fast", "original", "finetune")  # `--recipe`: ctprune.training.loop.preset_recipe builds each
CRITERIA = ("original", "l1", "activation")  # head / neuron importance (ctprune.pruning.importance)
# Padded source+target tokens per batch: the seed preset's training, tuning and finetuning batches
# (the tiny preset's are ctprune.training.loop.TINY_RECIPE's), and the scoring subset's.
MAX_TOKENS = 4096
SCORE_BATCHES = 8  # validation batches of the scoring subset (`ctprune score`, `search`, a run's score job)
LATENCY_REPEATS = 5  # timed, interleaved rounds of a latency measurement; the median is reported
MIN_TOKENS = 64  # the smallest token budget per batch (a batch must hold one sentence pair)
REQUIRED: Any = MISSING  # ``opt(REQUIRED, ...)``: a field without default (a required argument)


def opt(default: Any, help: str, *, choices: tuple[Any, ...] | None = None, low: float | None = None,
        high: float | None = None, positive: bool = False, default_text: str | None = None,
        flags: tuple[str, ...] = (), positional: bool = False, metavar: str | None = None,
        cli: bool = True) -> Any:
    """A spec field: its default (``REQUIRED``: none), help text, and allowed values (``choices``,
    ``low`` <= value <= ``high``, ``positive``: > 0 and finite); ``default_text`` says in words what
    a None default means (shown in the CLI's help). How ``add_arguments`` offers it on a command
    line: ``--NAME`` unless ``flags`` (e.g. ``("-e", "--epochs")``) or ``positional``; a bool as a
    switch; ``cli=False``: set by code only (jobs, tests), not an option, and not converted."""
    meta = {"help": help, "choices": choices, "low": low, "high": high, "positive": positive,
            "default_text": default_text, "flags": tuple(flags), "positional": positional, "metavar": metavar,
            "cli": cli}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def like(cls: type, name: str, **changes: Any) -> Any:
    """A field declared as the field ``name`` of the dataclass ``cls`` (its default, help, choices
    and limits), with ``changes`` (any argument of ``opt``) applied: one declaration, two users."""
    f = _field(cls, name)
    meta = {**f.metadata, **changes}
    default = meta.pop("default", spec_default(cls, name))
    return opt(default, **meta)


class _Spec:
    """Base of the spec dataclasses: an instance checks itself on construction, wherever it is
    built (a TOML table, a command line, ``dataclasses.replace``, code). Each field is converted and
    checked by its annotation and ``opt`` rules, then ``validate`` checks the rules between fields;
    messages name the key as ``section.key`` (``from_table`` puts the file in front)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not f.metadata.get("cli", True):
                continue  # set by code, typed by its annotation
            at = self.name_of(f.name)
            value = _convert(getattr(self, f.name), _hints(type(self))[f.name], at)
            _check_value(value, dict(f.metadata), at)
            object.__setattr__(self, f.name, value)  # frozen: the converted value (a list as a tuple)
        self.validate()

    @classmethod
    def name_of(cls, name: str) -> str:
        """How messages name the field ``name``: ``section.key``."""
        return f"{_section(cls)}.{name}"

    def validate(self) -> None:
        """Rules between fields that every instance, the defaults included, meets."""

    def check(self, where: str) -> None:
        """What an experiment file's section must give beyond that (a [search] needs a budget);
        ``where`` names the file."""


class Args(_Spec):
    """Base of the stage arguments (``ctprune/stages/args.py``): one frozen dataclass per stage,
    checked on construction like a spec section, from which ``add_arguments`` generates the
    command's options; messages name a field by its command-line flag (``--max-tokens``)."""

    @classmethod
    def name_of(cls, name: str) -> str:
        return flag_of(_field(cls, name))


def flag_of(f: dataclasses.Field[Any]) -> str:
    """The command-line name of an ``Args`` field: its long flag (else its short one), or the
    positional's metavar (``MODEL``)."""
    flags = f.metadata.get("flags") or ()
    if f.metadata.get("positional"):
        return f.name.upper()
    return next((x for x in flags if x.startswith("--")), flags[0] if flags else f"--{f.name.replace('_', '-')}")


def cli_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of ``cls`` offered on the command line, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Every command-line field of the ``Args`` dataclass ``cls`` as an argument of ``parser``:
    positional or ``--NAME`` (``flags``), a bool as a switch, a tuple as one or more values, the
    annotation's int or float as ``type``; default, choices and help from the field. The value of
    each lands under the field's name, so ``cls(**values)`` builds the arguments."""
    for f in cli_fields(cls):
        meta, kw = f.metadata, {"help": f.metadata["help"].replace("%", "%%")}  # argparse formats help with %
        t = _hints(cls)[f.name]
        union = typing.get_origin(t) in (typing.Union, types.UnionType)
        base = [a for a in typing.get_args(t) if a is not type(None)] if union else [t]
        many = [a for a in base if typing.get_origin(a) is tuple]
        one = typing.get_args(many[0])[0] if many else base[0]
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if meta.get("positional"):
            parser.add_argument(f.name, **kw)
            continue
        default = spec_default(cls, f.name)
        if default is MISSING:
            kw["required"] = True
        else:
            kw["default"] = default
        if default is None and meta.get("default_text"):
            kw["help"] += f" (default: {meta['default_text']})"
        if base == [bool]:
            kw["action"] = "store_true"
        elif one in (int, float):
            kw["type"] = one
        if many:
            kw["nargs"] = "+"
        parser.add_argument(*(meta.get("flags") or (flag_of(f),)), dest=f.name, **kw)


def parsed_args(cls: type, namespace: argparse.Namespace) -> Any:
    """``cls`` built from the values that ``add_arguments``' options parsed into ``namespace``."""
    return cls(**{f.name: getattr(namespace, f.name) for f in cli_fields(cls)})


def _field(cls: type, name: str) -> dataclasses.Field[Any]:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section(cls: type) -> str:
    """The experiment file's section of a spec class: ``SearchSpec`` -> ``search``."""
    return cls.__name__.removesuffix("Spec").lower()


@dataclass(frozen=True)
class DataSpec(_Spec):
    """[data]: the parallel corpus."""

    corpus: str = opt("multi30k", "parallel corpus: multi30k (de-en from the data folder), synthetic (built in), "
                                  "or folder:SRC-TGT (SPLIT.SRC / SPLIT.TGT files in the data folder)")
    data_dir: str | None = opt(None, "folder with SPLIT.de / SPLIT.en",
                               default_text="$CTPRUNE_DATA_DIR, else the download cache")

    def validate(self) -> None:
        from ctprune.data.corpus import corpus_languages

        try:
            corpus_languages(self.corpus)
        except CtpruneError as e:
            raise CtpruneError(f"data.corpus: {e}") from None


@dataclass(frozen=True)
class OriginSpec(_Spec):
    """[origin]: the model to prune, trained by the run or given."""

    preset: str = opt("seed", "seed: the original 3+3 layers, d_model 512, 8 heads, FFN 512; tiny: for tests",
                      choices=PRESETS)
    arch: str = opt("ctprune", "ctprune: its own Transformer; marian / t5: a Hugging Face MarianMTModel / "
                               "T5ForConditionalGeneration of the preset's sizes (needs the hf extra)", choices=ARCHS)
    epochs: int = opt(8, "origin training epochs (an origin of 0 epochs is an untrained model)", low=1)
    model: str | None = opt(None, "an origin model folder to use instead of training one (relative to the "
                                  "experiment file)")


@dataclass(frozen=True)
class ConfigurationsSpec(_Spec):
    """[configurations]: exactly one of ratio lists (one ratio per configuration), a file, or inline."""

    attention: tuple[float, ...] | None = opt(None, "keep ratio of all attention blocks, one per configuration")
    linear: tuple[float, ...] | None = opt(None, "keep ratio of all FFN Linears (unstructured), one per "
                                                 "configuration")
    ffn: tuple[float, ...] | None = opt(None, "keep ratio of all FFNs (structured neurons), one per configuration")
    file: str | None = opt(None, "configuration file (JSON list of {module: keep ratio})")
    inline: tuple[dict[str, float], ...] | None = opt(None, "configurations as TOML inline tables")

    def validate(self) -> None:
        lists = {name: getattr(self, name) for name in ("attention", "linear", "ffn") if getattr(self, name)}
        if len({len(v) for v in lists.values()}) > 1:
            raise CtpruneError("configurations." + ", ".join(lists) + " need one ratio per configuration "
                               "each (the same length), got " + ", ".join(str(len(v)) for v in lists.values()))
        for name, values in lists.items():
            for r in values:
                _keep_ratio(r, f"configurations.{name}")

    def check(self, where: str) -> None:
        given = [self.file, self.inline, self.attention or self.linear or self.ffn]
        if sum(x is not None for x in given) != 1:
            raise CtpruneError(f"{where}: [configurations] needs exactly one of file, inline, or ratio lists "
                               "(attention / linear / ffn)")


SELECTS = ("val_bleu", "val_loss")  # the rule that picks a training run's kept checkpoint
OBJECTIVES = ("kl", "loss")  # the variant scores `ctprune score` stores


@dataclass(frozen=True)
class SearchSpec(_Spec):
    """[search] (instead of [configurations]): a grid bank is pruned, tuned and scored, and
    `ctprune search` picks the configurations."""

    grid: tuple[float, ...] = opt((0.25, 0.5, 0.75), "keep ratios of the grid bank")
    kinds: tuple[str, ...] = opt(("attention", "ffn"), "module kinds of the grid bank", choices=KINDS)
    # A budget is one value or a list of them (a budget sweep: one grid bank serves every budget;
    # lists of several resources are paired by position, a single value applies to every budget).
    # List items are kept as text, as `ctprune search` takes them (numbers are converted).
    flops: str | tuple[str | float, ...] | None = opt(
        None, "FLOPs budget(s): a fraction of the origin (0.6, 60%) or absolute (1.5G); a list sweeps budgets")
    params: str | tuple[str | float, ...] | None = opt(
        None, "parameter budget(s): a fraction of the origin or absolute (10M); a list sweeps budgets")
    latency: str | tuple[str | float, ...] | None = opt(
        None, "latency budget(s): a fraction of the origin or absolute (12ms); needs latency scores")
    k: int = opt(16, "number of configurations per budget", low=1, high=MAX_K)
    min_distance: int = opt(2, "each pair of configurations differs in at least this many slots", low=1)
    objective: str = opt("kl", "variant score the solver sums: kl (KL divergence to the origin's next-token "
                               "distribution) or loss (the increase of val loss)", choices=OBJECTIVES)
    time_limit: float = opt(10.0, "solver seconds per configuration", positive=True)
    refine: int = opt(0, "measured refinement: per budget, this many composed candidates (one forward pass "
                         "each over the scoring subset) searched around the solver's configurations and the "
                         "uniform cut; 0: off",
                      low=0, high=10_000)

    @property
    def budgets(self) -> tuple[tuple[str, str | tuple[str, ...]], ...]:
        """(resource, value or values as `ctprune search` takes them)."""
        return tuple((r, v) for r in ("flops", "params", "latency")
                     if (v := getattr(self, r)) is not None)  # type: ignore[misc]

    def validate(self) -> None:
        for r in self.grid:
            if r != 0:  # keep 0: the block removed altogether (its residual branch skipped)
                _keep_ratio(r, "search.grid")
        if not any(r < 1 for r in self.grid):  # keep 1 is the untouched module, always a choice
            raise CtpruneError(f"search.grid {list(self.grid)} prunes nothing: give keep ratios in [0, 1), "
                               "e.g. [0.25, 0.5, 0.75]")
        try:
            budget_sweep(dict(self.budgets))
        except CtpruneError as e:
            raise CtpruneError(f"[search]: {e}") from None

    def check(self, where: str) -> None:
        if not self.budgets:
            raise CtpruneError(f"{where}: [search] needs a budget: flops = 0.6 (or a list, flops = [0.75, 0.5]) "
                               "and/or params = \"10M\"")


@dataclass(frozen=True)
class TuningSpec(_Spec):
    """[tuning]: block tuning by local distillation against the frozen origin."""

    epochs: int = opt(2, "block-tuning epochs", low=0)
    lr: float = opt(1e-4, "Adam learning rate of the variants", positive=True)
    patience: int = opt(2, "stop tuning a variant after this many epochs without a lower val block loss "
                           "(0: never)", low=0)


@dataclass(frozen=True)
class FinetuningSpec(_Spec):
    """[finetuning]: the protocol of both sides (baseline and composed)."""

    epochs: int = opt(3, "the cap E: most finetuning epochs of one configuration", low=1)
    lr: float = opt(1e-4, "Adam learning rate (constant, the prototype's)", positive=True)
    target_bleu: str | float = opt("origin-1", "stop once val BLEU reaches this: a BLEU, \"origin-X\" (the origin "
                                       "model's val BLEU minus X) or \"none\"")
    budget_epochs: int = opt(1, "the equal-budget comparison: at least this many epochs, kept as epoch-K",
                             low=1)
    eval_every: float = opt(1.0, "val BLEU and loss measured every this fraction of an epoch (0.25: four times "
                                 "per epoch), so time to target is not counted in whole epochs", positive=True,
                            high=1.0)
    select: str = opt("val_bleu", "which evaluation's weights are kept as the finetuned model: val_bleu (the "
                                  "highest val BLEU) or val_loss (the lowest val loss; less noisy)", choices=SELECTS)
    # The competitors of a budget sweep ([search]) beside `uniform`; they change no finetuning's key.
    random: int = opt(0, "with [search]: random configurations drawn per budget (seeded), composed from the tuned "
                         "bank and measured before finetuning (the `random` competitor); 0: none", low=0, high=MAX_K)
    scratch: bool = opt(False, "with [search]: per budget, the uniform cut's shape randomly initialised and trained "
                               "from scratch with the origin's recipe for the training FLOPs of the budget's composed "
                               "side (the whole tuned bank + budget_epochs of one configuration's finetuning)")
    scratch_ceiling: bool = opt(False, "with scratch: also that shape trained for the origin's whole training (its "
                                       "epochs), a reference ceiling (first seed only)")

    def validate(self) -> None:
        parse_target(self.target_bleu, "finetuning.target_bleu")
        if self.budget_epochs > self.epochs:
            raise CtpruneError("finetuning.budget_epochs must be in [1, finetuning.epochs], got "
                               f"{self.budget_epochs} > {self.epochs}")
        if self.scratch_ceiling and not self.scratch:
            raise CtpruneError("finetuning.scratch_ceiling needs finetuning.scratch = true")


@dataclass(frozen=True)
class ExecutionSpec(_Spec):
    """[execution]: where the run's jobs execute."""

    executor: str = opt("local", "local: one job at a time in this process; process: WORKERS processes on "
                                 "this machine; ray: Ray tasks on a cluster (or a local one)", choices=EXECUTORS)
    workers: int = opt(1, "parallel jobs; the machine's CPU threads are split between them", low=1, high=MAX_WORKERS)
    address: str | None = opt(None, "Ray cluster address (ray start --head prints it)",
                              default_text="a local Ray instance on this machine's cores")
    device: str = opt("auto", "auto (cuda when present, else cpu), cpu, cuda or cuda:N; resolved inside "
                              "each worker")
    shards: int | None = opt(None, "block-tuning jobs per bank, each paying its own teacher pass", low=1,
                             high=MAX_WORKERS, default_text="1 on one machine, where one job with every thread is "
                                                            "faster; one per worker on a Ray cluster, --ray-address")

    def tuning_shards(self, workers: int) -> int:
        """How many shards block tuning is split into when ``workers`` run the jobs."""
        if self.shards is not None:
            return self.shards
        return workers if self.address is not None else 1

    def validate(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise CtpruneError(f"execution.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.address is not None and self.executor != "ray":
            raise CtpruneError(f"execution.address is for executor = \"ray\", not {self.executor!r}")


# `ctprune run`'s options that override the experiment file's [execution]: (field, flag).
RUN_EXECUTION_FLAGS = (("executor", "--executor"), ("workers", "--workers"), ("address", "--ray-address"),
                       ("device", "--device"), ("shards", "--tuning-shards"))


def parse_target(text: Any, where: str) -> float | str | None:
    """A target BLEU: a number in [0, 100], "origin-X" (normalised), or "none" / None."""
    if text is None or text == "none":
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool) or \
            isinstance(text, str) and re.fullmatch(r"\d+(\.\d+)?", text):
        value = float(text)
        if not 0 <= value <= 100:
            raise CtpruneError(f"{where} must be a BLEU in [0, 100] or \"origin-X\", got {text!r}")
        return value
    if isinstance(text, str) and re.fullmatch(r"origin\s*-\s*\d+(\.\d+)?", text):
        return text.replace(" ", "")
    raise CtpruneError(f"{where} must be a number, \"origin-X\" or \"none\", got {text!r}")


def resolve_target(text: Any, origin_dir: Path, where: str = "--target-bleu") -> float | None:
    """``parse_target``, with "origin-X" resolved against the val BLEU that the origin model's
    training recorded (``train_summary.json``)."""
    from ctprune.fileio import read_json

    t = parse_target(text, where)
    if not isinstance(t, str):
        return t
    summary = Path(origin_dir) / "train_summary.json"
    if not summary.is_file():
        raise CtpruneError(f"{where} {text}: {origin_dir} records no val BLEU (no train_summary.json); "
                           "give a BLEU number or none")
    return float(read_json(summary, "training summary")["best_val_bleu"]) - float(t.split("-", 1)[1])


def origin_preset(origin_dir: Path | None, default: str = OriginSpec.preset) -> str:
    """The preset an origin model folder was trained with (its hparams.json says), else ``default``.
    It sets the batches and precision of tuning and finetuning (``ctprune.training.loop.preset_*``),
    the same for `ctprune run` and the stage commands."""
    from ctprune.fileio import read_json

    hp = None if origin_dir is None else Path(origin_dir) / "hparams.json"
    if hp is not None and hp.is_file():
        preset = read_json(hp, "origin hparams").get("preset")
        if preset in PRESETS:
            return str(preset)
    return default


def _keep_ratio(value: Any, where: str) -> None:
    if not 0 < value <= 1:
        raise CtpruneError(f"{where}: keep ratio must be in (0, 1], got {value!r}")


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _convert(value: Any, t: Any, where: str) -> Any:
    """``value`` (as TOML parsed it) checked against the annotation ``t``."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if isinstance(value, (list, tuple)):  # where one value or a list is allowed, a list is the list
            inner = [a for a in inner if typing.get_origin(a) is tuple] or inner
        if str in inner and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a budget or target given as a number
        return _convert(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            raise CtpruneError(f"{where} must be a non-empty list, got {value!r}")
        return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise CtpruneError(f"{where} must be a table, got {value!r}")
        return dict(value)  # its keys and values are checked by whoever knows the model
    if t is Path and isinstance(value, (str, os.PathLike)):
        return Path(value)
    ok = not isinstance(value, bool) and (isinstance(value, t) or t is float and isinstance(value, int))
    if t is bool:
        ok = isinstance(value, bool)
    if not ok:
        raise CtpruneError(f"{where} must be {_type_name(t)}, got {value!r}")
    return float(value) if t is float else value


def _check_value(value: Any, meta: dict[str, Any], where: str) -> None:
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if v is None:
            continue
        if meta.get("positive") and not (v > 0 and math.isfinite(v)):
            raise CtpruneError(f"{where} must be a positive number, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise CtpruneError(f"{where} must be a finite number, got {v!r}")
        if meta.get("choices") and v not in meta["choices"]:
            raise CtpruneError(f"{where} must be one of {', '.join(map(str, meta['choices']))}, got {v!r}")
        low, high = meta.get("low"), meta.get("high")
        if low is not None and v < low:
            raise CtpruneError(f"{where} must be at least {low}, got {v!r}")
        if high is not None and v > high:
            raise CtpruneError(f"{where} must be " + (f"in [{low}, {high}]" if low is not None else f"at most {high}")
                               + f", got {v!r}")


def from_table(cls: type, table: Any, where: str, section: str) -> Any:
    """An instance of the spec dataclass ``cls`` from one TOML table: unknown keys, wrong types
    and values out of range are refused, naming ``where`` (the file), the section and the key."""
    if not isinstance(table, dict):
        raise CtpruneError(f"{where}: [{section}] must be a table, got {table!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - fields)
    if unknown:
        raise CtpruneError(f"{where}: unknown key(s) {unknown} in [{section}]; allowed: {sorted(fields)}")
    try:
        spec = cls(**table)  # converted and checked by the spec itself, naming section.key
    except CtpruneError as e:
        raise CtpruneError(f"{where}: {e}") from None
    spec.check(where)
    return spec


def spec_default(cls: type, name: str) -> Any:
    """The default of the field ``name`` of ``cls`` (``REQUIRED`` when it has none)."""
    f = _field(cls, name)
    if f.default is MISSING and f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def add_option(parser: argparse.ArgumentParser, cls: type, name: str, *flags: str, **overrides: Any) -> None:
    """``--NAME`` (or ``flags``) on ``parser`` with the type, default, choices and help of the
    spec field ``cls.name``; ``overrides`` change what the command needs changed (e.g. ``help``)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    t = typing.get_type_hints(cls)[name]
    union = typing.get_origin(t) in (typing.Union, types.UnionType)
    base = [a for a in typing.get_args(t) if a is not type(None)] if union else [t]
    kw: dict[str, Any] = {"default": spec_default(cls, name), "help": f.metadata["help"]}
    if kw["default"] is None and f.metadata.get("default_text"):
        kw["help"] += f" (default: {f.metadata['default_text']})"
    if typing.get_origin(base[0]) is tuple:
        kw.update(nargs="+", type=typing.get_args(base[0])[0], default=list(kw["default"] or []) or None)
    elif base[0] in (int, float):
        kw["type"] = base[0]
    if f.metadata.get("choices"):
        kw["choices"] = f.metadata["choices"]
    kw.update(overrides)
    parser.add_argument(*(flags or (f"--{name.replace('_', '-')}",)), dest=name, **kw)


def check_option(cls: type, name: str, value: Any, flag: str) -> Any:
    """A CLI value checked by the same rules as the experiment file's (``flag`` names it)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if isinstance(value, float) and not math.isfinite(value):
        raise CtpruneError(f"{flag} must be a finite number, got {value!r}")
    _check_value(tuple(value) if isinstance(value, list) else value, dict(f.metadata), flag)
    return value
