"""The experiment file (TOML) of `ctprune run`: one section per spec dataclass (ctprune/spec.py),
validated on load.

    seed = 0   or   seeds = [0, 1, 2]   (tuning and finetuning randomness; one origin model)
    [data]           corpus = "synthetic" | "multi30k", data_dir = "..." (optional; relative to this file)
    [origin]         preset = "tiny" | "seed", arch = "ctprune" | "marian" | "t5", epochs = 8
                     (or model = "path/to/origin": ctprune's or a Hugging Face folder)
    [configurations] attention = [..], linear = [..], ffn = [..]   (one ratio per configuration)
                     or file = "conf.json", or inline = [{module = ratio, ...}, ...]
    [search]         (instead of [configurations]) grid = [0.25, 0.5, 0.75], kinds = ["attention", "ffn"],
                     flops = 0.6 and/or params = "10M", k = 8, min_distance = 2
    [tuning]         epochs = 2, lr = 1e-4, patience = 2
    [finetuning]     epochs = 3 (the cap E), lr = 1e-4, target_bleu = "origin-1" (or a number),
                     budget_epochs = 1 (the equal-budget comparison)
    [execution]      executor = "local" | "process" | "ray", workers = 2, address = "HOST:PORT",
                     device = "auto"
Unknown sections and keys, wrong types and values out of range are refused with the file,
section and key named. Every default is the spec's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctprune.errors import CtpruneError
from ctprune.fileio import read_toml
from ctprune.spec import (
    ConfigurationsSpec,
    DataSpec,
    ExecutionSpec,
    FinetuningSpec,
    OriginSpec,
    SearchSpec,
    TuningSpec,
    from_table,
    origin_preset,
    parse_target,
)
from ctprune.training.loop import preset_bf16, preset_max_tokens

SECTIONS: dict[str, type] = {"data": DataSpec, "origin": OriginSpec, "configurations": ConfigurationsSpec,
                             "search": SearchSpec, "tuning": TuningSpec, "finetuning": FinetuningSpec,
                             "execution": ExecutionSpec}


@dataclass(frozen=True)
class Experiment:
    path: Path
    seeds: list[int] = field(default_factory=lambda: [0])
    data: DataSpec = DataSpec()
    origin: OriginSpec = OriginSpec()
    configurations: ConfigurationsSpec | None = None
    search: SearchSpec | None = None
    tuning: TuningSpec = TuningSpec()
    finetuning: FinetuningSpec = FinetuningSpec()
    execution: ExecutionSpec = ExecutionSpec()

    @property
    def origin_model(self) -> Path | None:
        return None if self.origin.model is None else self.path.parent / self.origin.model

    @property
    def data_dir(self) -> Path | None:
        """[data] data_dir, relative to the experiment file like every path it names (None: the
        environment's or the download cache's folder)."""
        d = self.data.data_dir
        return None if d is None else self.path.parent / Path(d).expanduser()

    @property
    def conf_file(self) -> Path | None:
        c = self.configurations
        return None if c is None or c.file is None else self.path.parent / c.file

    @property
    def preset(self) -> str:
        """The origin's preset: the one a given origin model was trained with (its hparams.json
        says), else [origin] preset."""
        return origin_preset(self.origin_model, self.origin.preset)

    @property
    def max_tokens(self) -> int:
        """Token budget per batch of tuning and finetuning (the preset's)."""
        return preset_max_tokens(self.preset)

    @property
    def bf16(self) -> bool:
        """Training, tuning and finetuning precision (the preset's)."""
        return preset_bf16(self.preset)

    def target_bleu(self, origin_bleu: float) -> float | None:
        """An absolute BLEU, or "origin-X": the origin model's val BLEU minus X."""
        t = parse_target(self.finetuning.target_bleu, "finetuning.target_bleu")
        if t is None or isinstance(t, float):
            return t
        return origin_bleu - float(t.split("-", 1)[1])


def load_experiment(path: Path) -> Experiment:
    path = Path(path)
    raw = read_toml(path, "experiment file")  # bounded in size and depth
    allowed = {"seed", "seeds", *SECTIONS}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise CtpruneError(f"{path}: unknown section(s) {unknown}; allowed: {sorted(allowed)}")
    if "seed" in raw and "seeds" in raw:
        raise CtpruneError(f"{path}: give seed or seeds, not both")
    seeds = raw.get("seeds", [raw.get("seed", 0)])
    if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds) or \
            not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds):
        raise CtpruneError(f"{path}: seeds must be a non-empty list of distinct integers (each >= 0), got {seeds!r}")
    specs: dict[str, Any] = {name: from_table(cls, raw[name], str(path), name)
                             for name, cls in SECTIONS.items() if name in raw}
    if "search" in specs and "configurations" in specs:
        raise CtpruneError(f"{path}: give [configurations] or [search], not both")
    if "search" not in specs:
        specs.setdefault("configurations", ConfigurationsSpec()).check(str(path))
    return Experiment(path=path, seeds=seeds, **specs)


def resolve_configurations(modules: dict[str, Any], c: dict[str, Any], where: str) -> list[dict[str, float]]:
    """The configurations of a [configurations] section (as a dict) checked against ``modules``."""
    from ctprune.pruning.configs import default_configurations, load_configurations, validate_configurations

    if c.get("file") is not None:
        return load_configurations(Path(c["file"]), modules)
    if c.get("inline") is not None:
        return validate_configurations(list(c["inline"]), modules, f"{where} [configurations].inline")
    n = len(c["attention"] or c["linear"] or c["ffn"])
    return default_configurations(modules, n, c["attention"], c["linear"], c["ffn"],
                                  label=f"{where}: configurations.")


def check_configurations_early(preset: str, arch: str, c: dict[str, Any], where: str) -> None:
    """Refuse configurations that name no module of the preset's architecture before the origin
    model is trained (hours, at the seed size), on an untrained model of the same shape."""
    from types import SimpleNamespace

    from ctprune.arch import get
    from ctprune.model.transformer import PRESETS

    tok = SimpleNamespace(vocab_size=64, pad_id=0, bos_id=0, eos_id=3)  # the vocabulary changes no module name
    family = get(arch)
    resolve_configurations(family.units(family.from_scratch(PRESETS[preset], tok)), c, where)
