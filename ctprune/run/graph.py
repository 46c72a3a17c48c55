"""`ctprune run`: the whole composability experiment as a graph of jobs (ctprune/run/runtime.py;
their functions in ctprune/run/jobs.py) handed to an executor (ctprune/run/executors.py),
resumable; then the protocol's arithmetic and the report.

RUN_DIR/
  .ctprune-run            written first: `run -o` takes only a new or empty folder or one with this marker
  origin/                 origin model (unless the experiment names one); origin-data.json: the data
                          files it was trained on (size + SHA-256)
  conf.json, plan.json    configurations and plan (search.json with [search])
  banks/pruned-INPUTS     merely pruned variants (every variant any plan of this run asked for)
  banks/tuned-SCHED_FP    the same variants tuned with one tuning schedule (one per seed)
  finetune/{baseline,composed}/config-FP   one model folder per configuration, bank, seed and schedule
  scratch/config-FP       the `scratch` competitor of each budget (finetuning.scratch): the uniform cut's
                          shape trained from scratch for the budget's composed FLOPs (and the ceiling)
  latency.json            decoding latency of every configuration's architecture (interleaved repeats)
  jobs/                   one record per finished job (its result, SHA-256); a job with a record is skipped
  summary.json            every number of the report; report.md / report.html
Every job is keyed by the content of what it reads, not by paths: the origin's fingerprint (weights,
architecture, manifest, tokenizer) and the data files' sizes and SHA-256 are in every job's key and in
the names of the banks and finetunings (INPUTS, SCHED_FP, FP), so a changed origin or data folder
redoes every job that depends on it and never reuses a result of the old inputs.
The protocol (ctprune/run/protocol.py): each side finetunes until the target or the cap of E epochs,
and at least the equal-budget epochs (whose model is kept as epoch-K for the test BLEU).
The banks grow with the plan: after the configurations are edited only the variants no bank has
yet are pruned and tuned, and only configurations whose fingerprint changed are finetuned again.
Block tuning is split into one shard per worker, merged by one job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import platform
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctprune import __version__
from ctprune.data.corpus import DATA_DIR_ENV, corpus_languages, default_splits, resolve_data_dir, test_splits
from ctprune.errors import CtpruneError
from ctprune.fileio import check_output, file_record, read_json, sha256_file, write_bytes, write_json, write_text
from ctprune.pruning.bank import Bank, missing_variants
from ctprune.pruning.configs import fingerprint, model_fingerprint, variant_ids, variant_key
from ctprune.run.executors import Executor, cpu_threads, make_executor
from ctprune.run.experiment import Experiment, check_configurations_early, load_experiment
from ctprune.run.protocol import (
    BankCost,
    Configuration,
    Cost,
    TimeToTarget,
    flops_at,
    saving,
    saving_curve,
    scratch_flops,
    time_to_equal_quality,
)
from ctprune.run.runtime import RECORDS, Job, write_json_strict
from ctprune.run.summary import SIDES, Summary
from ctprune.spec import ExecutionSpec, FinetuningSpec, OriginSpec, SearchSpec, TuningSpec, check_option, spec_default

COMPETITORS = "competitors.json"  # with [search]: the uniform competitor of each budget, a configuration file
MARKER = ".ctprune-run"  # written first into a run folder; `run -o` refuses a non-empty folder without it
ORIGIN_DATA = "origin-data.json"  # the data files the run's own origin was trained on
# Files of an origin folder that change what it computes, beside config + weights (model_fingerprint):
# the manifest (tokenizer and hparams checksums), tokenizers, the generation config.
ORIGIN_FILES = ("manifest.json", "ctprune_layers.json", "generation_config.json", "tokenizer.model",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                "source.spm", "target.spm", "spiece.model")


def _say(msg: str) -> None:
    print(f"[ctprune run] {msg}", flush=True)


def origin_fingerprint(origin: Path) -> str:
    """The content of everything of an origin folder that the run's jobs read: architecture and
    weights (``model_fingerprint``), manifest, tokenizer and generation files."""
    files = {f: sha256_file(origin / f) for f in ORIGIN_FILES if (origin / f).is_file()}
    return fingerprint([model_fingerprint(origin), files])


def data_files(corpus: str, data_dir: Path | None) -> dict[str, Any]:
    """Size and SHA-256 of every data file a run reads (train, val and every test split; None for
    a file that is missing), or a hash of each split of the generated synthetic corpus."""
    langs = corpus_languages(corpus)
    if langs is None or data_dir is None:
        from ctprune.data.synthetic import SPLITS, synthetic_corpus

        return {f"synthetic:{s}": fingerprint(synthetic_corpus(s)) for s in SPLITS}
    train, val, _ = default_splits(corpus)
    out: dict[str, Any] = {}
    for split in dict.fromkeys([train, val, *test_splits(corpus, data_dir)]):
        for lang in langs:
            path = data_dir / f"{split}.{lang}"
            out[path.name] = file_record(path) if path.is_file() else None
    return out


@dataclass(frozen=True)
class Run:
    """What every job of one run shares: the experiment, the run folder, the origin, the data
    folder resolved here (workers elsewhere do not see this process's environment), and the
    fingerprints of their content (in every job's key and output name: a changed origin or data
    file redoes every job that depends on it)."""

    exp: Experiment
    dir: Path
    origin: Path
    origin_fp: str
    data_fp: str
    data_dir: str | None

    @property
    def inputs(self) -> str:
        """The fingerprint of the origin's and the data's content together."""
        return fingerprint([self.origin_fp, self.data_fp])

    @property
    def pruned(self) -> Path:
        return self.dir / "banks" / f"pruned-{self.inputs[:8]}"

    def job(self, name: str, fn: str, kwargs: dict[str, Any], reads_origin: bool = True, **kw: Any) -> Job:
        """A job of this run: the origin's path among its arguments (unless it reads no model),
        the origin's and the data's fingerprints in its key."""
        context = fingerprint([self.origin_fp, self.data_fp, kw.pop("context", "")])
        return Job(name, fn, {"origin": str(self.origin), **kwargs} if reads_origin else kwargs, context=context,
                   **kw)


def _data_dir(exp: Experiment) -> Path | None:
    """The data folder of a corpus read from files ([data] data_dir relative to the experiment
    file, else $CTPRUNE_DATA_DIR, else the download cache), refused when it does not exist."""
    if corpus_languages(exp.data.corpus) is None:
        return None
    folder = resolve_data_dir(exp.data_dir).resolve()
    if not folder.is_dir():
        raise CtpruneError(f"{exp.path}: data folder {folder} does not exist (data.data_dir, relative to the "
                           f"experiment file, else ${DATA_DIR_ENV}, else the download cache)")
    return folder


def _origin(exp: Experiment, run_dir: Path, ex: Executor, data_dir: Path | None, data: dict[str, Any]) -> Path:
    if exp.origin_model is not None:
        return exp.origin_model.resolve()
    out = run_dir / "origin"
    o, d = exp.origin, exp.data
    if (out / "hparams.json").exists():
        # Banks, finetunings and latencies of the run folder belong to this origin: refuse to
        # reuse it for another [origin] or [data] (the banks would be silently stale).
        hp = read_json(out / "hparams.json", "origin hparams")
        arch = hp.get("arch", spec_default(OriginSpec, "arch"))  # origins trained before arch was recorded
        was = (hp.get("preset"), arch, hp.get("corpus"), (hp.get("recipe") or {}).get("epochs"))
        if was != (o.preset, o.arch, d.corpus, o.epochs):
            raise CtpruneError(f"{run_dir} holds an origin model of preset {was[0]}, architecture {was[1]}, corpus "
                               f"{was[2]}, {was[3]} epochs, but {exp.path} asks for {o.preset}, {o.arch}, {d.corpus}, "
                               f"{o.epochs}; choose another -o for a new origin")
    stamp = run_dir / ORIGIN_DATA
    if stamp.is_file():
        was_data = read_json(stamp, "record of the origin's data")
        changed = sorted(k for k in set(was_data) | set(data) if was_data.get(k) != data.get(k)) \
            if isinstance(was_data, dict) else ["?"]
        if changed:
            shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            raise CtpruneError(f"{out} was trained on other data: {shown} changed since (size or SHA-256); "
                               "choose another -o for a new origin")
    elif out.exists():
        raise CtpruneError(f"{out} records no data it was trained on ({ORIGIN_DATA} is missing); "
                           "choose another -o for a new origin")
    if (out / "train_summary.json").exists():
        _say(f"origin model: done ({out})")
        return out
    if exp.configurations is not None:  # bad configurations are refused before hours of training
        check_configurations_early(o.preset, o.arch, _configurations_table(exp), str(exp.path))
    kwargs = {"output": str(out), "preset": o.preset, "corpus": d.corpus,
              "data_dir": None if data_dir is None else str(data_dir), "epochs": o.epochs, "seed": exp.seeds[0]}
    if o.arch != spec_default(OriginSpec, "arch"):  # the key of a ctprune origin's job stays what it was
        kwargs["arch"] = o.arch
    write_json(stamp, data)
    ex.run([Job("origin model", "train_origin_job", kwargs, gpu=True, output=str(out), context=fingerprint(data))])
    return out


def _tuned_name(r: Run, seed: int) -> str:
    """The tuned bank of one schedule and seed, for the run's origin and data."""
    t = r.exp.tuning
    schedule: dict[str, Any] = {"epochs": t.epochs, "lr": t.lr, "seed": seed, "inputs": r.inputs}
    if t.patience != spec_default(TuningSpec, "patience"):
        schedule["patience"] = t.patience
    return f"tuned-{fingerprint(schedule)[:8]}"


def _bank_jobs(r: Run, plan_file: Path, plan: dict[str, Any], seed: int, shards: int
               ) -> tuple[list[Job], Path, Path, str | None, str | None]:
    """Jobs that prune and tune the variants of ``plan`` that the run's banks lack: one prune job
    (the pruned bank is shared by all seeds), ``shards`` tuning jobs and one merge for this seed.
    Returns (jobs, pruned bank, tuned bank, name of the pruned bank's job, of the tuned bank's)."""
    exp, d, t, banks = r.exp, r.exp.data, r.exp.tuning, r.dir / "banks"
    pruned = r.pruned
    jobs: list[Job] = []
    prune_name = None
    missing = missing_variants(plan, pruned)
    if missing:
        prune_name = "prune"  # the seeds' graphs share it
        jobs.append(r.job(prune_name, "prune_job", {"bank": str(pruned), "plan": str(plan_file), "keys": missing,
                                                     "corpus": d.corpus, "data_dir": r.data_dir},
                          output=str(pruned)))
    tuned = banks / _tuned_name(r, seed)
    missing = missing_variants(plan, tuned)
    if not missing:
        return jobs, pruned, tuned, prune_name, None
    parts = [missing[i::shards] for i in range(min(shards, len(missing)))]
    shard_jobs = []
    for i, keys in enumerate(parts):
        shard = banks / f".tuning-{fingerprint([tuned.name, keys])[:8]}"
        shard_jobs.append(r.job(
            f"tune-blocks seed {seed} shard {i + 1}/{len(parts)}", "tune_job",
            {"pruned": str(pruned), "output": str(shard), "keys": keys, "epochs": t.epochs, "lr": t.lr,
             "patience": t.patience, "seed": seed, "max_tokens": exp.max_tokens, "bf16": exp.bf16,
             "corpus": d.corpus, "data_dir": r.data_dir},
            deps=(prune_name,) if prune_name else (), gpu=True, output=str(shard)))
    merge = r.job(f"merge tuned bank seed {seed}", "merge_job",
                  {"shards": [[j.kwargs["output"], j.kwargs["keys"]] for j in shard_jobs], "bank": str(tuned)},
                  reads_origin=False, deps=tuple(j.name for j in shard_jobs), output=str(tuned))
    return [*jobs, *shard_jobs, merge], pruned, tuned, prune_name, merge.name


def _configurations_table(exp: Experiment) -> dict[str, Any]:
    """[configurations] as the jobs take it (a file path relative to the experiment file resolved)."""
    c = dataclasses.asdict(exp.configurations) if exp.configurations else {}
    if exp.conf_file is not None:
        c["file"] = str(exp.conf_file.resolve())
    return c


def _configurations(r: Run, ex: Executor) -> dict[str, Any]:
    """Write conf.json and plan.json of the experiment's configurations; returns the plan."""
    conf, plan_file = r.dir / "conf.json", r.dir / "plan.json"
    table = _configurations_table(r.exp)
    content = Path(table["file"]).read_bytes().hex() if table.get("file") else ""
    ex.run([r.job("configurations", "configurations_job",
                  {"conf_out": str(conf), "plan_out": str(plan_file), "configurations": table,
                   "where": str(r.exp.path)}, context=fingerprint(content), output=str(conf))])
    return read_json(plan_file, "plan")


def _grid_plan(r: Run, ex: Executor, spec: SearchSpec) -> dict[str, Any]:
    """[search]: plan.json of the grid bank, refused (before anything is pruned) when the grid has
    no module slot or fewer slots than ``min_distance``."""
    plan_file = r.dir / "plan.json"
    ex.run([r.job("grid plan", "grid_plan_job", {"plan_out": str(plan_file), "grid": list(spec.grid),
                                                  "kinds": list(spec.kinds)}, output=str(plan_file))])
    plan = read_json(plan_file, "plan")
    slots = len(plan["modules"])
    if not slots:
        raise CtpruneError(f"{r.exp.path}: search.grid {list(spec.grid)} and search.kinds {list(spec.kinds)} give "
                           "no variant (the origin has no module of these kinds, or no keep ratio is below 1)")
    if spec.min_distance > slots:
        raise CtpruneError(f"{r.exp.path}: search.min_distance must be in [1, {slots}] (the grid bank's module "
                           f"slots of kinds {', '.join(spec.kinds)}), got {spec.min_distance}")
    return plan


def _search(r: Run, ex: Executor, spec: SearchSpec, plan: dict[str, Any]) -> float:
    """conf.json: the configurations `ctprune search` picks from the grid bank, pruned, tuned
    (first seed) and scored. Returns the scoring seconds."""
    exp, d = r.exp, r.exp.data
    jobs, _, tuned, _, _ = _bank_jobs(r, r.dir / "plan.json", plan, exp.seeds[0], ex.spec.tuning_shards(ex.workers))
    ex.run(jobs)
    kwargs = {"bank": str(tuned), "corpus": d.corpus, "data_dir": r.data_dir,
              "bank_variants": sorted(Bank.open(tuned).variants)}
    if spec.latency is not None:  # a latency budget needs the variants' measured latency
        kwargs["latency"] = True
    score = r.job("score", "score_job", kwargs, gpu=True, exclusive=spec.latency is not None)
    scores = ex.run([score])["score"]
    # the same spec and scores give the same configurations: never re-solved
    key = fingerprint([_search_table(spec), scores["subset"], scores["digests"]])
    ex.run([r.job("search", "search_job", {"bank": str(tuned), "conf_out": str(r.dir / "conf.json"),
                                           "search": {**_search_table(spec), "run_key": key},
                                           "corpus": d.corpus, "data_dir": r.data_dir},
                  output=str(r.dir / "conf.json"))])
    return float(scores["total_wall_time_s"])


def _search_table(spec: SearchSpec) -> dict[str, Any]:
    """[search] as the search job takes it; ``refine`` only when on, so that the searches of runs
    made before it existed keep their keys (a re-solve could change their configurations)."""
    table = dataclasses.asdict(spec)
    if table["refine"] == spec_default(SearchSpec, "refine"):
        del table["refine"]
    return table


def _target(r: Run, ex: Executor) -> tuple[float, float | None]:
    """(the origin's val BLEU on the experiment's own val split, the finetuning target), the
    target refused before any pruning when it falls below 0."""
    job = r.job("origin val BLEU", "val_bleu_job", {"corpus": r.exp.data.corpus, "data_dir": r.data_dir})
    val_bleu = float(ex.run([job])[job.name]["val_bleu"])
    target = r.exp.target_bleu(val_bleu)
    if target is not None and target < 0:
        raise CtpruneError(f"{r.exp.path}: finetuning.target_bleu = {r.exp.finetuning.target_bleu!r} is "
                           f"{target:.2f} BLEU, below 0 (the origin's val BLEU here is {val_bleu:.2f}); give "
                           f"\"origin-X\" with X <= {val_bleu:.2f}, a BLEU in [0, 100], or \"none\"")
    return val_bleu, target


def _competitors(run_dir: Path) -> list[dict[str, Any]]:
    """[search]: per budget point, the uniform competitor of search.json (every module of the grid's
    kinds at one keep ratio, or the nearest pair, meeting that budget), written as the configuration
    file competitors.json (finetuned from both banks like the searched ones). Returns
    ``[{method, budget, ratios, configuration}]`` in that file's order (none for an older search.json)."""
    sweep = read_json(run_dir / "search.json", "search report").get("sweep", [])
    found = [{"method": "uniform", "budget": i, "ratios": p["uniform"]["ratios"],
              "configuration": p["uniform"]["configuration"]} for i, p in enumerate(sweep) if p.get("uniform")]
    if found:
        write_json(run_dir / COMPETITORS, [c["configuration"] for c in found])
    return found


def _random(r: Run, ex: Executor, spec: SearchSpec, points: int, tests: list[str]) -> list[dict[str, Any]]:
    """[finetuning] random: per budget point of ``spec``, one job draws that many random configurations
    meeting it (seeded by the first seed) and measures them composed from the first seed's tuned bank
    (the scored one) before any finetuning. Returns ``[{method, budget, asked, configuration, val_bleu,
    ...}]``; a budget under which fewer were found is said at once (and in the report)."""
    exp = r.exp
    bank = r.dir / "banks" / _tuned_name(r, exp.seeds[0])
    jobs = [r.job(f"random budget {b}", "random_job",
                  {"bank": str(bank), "search": dict(spec.budgets), "point": b, "n": exp.finetuning.random,
                   "seed": exp.seeds[0], "corpus": exp.data.corpus, "data_dir": r.data_dir, "tests": tests}, gpu=True)
            for b in range(points)]
    results = ex.run(jobs)
    for b, job in enumerate(jobs):
        if len(results[job.name]["rows"]) < exp.finetuning.random:
            _say(f"note: budget {b}: only {len(results[job.name]['rows'])} of finetuning.random = "
                 f"{exp.finetuning.random} random configurations meet it (drawn by rejection)")
    return [{"method": "random", "budget": b, "asked": exp.finetuning.random, **row}
            for b, job in enumerate(jobs) for row in results[job.name]["rows"]]


def finetune_folder(parent: Path, key: dict[str, Any]) -> Path:
    """The folder of one finetuning: ``config-`` and the fingerprint of its settings ``key``, the cap
    (``epochs``) among them. A folder made under a lower cap with otherwise the same settings is the
    same run (the finetune recipe's lr is constant): it is taken, and its finetuning continued if it
    ended censored (``jobs.finetune_job``), so raising the cap of a run redoes nothing."""
    for cap in range(int(key["epochs"]), 0, -1):  # the highest cap first
        folder = parent / f"config-{fingerprint({**key, 'epochs': cap})}"
        if folder.is_dir():
            return folder
    return parent / f"config-{fingerprint(key)}"


def _scratch(r: Run, ex: Executor, comps: list[dict[str, Any]], composed: dict[int, list[Path]],
             banks: dict[int, BankCost], tests: list[str]) -> dict[int, list[dict[str, Any]]]:
    """[finetuning] scratch: per seed and budget, the uniform competitor's shape trained from scratch for
    ``scratch_flops`` (the seed's whole tuned bank + the budget's uniform composed finetuning to the
    equal budget, ``composed[seed][j]`` its folder), and with scratch_ceiling for the origin's epochs
    (first seed). Returns per seed ``[{method, budget, dir, ...the job's result}]``."""
    from ctprune.training.history import read_history

    f = r.exp.finetuning
    jobs: dict[int, list[tuple[dict[str, Any], Job]]] = {}
    by_output: dict[str, Job] = {}
    for seed, folders in composed.items():
        for c, folder in zip(comps, folders):
            budget = scratch_flops(banks[seed], flops_at(read_history(folder / "history.csv"), f.budget_epochs))
            kinds = [("scratch", budget)] + ([("scratch ceiling", None)] if f.scratch_ceiling and
                                             seed == r.exp.seeds[0] else [])
            for method, max_flops in kinds:
                key = {"configuration": c["configuration"], "seed": seed, "max_flops": max_flops, "select": f.select,
                       "inputs": r.inputs}
                out = r.dir / "scratch" / f"config-{fingerprint(key)}"
                job = by_output.setdefault(str(out), r.job(  # two budgets' equal shapes train once
                    f"{method} budget {c['budget']} (seed {seed})", "scratch_job",
                    {"pruned": str(r.pruned), "configuration": c["configuration"], "output": str(out),
                     "max_flops": max_flops, "seed": seed, "select": f.select, "corpus": r.exp.data.corpus,
                     "data_dir": r.data_dir, "tests": tests}, gpu=True, output=str(out)))
                jobs.setdefault(seed, []).append(({"method": method, "budget": c["budget"]}, job))
    results = ex.run(list(by_output.values()))
    return {seed: [{**row, **results[j.name], "dir": str(Path(j.kwargs["output"]).relative_to(r.dir))}
                   for row, j in rows] for seed, rows in jobs.items()}


def _bank_cost(pruned: Path, tuned: Path, scoring_seconds: float) -> BankCost:
    """What the run's banks cost, from their indexes."""
    tuning, pruned_bank = Bank.open(tuned).tuning, Bank.open(pruned)
    return BankCost(prune_seconds=pruned_bank.prune_seconds, n_pruned=len(pruned_bank.variants),
                    tuning_seconds=tuning["wall_time_s"], teacher_flops=tuning["teacher_flops"],
                    variant_flops=tuning["variant_flops"], scoring_seconds=scoring_seconds)


def _protocol_row(conf: dict[str, float], sides: dict[str, dict[str, Any]]) -> Configuration:
    return Configuration(tuple(variant_key(n, r) for n, r in conf.items() if r < 1),
                         *(TimeToTarget(sides[s]["epochs_to_target"], Cost(sides[s]["cost_seconds"],
                                                                            sides[s]["cost_flops"])) for s in SIDES))


def _equal_quality(run_dir: Path, sides: dict[str, dict[str, Any]], cap: int) -> dict[str, Any]:
    """``sides``, with the time to equal quality when both sides missed the target within the cap."""
    from ctprune.training.history import read_history

    if any(sides[s]["epochs_to_target"] is not None for s in SIDES):
        return sides
    baseline, composed = (read_history(run_dir / sides[s]["dir"] / "history.csv") for s in SIDES)
    return {**sides, "equal_quality": time_to_equal_quality(baseline, composed, cap).to_dict()}


def _seed_summary(exp: Experiment, run_dir: Path, plan: dict[str, Any], confs: list[dict[str, float]],
                  seed: int, pruned: Path, tuned: Path, sides: list[dict[str, dict[str, Any]]],
                  scoring_seconds: float, budgets: list[int | None] | None = None,
                  competitors: Sequence[tuple[dict[str, Any], dict[str, dict[str, Any]]]] = ()) -> dict[str, Any]:
    """The protocol's numbers of one seed. With a search the whole grid bank is paid for (tuning
    and scoring) whatever the configurations use, by all budgets together and by each budget alone.
    ``budgets``: each configuration's budget point; ``competitors``: (competitor, its sides)."""
    rows = [{"index": i, **_equal_quality(run_dir, sides[i], exp.finetuning.epochs)} for i in range(len(confs))]
    protocol_rows = [_protocol_row(conf, sides[i]) for i, conf in enumerate(confs)]
    tuning = Bank.open(tuned).tuning
    bank = _bank_cost(pruned, tuned, scoring_seconds)
    whole = [variant_key(n, r) for n, r in variant_ids(plan)] if exp.search is not None else None
    out = {"seed": seed, "tuned_bank": str(tuned.relative_to(run_dir)),
           "pruned_bank": str(pruned.relative_to(run_dir)),
           "tuning": {k: v for k, v in tuning.items() if k != "variant_flops"}, "configurations": rows,
           "saving": saving(protocol_rows, bank, whole).to_dict(),
           "curve": [c.to_dict() for c in saving_curve(protocol_rows, bank, whole)]}
    if budgets is not None and len(set(budgets)) > 1:
        out["budgets"] = [{"budget": b, "saving": saving([c for c, x in zip(protocol_rows, budgets) if x == b],
                                                          bank, whole).to_dict()}
                          for b in sorted(set(budgets), key=int)]
    if competitors:
        out["competitors"] = [{"method": c["method"], "budget": c["budget"],
                               **_equal_quality(run_dir, s, exp.finetuning.epochs)} for c, s in competitors]
    return out


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """One `ctprune run` at a time per run folder (two would write the same jobs' outputs)."""
    with open(run_dir / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CtpruneError(f"another `ctprune run` is using {run_dir}; wait for it or stop it") from None
        yield


def _execution(exp: Experiment, given: dict[str, Any]) -> ExecutionSpec:
    """The experiment's [execution] (checked on load, naming its keys) with the command line's
    overrides, each checked by the spec's rules naming its flag."""
    from ctprune.spec import RUN_EXECUTION_FLAGS

    flags = dict(RUN_EXECUTION_FLAGS)
    for name, value in given.items():
        check_option(ExecutionSpec, name, value, flags.get(name, f"--{name}"))
    try:
        return dataclasses.replace(exp.execution, **given)
    except CtpruneError as e:  # a rule between fields, broken by the flags
        raise CtpruneError(f"command line: {e}") from None


def _check_run_dir(run_dir: Path) -> None:
    """`run -o` takes a new or empty folder, or a run folder (one holding the marker): a user's
    folder, the working directory or an old run folder is refused before anything is written."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise CtpruneError(f"-o {run_dir} is a file; give a new or empty folder, or a run folder to resume")
    if (run_dir / MARKER).is_file() or not any(run_dir.iterdir()):
        return
    if (run_dir / "experiment.toml").is_file() and (run_dir / RECORDS).is_dir():
        raise CtpruneError(f"{run_dir} is a run folder of an older ctprune (no {MARKER}), whose results are not "
                           "keyed by the content of their inputs and cannot be checked; move or remove it, or "
                           "run again into a new -o")
    raise CtpruneError(f"{run_dir} is not empty and is not a run folder of `ctprune run` (no {MARKER}); give a "
                       "new or empty folder as -o")


def _claim(run_dir: Path) -> tuple[bool, Path | None]:
    """Make ``run_dir`` a run folder, its marker written first. Returns (whether it was new or
    empty, so that a refused run removes what it wrote; the topmost folder made here)."""
    if (run_dir / MARKER).is_file():
        return False, None
    top = run_dir
    while not top.parent.exists():
        top = top.parent
    made = None if run_dir.exists() else top
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / MARKER, "a folder of `ctprune run`: `run -o` takes only a new or empty folder or one "
                                 "with this file\n")
    return True, made


def _discard(run_dir: Path, made: Path | None) -> None:
    """Remove what a refused run wrote into a folder that was new (``made``: the topmost folder
    made for it) or empty, unless it holds work worth resuming: a trained origin, a bank or a
    finetuning."""
    if any((run_dir / d).exists() for d in ("origin", "banks", "finetune")):
        return
    if made is not None:  # the run folder, then each parent made for it while it stays empty
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in run_dir.parents:
            if not parent.is_relative_to(made):
                break
            try:
                parent.rmdir()
            except OSError:  # not empty: another run started there meanwhile
                break
        return
    for p in run_dir.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def run_experiment(exp_path: Path, run_dir: Path | None = None, execution: dict[str, Any] | None = None) -> Path:
    """Run (or finish) the experiment of ``exp_path`` in ``run_dir``; ``execution`` overrides
    keys of its [execution] section (the CLI's --executor, --workers, --ray-address, --device).
    Every input is checked before anything is written; a run refused before it trained, pruned or
    finetuned anything leaves nothing behind. Returns the report path."""
    exp = load_experiment(exp_path)
    if exp.search is None and (exp.finetuning.random or exp.finetuning.scratch):
        raise CtpruneError(f"{exp.path}: finetuning.random and finetuning.scratch are competitors at the budgets of "
                           "a sweep: they need [search]")
    spec = _execution(exp, execution or {})
    run_dir = Path(run_dir or Path("runs") / Path(exp_path).stem).resolve()
    data_dir = _data_dir(exp)
    origin = exp.origin_model.resolve() if exp.origin_model is not None else None
    if origin is not None and not origin.is_dir():
        raise CtpruneError(f"{exp.path}: origin.model {origin} is not a folder (relative to the experiment file)")
    check_output(run_dir, {"origin model folder": origin, "data folder": data_dir})
    _check_run_dir(run_dir)
    data = data_files(exp.data.corpus, data_dir)
    origin_fp = origin_fingerprint(origin) if origin is not None else None  # a bad model folder: refused here
    fresh, made = _claim(run_dir)
    with _locked(run_dir):
        try:
            copy = run_dir / "experiment.toml"
            if not copy.exists() or not copy.samefile(exp_path):
                write_bytes(copy, Path(exp_path).read_bytes())  # replaces a symlink, never writes through it
            with make_executor(spec, run_dir) as ex:
                return _run(exp, Path(exp_path), run_dir, ex, spec, data_dir, data, origin_fp)
        except CtpruneError:
            if fresh:
                _discard(run_dir, made)
            raise


def _run(exp: Experiment, exp_path: Path, run_dir: Path, ex: Executor, spec: ExecutionSpec, data_dir: Path | None,
         data: dict[str, Any], origin_fp: str | None) -> Path:
    from ctprune.run.report import frontier, write_report

    d, f = exp.data, exp.finetuning
    origin = _origin(exp, run_dir, ex, data_dir, data)
    r = Run(exp, run_dir, origin, origin_fp or origin_fingerprint(origin), fingerprint(data),
            None if data_dir is None else str(data_dir))
    if exp.search is None:
        plan, scoring_seconds = _configurations(r, ex), 0.0
        val_bleu, target = _target(r, ex)
    else:
        plan = _grid_plan(r, ex, exp.search)
        val_bleu, target = _target(r, ex)
        scoring_seconds = _search(r, ex, exp.search, plan)
    conf_file, plan_file = run_dir / "conf.json", run_dir / "plan.json"
    confs = read_json(conf_file, "configuration file")
    budgets: list[int | None] = [None] * len(confs)
    comps: list[dict[str, Any]] = []
    randoms: list[dict[str, Any]] = []
    tests = test_splits(d.corpus, r.data_dir)
    if exp.search is not None:
        found = read_json(run_dir / "search.json")
        budgets = [int(row.get("budget", 0)) for row in found["configurations"]]
        comps = _competitors(run_dir)
        if f.random:
            points = len(found.get("sweep", [None]))
            randoms = _random(r, ex, exp.search, points, tests)
    # What is finetuned: (job label, configuration file, index, configuration); searched (or given)
    # configurations first, then the competitors.
    items = [(str(i), conf_file, i, c) for i, c in enumerate(confs)]
    items += [(f"{c['method']} budget {c['budget']}", run_dir / COMPETITORS, j, c["configuration"])
              for j, c in enumerate(comps)]
    every = [c for _, _, _, c in items] + [x["configuration"] for x in randoms]  # described and timed
    pruned_dir = r.pruned
    jobs: list[Job] = []
    per_seed = []
    for seed in exp.seeds:
        bank_jobs, pruned, tuned, prune_job, tuned_job = _bank_jobs(r, plan_file, plan, seed,
                                                                    ex.spec.tuning_shards(ex.workers))
        jobs += [j for j in bank_jobs if j.name not in {x.name for x in jobs}]
        per_seed.append((seed, pruned, tuned, prune_job, tuned_job))
    first_prune = per_seed[0][3]
    jobs.append(r.job("describe", "describe_job", {"pruned": str(pruned_dir), "configurations": every,
                                                   "corpus": d.corpus, "data_dir": r.data_dir, "tests": tests},
                      deps=(first_prune,) if first_prune else ()))
    finetunes: dict[tuple[int, int, str], Job] = {}
    # eval_every and select only where not the default: the keys of earlier runs' finetunings stay
    protocol = {k: getattr(f, k) for k in ("eval_every", "select") if getattr(f, k) != spec_default(FinetuningSpec, k)}
    by_output: dict[str, Job] = {}  # a competitor equal to a searched configuration is finetuned once
    for seed, pruned, tuned, prune_job, tuned_job in per_seed:
        for i, (label, file, index, conf) in enumerate(items):
            for side, bank, dep in zip(SIDES, (pruned, tuned), (prune_job, tuned_job)):
                key = {"configuration": conf, "bank": bank.name, "seed": seed,
                       "target_bleu": None if target is None else round(target, 2), "epochs": f.epochs,
                       "budget_epochs": f.budget_epochs, "lr": f.lr, "max_tokens": exp.max_tokens,
                       "inputs": r.inputs, **protocol}
                out = finetune_folder(run_dir / "finetune" / side, key)
                if str(out) in by_output:
                    finetunes[seed, i, side] = by_output[str(out)]
                    continue
                job = r.job(f"finetune {side} {label} (seed {seed})", "finetune_job",
                            {"bank": str(bank), "conf_file": str(file), "index": index, "output": str(out),
                             "seed": seed, "target": target, "epochs": f.epochs, "budget_epochs": f.budget_epochs,
                             "lr": f.lr, "max_tokens": exp.max_tokens, "bf16": exp.bf16, "corpus": d.corpus,
                             "data_dir": r.data_dir, "tests": tests, **protocol},
                            deps=(dep,) if dep else (), gpu=True, output=str(out))
                finetunes[seed, i, side] = by_output[str(out)] = job
                jobs.append(job)
    results = ex.run(jobs)
    shapes = results["describe"]["configurations"]
    latency = r.job("latency", "latency_job", {
        "output": str(run_dir / "latency.json"), "bank": str(pruned_dir), "configurations": every,
        "flops_ratios": [s["flops_ratio"] for s in shapes], "corpus": d.corpus, "data_dir": r.data_dir,
        "test": tests[0]}, exclusive=True, gpu=True, output=str(run_dir / "latency.json"))
    lat = ex.run([latency])["latency"]
    for shape, row in zip(shapes, lat["rows"]):
        shape["latency"] = row
    for shape, b in zip(shapes, budgets):
        if b is not None:
            shape["budget"] = b
    competitors = [{**{k: v for k, v in c.items() if k != "configuration"}, **shape}
                   for c, shape in zip(comps, shapes[len(confs):len(items)])]
    randoms = [{**x, **shape} for x, shape in zip(randoms, shapes[len(items):])]
    shapes = shapes[:len(confs)]
    scratch: dict[int, list[dict[str, Any]]] = {}
    if f.scratch and comps:
        composed = {seed: [Path(finetunes[seed, i, "composed"].kwargs["output"]) for i in range(len(confs), len(items))]
                    for seed, *_ in per_seed}
        banks = {seed: _bank_cost(pruned, tuned, scoring_seconds) for seed, pruned, tuned, _, _ in per_seed}
        scratch = _scratch(r, ex, comps, composed, banks, tests)
    seeds = []
    for seed, pruned, tuned, _, _ in per_seed:
        sides = [{side: {**results[finetunes[seed, i, side].name],
                         "dir": str(Path(finetunes[seed, i, side].kwargs["output"]).relative_to(run_dir))}
                  for side in SIDES} for i in range(len(items))]
        seeds.append(_seed_summary(exp, run_dir, plan, confs, seed, pruned, tuned, sides[:len(confs)],
                                   scoring_seconds, budgets, list(zip(comps, sides[len(confs):]))))
        if seed in scratch:
            seeds[-1]["scratch"] = scratch[seed]
    described = results["describe"]
    trained = [c for x in seeds for c in x["configurations"] + x.get("competitors", [])]
    # each finetuning once: a uniform cut equal to a searched configuration shares its folder
    distinct = {c[s]["dir"]: c[s] for c in trained for s in SIDES}.values()
    flops = sum(c["train_flops"] for c in distinct)
    seconds = sum(c["train_seconds"] for c in distinct)
    summary = Summary(
        experiment=str(exp_path), seeds=exp.seeds, corpus=d.corpus,
        target_bleu=None if target is None else round(target, 2),
        search=None if exp.search is None else {**read_json(run_dir / "search.json"),
                                                "scoring_seconds": scoring_seconds},
        protocol={"target": f.target_bleu, "cap_epochs": f.epochs, "budget_epochs": f.budget_epochs,
                  "eval_every": f.eval_every, "select": f.select, "random": f.random, "scratch": f.scratch,
                  "scratch_ceiling": f.scratch_ceiling,
                  "tuning_epochs": exp.tuning.epochs, "latency_repeats": lat["repeats"]},
        execution={**dataclasses.asdict(spec), "workers": ex.workers, "cores": ex.cores,
                   "tuning_shards": spec.tuning_shards(ex.workers)},
        test_splits=tests,
        origin={"dir": str(origin), **described["origin"], "val_bleu": round(val_bleu, 2)},
        inputs={"origin_fingerprint": r.origin_fp, "data_fingerprint": r.data_fp, "data_files": data},
        bleu_signature=described["bleu_signature"], chrf_signature=described["chrf_signature"],
        configurations=shapes, competitors=competitors or None,
        random=randoms if f.random and exp.search is not None else None, runs=seeds,
        finetune_achieved_gflops=round(flops / max(seconds, 1e-9) / 1e9, 2),
        versions={"ctprune": __version__, "python": platform.python_version()},
        machine={"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                 "threads": cpu_threads()},
    )
    if exp.search is not None:
        summary = dataclasses.replace(summary, frontier=[dataclasses.asdict(row) for row in frontier(summary)])
    _say("report: summary.json, report.md, report.html")
    write_json_strict(run_dir / "summary.json", summary.to_json(), "run summary")
    report = write_report(run_dir)
    _say(f"done: {report} (and report.html)")
    return report
