"""The experiment file (TOML) of `ctprune run`, validated on load.

    seed = 0   or   seeds = [0, 1, 2]   (tuning and finetuning randomness; one origin model)
    [data]           corpus = "synthetic" | "multi30k", data_dir = "..." (optional)
    [origin]         preset = "tiny" | "seed", epochs = 8    (or model = "path/to/origin")
    [configurations] attention = [..], linear = [..], ffn = [..]   (one ratio per configuration)
                     or file = "conf.json", or inline = [{module = ratio, ...}, ...]
    [search]         (instead of [configurations]) grid = [0.25, 0.5, 0.75], kinds = ["attention", "ffn"],
                     flops = 0.6 and/or params = "10M", k = 8, min_distance = 2: a grid bank is
                     pruned, tuned and scored, and `ctprune search` picks the configurations
    [tuning]         epochs = 2, lr = 1e-4
    [finetuning]     epochs = 3 (the cap E), lr = 1e-4, target_bleu = "origin-1" (or a number),
                     budget_epochs = 1 (the equal-budget comparison)
Unknown sections and unknown keys are refused.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctprune.errors import CtpruneError

KEYS: dict[str, set[str]] = {
    "data": {"corpus", "data_dir"}, "origin": {"preset", "epochs", "model"},
    "configurations": {"attention", "linear", "ffn", "file", "inline"}, "tuning": {"epochs", "lr"},
    "finetuning": {"epochs", "lr", "target_bleu", "budget_epochs"},
    "search": {"grid", "kinds", "flops", "params", "k", "min_distance"}}
SECTIONS = {"seed", "seeds", *KEYS}


@dataclass(frozen=True)
class SearchSpec:
    """The [search] section: a grid bank, and the budgets and diversity of `ctprune search`."""

    grid: tuple[float, ...] = (0.25, 0.5, 0.75)
    kinds: tuple[str, ...] = ("attention", "ffn")
    budgets: tuple[tuple[str, str], ...] = ()  # (resource, value as `ctprune search` takes it)
    k: int = 16  # as `ctprune search -k`
    min_distance: int = 2


@dataclass
class Experiment:
    path: Path
    seeds: list[int] = field(default_factory=lambda: [0])
    corpus: str = "synthetic"
    data_dir: str | None = None
    preset: str = "tiny"
    origin_epochs: int = 8
    origin_model: Path | None = None
    conf_file: Path | None = None
    conf_inline: list[dict[str, float]] | None = None
    attention: list[float] | None = None
    linear: list[float] | None = None
    ffn: list[float] | None = None
    tune_epochs: int = 2
    tune_lr: float = 1e-4
    finetune_epochs: int = 3
    finetune_lr: float = 1e-4
    budget_epochs: int = 1
    target: str | float | None = "origin-1"
    search: SearchSpec | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def max_tokens(self) -> int:
        """Token budget per batch for tuning and finetuning: small batches for the tiny preset."""
        return 1024 if self.preset == "tiny" else 4096

    @property
    def bf16(self) -> bool:
        """bf16 autocast for the seed preset (1.7-1.8x faster there), fp32 for tiny models (whose
        matmuls are too small to pay for the casts); training, tuning and finetuning alike."""
        return self.preset != "tiny"

    def target_bleu(self, origin_bleu: float) -> float | None:
        """An absolute BLEU, or "origin-X": the origin model's val BLEU minus X."""
        if self.target is None or isinstance(self.target, float):
            return self.target
        return origin_bleu - float(self.target.split("-", 1)[1])


def _get(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any) -> Any:
    if key not in d:
        return default
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise CtpruneError(f"{where}.{key} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _ratios(d: dict[str, Any], key: str, where: str) -> list[float] | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                   for x in v):
        raise CtpruneError(f"{where}.{key} must be a non-empty list of keep ratios, got {v!r}")
    return [float(x) for x in v]


def _search(d: dict[str, Any], path: Path) -> SearchSpec:
    from ctprune.pruning.configs import KINDS, check_ratio

    grid = _ratios(d, "grid", "search") or list(SearchSpec.grid)
    for r in grid:
        check_ratio(r, f"{path} search.grid")
    kinds = _get(d, "kinds", list, "search", list(SearchSpec.kinds))
    if not kinds or any(k not in KINDS for k in kinds):
        raise CtpruneError(f"search.kinds must be a non-empty list of {', '.join(KINDS)}, got {kinds!r}")
    from ctprune.stages.search import parse_budget

    budgets = tuple((r, str(_get(d, r, (int, float, str), "search", None))) for r in ("flops", "params") if r in d)
    for r, v in budgets:
        parse_budget(r, v)
    if not budgets:
        raise CtpruneError(f"{path}: [search] needs a budget: flops = 0.6 and/or params = \"10M\"")
    spec = SearchSpec(tuple(grid), tuple(kinds), budgets, _get(d, "k", int, "search", SearchSpec.k),
                      _get(d, "min_distance", int, "search", SearchSpec.min_distance))
    if spec.k < 1 or spec.min_distance < 1:
        raise CtpruneError(f"search.k and search.min_distance must be at least 1, got {spec.k} and "
                           f"{spec.min_distance}")
    return spec


def load_experiment(path: Path) -> Experiment:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CtpruneError(f"experiment file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise CtpruneError(f"{path} is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise CtpruneError(f"{path} is not UTF-8 text (byte {e.start})") from None
    unknown = sorted(set(raw) - SECTIONS)
    if unknown:
        raise CtpruneError(f"{path}: unknown section(s) {unknown}; allowed: {sorted(SECTIONS)}")
    for section, keys in KEYS.items():
        if section in raw and not isinstance(raw[section], dict):
            raise CtpruneError(f"{path}: [{section}] must be a table, got {raw[section]!r}")
        bad = sorted(set(raw.get(section, {})) - keys)
        if bad:
            raise CtpruneError(f"{path}: unknown key(s) {bad} in [{section}]; allowed: {sorted(keys)}")
    data, origin, confs = raw.get("data", {}), raw.get("origin", {}), raw.get("configurations", {})
    tune, ft = raw.get("tuning", {}), raw.get("finetuning", {})
    if "seed" in raw and "seeds" in raw:
        raise CtpruneError(f"{path}: give seed or seeds, not both")
    seeds = _get(raw, "seeds", list, "experiment", [_get(raw, "seed", int, "experiment", 0)])
    if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds) \
            or len(set(seeds)) != len(seeds):
        raise CtpruneError(f"experiment.seeds must be a non-empty list of distinct integers, got {seeds!r}")
    e = Experiment(path=path, raw=raw, seeds=seeds)
    e.corpus = _get(data, "corpus", str, "data", "synthetic")
    if e.corpus not in ("synthetic", "multi30k"):
        raise CtpruneError(f"data.corpus must be \"synthetic\" or \"multi30k\", got {e.corpus!r}")
    e.data_dir = _get(data, "data_dir", str, "data", None)
    e.preset = _get(origin, "preset", str, "origin", "tiny")
    if e.preset not in ("tiny", "seed"):
        raise CtpruneError(f"origin.preset must be \"tiny\" or \"seed\", got {e.preset!r}")
    e.origin_epochs = _get(origin, "epochs", int, "origin", 8)
    model = _get(origin, "model", str, "origin", None)
    e.origin_model = (path.parent / model) if model else None
    file = _get(confs, "file", str, "configurations", None)
    e.conf_file = (path.parent / file) if file else None
    e.conf_inline = _get(confs, "inline", list, "configurations", None)
    e.attention, e.linear, e.ffn = (_ratios(confs, k, "configurations") for k in ("attention", "linear", "ffn"))
    if "search" in raw:
        if "configurations" in raw:
            raise CtpruneError(f"{path}: give [configurations] or [search], not both")
        e.search = _search(raw["search"], path)
    elif sum(x is not None for x in (e.conf_file, e.conf_inline, e.attention or e.linear or e.ffn)) != 1:
        raise CtpruneError(f"{path}: [configurations] needs exactly one of file, inline, or ratio lists "
                           "(attention / linear / ffn)")
    e.tune_epochs = _get(tune, "epochs", int, "tuning", 2)
    e.tune_lr = float(_get(tune, "lr", (int, float), "tuning", 1e-4))
    e.finetune_epochs = _get(ft, "epochs", int, "finetuning", 3)
    e.finetune_lr = float(_get(ft, "lr", (int, float), "finetuning", 1e-4))
    e.budget_epochs = _get(ft, "budget_epochs", int, "finetuning", 1)
    if e.finetune_epochs < 1 or not 1 <= e.budget_epochs <= e.finetune_epochs:
        raise CtpruneError(f"finetuning.epochs must be at least 1 and finetuning.budget_epochs in [1, "
                           f"finetuning.epochs], got {e.finetune_epochs} and {e.budget_epochs}")
    for name, v in (("tuning.lr", e.tune_lr), ("finetuning.lr", e.finetune_lr)):
        if not (math.isfinite(v) and v > 0):
            raise CtpruneError(f"{name} must be a positive number, got {v!r}")
    t = ft.get("target_bleu", e.target)
    if t is not None:
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            if not 0 <= t <= 100:
                raise CtpruneError(f"finetuning.target_bleu must be a BLEU in [0, 100] or \"origin-X\", got {t!r}")
            e.target = float(t)
        elif isinstance(t, str) and re.fullmatch(r"origin\s*-\s*\d+(\.\d+)?", t):
            e.target = t.replace(" ", "")
        else:
            raise CtpruneError(f"finetuning.target_bleu must be a number or \"origin-X\", got {t!r}")
    for name, v in (("origin.epochs", e.origin_epochs), ("tuning.epochs", e.tune_epochs),
                    ("finetuning.epochs", e.finetune_epochs)):
        if v < 0:
            raise CtpruneError(f"{name} must be a non-negative integer, got {v}")
    return e
