"""The run summary (RUN_DIR/summary.json): every number of the report, as one typed object.

``Summary.to_json()`` gives the dict written to summary.json; ``Summary.from_json(obj, path)``
checks a dict read from one (its required keys, and the keys the report reads in each required
section) and refuses an incomplete one in one line naming the missing key and the file.
Summaries written before ``schema_version`` existed read as version 1: their missing optional
sections (``execution``, ``inputs``, the competitors of a sweep) are None.

Version history: 1, no ``schema_version`` key; 2, the key (the content is version 1's).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ctprune.errors import CtpruneError

SCHEMA_VERSION = 2
SIDES = ("baseline", "composed")

# The keys the report reads unconditionally in each section: a summary without one is refused on load.
ORIGIN_KEYS = ("val_bleu", "test_bleu", "params", "flops_per_token")
PROTOCOL_KEYS = ("target", "cap_epochs", "budget_epochs", "latency_repeats")
CONFIGURATION_KEYS = ("configuration", "params", "nonzero_params", "flops_ratio", "latency")
RUN_KEYS = ("seed", "tuned_bank", "tuning", "configurations", "saving", "curve")
TUNING_KEYS = ("variants", "epochs_done", "wall_time_s", "train_tokens", "achieved_gflops")
SAVING_KEYS = ("ratio_seconds", "ratio_flops", "bound", "baseline_seconds", "baseline_flops", "bank_seconds",
               "bank_flops", "composed_seconds", "composed_flops", "censored_baselines", "censored_composed")
CURVE_KEYS = ("ratio_seconds", "ratio_flops")
SIDE_KEYS = ("dir", "epochs_to_target", "val_bleu_epoch0", "test_bleu_budget", "test_bleu_best")
SEARCH_KEYS = ("k", "min_distance", "choices", "slots", "solver", "configurations", "scoring_seconds")


@dataclass(frozen=True)
class Summary:
    """One run's summary. The sections below the top level stay JSON dicts (their keys are checked
    on load); ``search`` is None without [search]; ``competitors``, ``random`` and ``frontier`` are
    None where the run has none (they are then absent from the file); ``execution`` and ``inputs``
    are None only in summaries older than them. ``extra``: top-level keys this version does not
    know (kept, and written back)."""

    experiment: str
    seeds: list[int]
    corpus: str
    target_bleu: float | None
    protocol: dict[str, Any]
    test_splits: list[str]
    origin: dict[str, Any]
    bleu_signature: str
    chrf_signature: str
    configurations: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    finetune_achieved_gflops: float
    versions: dict[str, Any]
    machine: dict[str, Any]
    search: dict[str, Any] | None = None
    execution: dict[str, Any] | None = None
    inputs: dict[str, Any] | None = None
    competitors: list[dict[str, Any]] | None = None
    random: list[dict[str, Any]] | None = None
    frontier: list[dict[str, Any]] | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The dict of summary.json (the order of the file's keys: this class's fields, the
        schema version first); None optional sections left out, ``search`` always written."""
        out: dict[str, Any] = {"schema_version": self.schema_version}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("schema_version", "extra") or (value is None and f.name in OPTIONAL and f.name != "search"):
                continue
            out[f.name] = value
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, obj: Any, path: Path | str) -> Summary:
        """The summary of ``obj`` (summary.json's content, read from ``path``), checked: a missing
        required key, a section of the wrong type or a newer schema is refused in one line."""
        where = f"{path}: not a complete run summary"
        if not isinstance(obj, dict):
            raise CtpruneError(f"{where} (not a JSON object); re-run `ctprune run` to rewrite it")
        version = obj.get("schema_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CtpruneError(f"{where}: schema_version {version!r} is not a positive integer")
        if version > SCHEMA_VERSION:
            raise CtpruneError(f"{path}: run summary of schema version {version}, newer than this ctprune reads "
                               f"({SCHEMA_VERSION}); upgrade ctprune")
        for key in REQUIRED:
            if key not in obj:
                raise CtpruneError(f"{where}: no {key!r}; re-run `ctprune run` to rewrite it")
        _check(obj, where)
        known = {f.name for f in fields(cls)} - {"extra", "schema_version"}
        return cls(**{k: v for k, v in obj.items() if k in known}, schema_version=version,
                   extra={k: v for k, v in obj.items() if k not in known | {"schema_version"}})


REQUIRED = (  # the fields without a default
    "experiment", "seeds", "corpus", "target_bleu", "protocol", "test_splits", "origin", "bleu_signature",
    "chrf_signature", "configurations", "runs", "finetune_achieved_gflops", "versions", "machine")
OPTIONAL = ("search", "execution", "inputs", "competitors", "random", "frontier")


def _keys(obj: Any, keys: tuple[str, ...], at: str, where: str) -> None:
    if not isinstance(obj, dict):
        raise CtpruneError(f"{where}: {at} is not a JSON object; re-run `ctprune run` to rewrite it")
    for key in keys:
        if key not in obj:
            raise CtpruneError(f"{where}: no {at}.{key}; re-run `ctprune run` to rewrite it")


def _list(obj: Any, at: str, where: str, nonempty: bool = False) -> list[Any]:
    if not isinstance(obj, list) or (nonempty and not obj):
        raise CtpruneError(f"{where}: {at} is not a{' non-empty' if nonempty else ''} list; "
                           "re-run `ctprune run` to rewrite it")
    return obj


def _check(s: dict[str, Any], where: str) -> None:
    """The keys the report reads in each section, in one-line refusals naming the key's place."""
    _keys(s["origin"], ORIGIN_KEYS, "origin", where)
    _keys(s["protocol"], PROTOCOL_KEYS, "protocol", where)
    _list(s["test_splits"], "test_splits", where, nonempty=True)
    _list(s["seeds"], "seeds", where, nonempty=True)
    for i, c in enumerate(_list(s["configurations"], "configurations", where)):
        _keys(c, CONFIGURATION_KEYS, f"configurations[{i}]", where)
    for i, r in enumerate(_list(s["runs"], "runs", where, nonempty=True)):
        _keys(r, RUN_KEYS, f"runs[{i}]", where)
        _keys(r["tuning"], TUNING_KEYS, f"runs[{i}].tuning", where)
        _keys(r["saving"], SAVING_KEYS, f"runs[{i}].saving", where)
        for k, c in enumerate(_list(r["curve"], f"runs[{i}].curve", where)):
            _keys(c, CURVE_KEYS, f"runs[{i}].curve[{k}]", where)
        confs = _list(r["configurations"], f"runs[{i}].configurations", where)
        if len(confs) != len(s["configurations"]):
            raise CtpruneError(f"{where}: runs[{i}] has {len(confs)} configurations, not "
                               f"{len(s['configurations'])}; re-run `ctprune run` to rewrite it")
        for j, c in enumerate(confs):
            for side in SIDES:
                _keys(c, (side,), f"runs[{i}].configurations[{j}]", where)
                _keys(c[side], SIDE_KEYS, f"runs[{i}].configurations[{j}].{side}", where)
    if s.get("search") is not None:
        _keys(s["search"], SEARCH_KEYS, "search", where)
    for name in ("competitors", "random", "frontier"):
        if s.get(name) is not None:
            _list(s[name], name, where)
