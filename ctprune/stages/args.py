"""The arguments of every stage: one frozen ``Args`` dataclass per stage, checked on construction.

Each field declares its type, default, help and limits once (``opt``), or takes them from the
experiment file's field of the same meaning (``like``: ``--epochs`` of `tune-blocks` is
``[tuning] epochs``). The CLI generates each subcommand's options from these fields
(``ctprune.spec.add_arguments``) and calls ``stage(Args(**values))``; `ctprune run`'s jobs build the
same Args. Fields marked ``cli=False`` are set by code only (jobs, tests).

This module imports neither torch nor the stages, so that ``ctprune --help`` and a refused
option answer at once; the checks that need a model or the file system run in the stages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctprune.budget import RESOURCES, Point, budget_sweep
from ctprune.errors import CtpruneError
from ctprune.spec import (
    CRITERIA,
    LATENCY_REPEATS,
    MAX_TOKENS,
    MIN_TOKENS,
    PRECISIONS,
    RECIPES,
    REQUIRED,
    RUN_EXECUTION_FLAGS,
    SCORE_BATCHES,
    Args,
    ConfigurationsSpec,
    DataSpec,
    ExecutionSpec,
    FinetuningSpec,
    OriginSpec,
    SearchSpec,
    TuningSpec,
    like,
    opt,
    origin_preset,
    parse_target,
    spec_default,
)

if TYPE_CHECKING:
    from ctprune.training.loop import Recipe
else:
    Recipe = object  # the annotation of code-only fields; importing the training loop would import torch

ENGINES = ("torch", "onnxruntime", "ctranslate2")  # torch, then ctprune.serve.engines.ENGINES
SPLIT_HELP = "split name (multi30k: train, val, test_2016_flickr; synthetic: train, val, test)"
RECIPE_HELP = ("fast: warm-up + cosine lr, label smoothing 0.1, token-budget batches; original: the prototype's "
               "Adam 1e-4, 128-sentence batches, plain cross-entropy; finetune: the prototype's optimizer on "
               "length-sorted token-budget batches")
ENGINE_HELP = ("torch: a model folder in PyTorch; onnxruntime, ctranslate2: a folder from "
               "`ctprune export --format onnx|ctranslate2` (CPU)")


# Fields that several stages share, declared once each.

def _model(help: str = "origin model folder") -> Any:
    return opt(REQUIRED, help, positional=True)


def _output(help: str) -> Any:
    return opt(REQUIRED, help, flags=("-o", "--output"))


def _bank(help: str) -> Any:
    return opt(REQUIRED, help)


def _configurations() -> Any:
    return opt(REQUIRED, "configuration file", flags=("-c", "--configurations"))


def _corpus(**changes: Any) -> Any:
    return like(DataSpec, "corpus", **changes)


def _data_dir() -> Any:
    return like(DataSpec, "data_dir")


def _device() -> Any:
    return like(ExecutionSpec, "device")


def _beam() -> Any:
    return opt(1, "beam size (1 = greedy)")  # limits: ctprune.model.decode.check_beam


def _engine() -> Any:
    return opt("torch", ENGINE_HELP, choices=ENGINES)


def _max_tokens(help: str, default: int | None = None, default_text: str | None = None) -> Any:
    return opt(default, help, low=MIN_TOKENS, default_text=default_text)


def _precision(help: str) -> Any:
    return opt("auto", help, choices=PRECISIONS)


def _recipe_name(default: str) -> Any:
    return opt(default, RECIPE_HELP, choices=RECIPES, flags=("--recipe",))


def _seed(help: str = "random seed") -> Any:
    return opt(0, help)


def _recipe_max_tokens() -> Any:
    return _max_tokens("token budget per batch, padded source+target tokens, of the fast and finetune recipes",
                       default_text="the model's preset's, as `ctprune run` uses")


_RESUME_HELP = "continue an interrupted run in -o from its last finished epoch"
_RECIPE_PRECISION = ("bf16 autocast or plain fp32; auto = the policy of the model's preset (finetune: the origin's), "
                     "bf16 for seed, fp32 for tiny: see ctprune.training.loop.preset_bf16")
_WHOLE_RECIPE = "a whole training recipe (code and tests), used instead of the recipe options"


def _training_recipe(a: TrainArgs | FinetuneArgs, preset: str, **extra: Any) -> Recipe:
    """The recipe of `train` / `finetune`: ``preset`` (the model's) sets its precision under
    ``--precision auto`` and the finetune recipe's batches, as `ctprune run` sets them."""
    from ctprune.training.loop import preset_max_tokens, preset_recipe

    if a.recipe is not None:
        return a.recipe
    max_tokens = a.max_tokens
    if max_tokens is None and a.recipe_name == "finetune":
        max_tokens = preset_max_tokens(preset)
    return preset_recipe(preset, a.recipe_name, a.precision, epochs=a.epochs, seed=a.seed, lr=a.lr,
                         max_tokens=max_tokens, **extra)


# ------------------------------------------------------------------------------------ the stages


@dataclass(frozen=True, kw_only=True)
class TrainArgs(Args):
    """`ctprune train`: corpus -> tokenizer -> origin model folder."""

    preset: str = like(OriginSpec, "preset")
    arch: str = like(OriginSpec, "arch")
    corpus: str = _corpus()
    data_dir: str | None = _data_dir()
    vocab_size: int | None = opt(None, "sentencepiece vocabulary", low=50, high=64000,
                                 default_text="8000 for multi30k, 1000 for synthetic")
    # The recipe checks the epochs (>= 0: `train -e 0` writes an untrained model), lr and batches.
    epochs: int = like(OriginSpec, "epochs", flags=("-e", "--epochs"), low=None)
    recipe_name: str = _recipe_name("fast")
    lr: float | None = opt(None, "peak learning rate", positive=True, default_text="the recipe's")
    max_tokens: int | None = _recipe_max_tokens()
    precision: str = _precision(_RECIPE_PRECISION)
    seed: int = _seed()
    resume: bool = opt(False, _RESUME_HELP)
    device: str = _device()
    output: Path = _output("model folder to write")
    recipe: Recipe | None = opt(None, _WHOLE_RECIPE, cli=False)

    def validate(self) -> None:
        from ctprune.arch import get as get_arch

        get_arch(self.arch)  # transformers missing fails here
        self.training_recipe()

    def training_recipe(self) -> Recipe:
        return _training_recipe(self, self.preset)


@dataclass(frozen=True, kw_only=True)
class EvaluateArgs(Args):
    """`ctprune evaluate`: translate a split, write the hypotheses and a BLEU / chrF report."""

    model: Path = _model("model folder")
    corpus: str = _corpus()
    data_dir: str | None = _data_dir()
    split: str = opt("test_2016_flickr", SPLIT_HELP)
    beam: int = _beam()
    device: str = _device()
    output: Path | None = opt(None, "folder for the hypotheses and the JSON report", flags=("-o", "--output"),
                              default_text="MODEL/eval")
    engine: str = _engine()
    quiet: bool = opt(False, "print nothing", cli=False)


@dataclass(frozen=True, kw_only=True)
class TranslateArgs(Args):
    """`ctprune translate`: German lines on stdin -> English lines on stdout."""

    model: Path = _model("model folder")
    beam: int = _beam()
    device: str = _device()
    engine: str = _engine()


@dataclass(frozen=True, kw_only=True)
class ExportCommandArgs(Args):
    """`ctprune export`'s options: ``ctprune.serve.export.ExportArgs`` (whose defaults these are, a
    test checks) checks format and quantization when the command builds it."""

    model: Path = _model("model folder: ctprune's own Transformer, a MarianMT or a T5 (ctranslate2: not T5)")
    format: str = opt("onnx", "onnx or ctranslate2")
    quantize: str = opt("none", "none or int8 (ONNX Runtime: dynamic, per channel; CTranslate2: int8 weights per row)")
    optimize: bool = opt(False, "onnx only: ONNX Runtime's transformer fusions (heads read per layer), each fused "
                                "graph checked against the unfused one; applied before --quantize")
    output: Path = _output("serving folder to write")


@dataclass(frozen=True, kw_only=True)
class InspectArgs(Args):
    """`ctprune inspect`: the prunable modules of a model folder."""

    model: Path = _model("model folder")


@dataclass(frozen=True, kw_only=True)
class ConfigsArgs(Args):
    """`ctprune configs`: N default configurations (the prototype's template, or the ratios given)."""

    model: Path = _model()
    n: int = opt(3, "number of configurations", flags=("-n",))  # limits: pruning.configs.MAX_CONFIGURATIONS
    attention: tuple[float, ...] | None = like(ConfigurationsSpec, "attention", metavar="R")
    linear: tuple[float, ...] | None = like(ConfigurationsSpec, "linear", metavar="R")
    ffn: tuple[float, ...] | None = like(ConfigurationsSpec, "ffn", metavar="R",
                                         help="prune FFNs structured (neurons) at these ratios instead of their "
                                              "Linears, one per configuration")
    output: Path = _output("configuration file (JSON list) to write")


@dataclass(frozen=True, kw_only=True)
class PlanArgs(Args):
    """`ctprune plan`: per module, the distinct keep ratios < 1 of a configuration file."""

    configurations: Path = opt(REQUIRED, "configuration file: JSON list of {module: keep ratio}", positional=True)
    model: Path = opt(REQUIRED, "origin model folder (checked and fingerprinted)", flags=("-m", "--model"))
    output: Path = _output("plan file to write")


@dataclass(frozen=True, kw_only=True)
class PruneArgs(Args):
    """`ctprune prune`: every (module, keep ratio) of a plan, a single ratio or a grid, into a bank."""

    model: Path = _model()
    plan: Path | None = opt(None, "plan file from `ctprune plan`")
    ratio: float | None = opt(None, "instead of a plan: every prunable module at this keep ratio")
    grid: tuple[float, ...] | None = opt(None, "instead of a plan: a grid bank, every prunable module of --kinds at "
                                               "every ratio", metavar="R")
    kinds: tuple[str, ...] = like(SearchSpec, "kinds", help="module kinds of a --grid bank (attention and FFN blocks "
                                                           "bring real speed)")
    criterion: str = opt(CRITERIA[0], "head/neuron importance: original = |sum of q,k,v weights| (FFN: L1), l1 = "
                                      "weight L1 norm, activation = output magnitude on training batches",
                         choices=CRITERIA)
    corpus: str = _corpus()
    data_dir: str | None = _data_dir()
    output: Path = _output("bank folder to create")
    calibration_batches: int = opt(8, "training batches of the activation criterion", cli=False)

    def validate(self) -> None:
        if sum(x is not None for x in (self.plan, self.ratio, self.grid)) != 1:
            raise CtpruneError("give one of --plan PLAN, --ratio R or --grid R [R ...]")


@dataclass(frozen=True, kw_only=True)
class ScoreArgs(Args):
    """`ctprune score`: each variant's damage alone (replace one block), stored in the bank's index."""

    model: Path = _model()
    bank: Path = _bank("bank folder (pruned or tuned)")
    corpus: str = _corpus()
    data_dir: str | None = _data_dir()
    batches: int = opt(SCORE_BATCHES, "validation batches of the scoring subset", low=1)
    max_tokens: int = _max_tokens("token budget per scoring batch", MAX_TOKENS)
    latency: bool = opt(False, "also measure each variant's latency in context (greedy decoding, fixed steps)")
    latency_repeats: int = opt(LATENCY_REPEATS, "timed repeats per variant", low=1)
    force: bool = opt(False, "recompute every score even if up to date")
    device: str = _device()


def _budget(resource: str) -> Any:
    what, example = {"params": ("non-zero parameters", "10M"), "flops": ("FLOPs per sentence pair", "1.5G"),
                     "latency": ("latency (needs `ctprune score --latency`)", "12ms")}[resource]
    return like(SearchSpec, resource, metavar="B",
                help=f"budget(s) on {what}: a fraction of the origin (0.6, 60%) or absolute ({example}); several "
                     "sweep budgets, k configurations each")


_SCORED = "the scoring's (the bank's scores record it)"


@dataclass(frozen=True, kw_only=True)
class SearchArgs(Args):
    """`ctprune search`: the k best configurations per budget point, from a scored bank."""

    model: Path = _model()
    bank: Path = _bank("bank scored by `ctprune score`")
    params: str | tuple[str | float, ...] | None = _budget("params")
    flops: str | tuple[str | float, ...] | None = _budget("flops")
    latency: str | tuple[str | float, ...] | None = _budget("latency")
    k: int = like(SearchSpec, "k", flags=("-k",))
    min_distance: int = like(SearchSpec, "min_distance")
    objective: str = like(SearchSpec, "objective")
    time_limit: float = like(SearchSpec, "time_limit")
    refine: int = like(SearchSpec, "refine")
    # The validation subset; None: the one the bank was scored on (its fingerprint is checked).
    corpus: str | None = _corpus(default=None, default_text=_SCORED)
    data_dir: str | None = _data_dir()
    batches: int | None = opt(None, "validation batches of the scoring subset", low=1, default_text=_SCORED)
    max_tokens: int | None = _max_tokens("token budget per scoring batch", default_text=_SCORED)
    verify: bool = opt(False, "compose every configuration and random ones at the same budget; measure val loss "
                              "and BLEU before finetuning; print Spearman(estimate, loss)")
    random: int = opt(16, "random configurations for --verify", low=0)
    verify_sentences: int | None = opt(None, "val sentences for BLEU", low=1, default_text="all")
    seed: int = _seed("seed of the random configurations")
    output: Path = _output("configuration file to write (search.json goes beside it)")
    # Budget points (``budget_sweep``), k configurations each; a flat tuple of Budgets is one point.
    # Empty: made from --params / --flops / --latency.
    budgets: tuple[Point, ...] = opt((), "budget points", cli=False)

    def validate(self) -> None:
        budgets = self.budgets or budget_sweep({r: getattr(self, r) for r in RESOURCES})
        if budgets and all(not isinstance(b, tuple) for b in budgets):
            budgets = (tuple(budgets),)  # type: ignore[arg-type]
        object.__setattr__(self, "budgets", budgets)
        if not self.budgets or not all(self.budgets):
            raise CtpruneError("give at least one budget: --flops F, --params P or --latency L")
        for point in self.budgets:
            if len({b.resource for b in point}) != len(point):
                raise CtpruneError("give each of --flops, --params, --latency at most once per budget")
        if len({tuple(b.resource for b in point) for point in self.budgets}) != 1:
            raise CtpruneError("every budget of a sweep must limit the same resources")


@dataclass(frozen=True, kw_only=True)
class ComposeArgs(Args):
    """`ctprune compose`: configuration N of a file, from a bank, as a standalone model folder."""

    model: Path = _model()
    bank: Path = _bank("bank folder")
    configurations: Path = _configurations()
    n: int = opt(REQUIRED, "index of the configuration (from 0)", flags=("-n",))
    output: Path = _output("model folder to write")


@dataclass(frozen=True, kw_only=True)
class TuneArgs(Args):
    """`ctprune tune-blocks`: every variant of a bank tuned to reproduce its module (local distillation)."""

    model: Path = _model()
    bank: Path = _bank("bank from `ctprune prune`")
    corpus: str = _corpus()
    data_dir: str | None = _data_dir()
    epochs: int = like(TuningSpec, "epochs", flags=("-e", "--epochs"))
    lr: float = like(TuningSpec, "lr")
    max_tokens: int | None = _max_tokens("token budget per batch",
                                         default_text="the origin's preset's, as `ctprune run` uses")
    patience: int = like(TuningSpec, "patience")
    seed: int = _seed("random seed (data order)")
    precision: str = _precision("bf16 autocast or fp32; auto = the precision the origin model was trained with "
                                "(the same policy as finetuning)")
    resume: bool = opt(False, "continue an interrupted tuning in -o")
    device: str = _device()
    output: Path = _output("tuned bank folder to write")
    only: tuple[str, ...] | None = opt(None, "the variant keys to tune (a shard); None: all", cli=False)


@dataclass(frozen=True, kw_only=True)
class FinetuneArgs(Args):
    """`ctprune finetune`: configuration N (or all) composed from a bank and finetuned end to end."""

    model: Path = _model()
    bank: Path = _bank("bank folder (pruned: baseline; tuned: composed)")
    configurations: Path = _configurations()
    n: int | None = opt(None, "index of the configuration (from 0)", flags=("-n",), low=0)
    all: bool = opt(False, "every configuration, one after another, resumably")
    corpus: str = _corpus()
    data_dir: str | None = _data_dir()
    epochs: int = like(FinetuningSpec, "epochs", flags=("-e", "--epochs"))
    recipe_name: str = _recipe_name("finetune")
    lr: float = like(FinetuningSpec, "lr")
    max_tokens: int | None = _recipe_max_tokens()
    precision: str = _precision(_RECIPE_PRECISION)
    seed: int = _seed()
    resume: bool = opt(False, _RESUME_HELP)
    target_bleu: str | float | None = like(FinetuningSpec, "target_bleu")
    budget_epochs: int = like(FinetuningSpec, "budget_epochs")
    eval_every: float = like(FinetuningSpec, "eval_every")
    select: str = like(FinetuningSpec, "select")
    device: str = _device()
    output: Path = _output("model folder (with --all: a folder of config-I)")
    snapshot_epochs: tuple[int, ...] = opt((), "epochs whose model is kept as epoch-K", cli=False)
    recipe: Recipe | None = opt(None, _WHOLE_RECIPE, cli=False)

    def validate(self) -> None:
        if (self.n is None) == (not self.all):
            raise CtpruneError("give either -n I (one configuration) or --all")
        if self.budget_epochs > self.epochs:
            raise CtpruneError(f"--budget-epochs must be at most --epochs, got {self.budget_epochs} > {self.epochs}")
        parse_target(self.target_bleu, "--target-bleu")

    def training_recipe(self) -> Recipe:
        """The recipe under the origin's preset (its hparams.json), as `ctprune run` finetunes."""
        return _training_recipe(self, origin_preset(self.model), eval_every=self.eval_every, select=self.select)


def _execution(name: str) -> Any:
    """`ctprune run`'s override of ``[execution] name``: None unless given."""
    f = ExecutionSpec.__dataclass_fields__[name]
    fallback = f.metadata["default_text"] or spec_default(ExecutionSpec, name)
    return like(ExecutionSpec, name, default=None, default_text=None, flags=(dict(RUN_EXECUTION_FLAGS)[name],),
                help=f"{f.metadata['help']} (default: the experiment file's [execution] {name}, else {fallback})")


@dataclass(frozen=True, kw_only=True)
class RunArgs(Args):
    """`ctprune run`: the whole experiment of a TOML file; flags override its [execution]."""

    experiment: Path = opt(REQUIRED, "experiment file, e.g. examples/demo.toml", positional=True)
    output: Path | None = opt(None, "run folder", flags=("-o", "--output"), default_text="runs/EXPERIMENT_NAME")
    executor: str | None = _execution("executor")
    workers: int | None = _execution("workers")
    address: str | None = _execution("address")
    device: str | None = _execution("device")
    shards: int | None = _execution("shards")

    @property
    def execution(self) -> dict[str, Any]:
        """The [execution] keys given on the command line."""
        return {f.name: v for f in dataclasses.fields(ExecutionSpec) if (v := getattr(self, f.name)) is not None}


@dataclass(frozen=True, kw_only=True)
class ReportArgs(Args):
    """`ctprune report`: report.md / report.html of a run folder, rebuilt."""

    run_dir: Path = opt(REQUIRED, "run folder of `ctprune run`", positional=True)


@dataclass(frozen=True, kw_only=True)
class DataCheckArgs(Args):
    """`ctprune data check`: the Multi30k files found, their sizes and checksums."""

    data_dir: str | None = like(DataSpec, "data_dir", help="Multi30k folder (else $CTPRUNE_DATA_DIR, else the cache)",
                                default_text=None)


@dataclass(frozen=True, kw_only=True)
class DataDownloadArgs(Args):
    """`ctprune data download`: the official Multi30k Task 1 files, SHA-256 verified."""

    output: Path | None = opt(None, "destination", flags=("-o", "--output"), default_text="the download cache")
