"""`ctprune run`: the whole composability experiment as a graph of jobs (ctprune/jobs.py) handed
to an executor (ctprune/executors.py), resumable; then the protocol's arithmetic and the report.

RUN_DIR/
  origin/                 origin model (unless the experiment names one)
  conf.json, plan.json    configurations and plan (search.json with [search])
  banks/pruned            merely pruned variants (every variant any plan of this run asked for)
  banks/tuned-SCHED_FP    the same variants tuned with one tuning schedule (one per seed)
  finetune/{baseline,composed}/config-FP   one model folder per configuration, bank, seed and schedule
  latency.json            decoding latency of every configuration's architecture (interleaved repeats)
  jobs/                   one record per finished job (its result); a job with a record is skipped
  summary.json            every number of the report; report.md / report.html
The protocol (ctprune/protocol.py): each side finetunes until the target or the cap of E epochs,
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctprune import __version__
from ctprune.data.corpus import resolve_data_dir, test_splits
from ctprune.errors import CtpruneError
from ctprune.executors import Executor, cpu_threads, make_executor
from ctprune.experiment import Experiment, load_experiment
from ctprune.fileio import read_json, write_json
from ctprune.jobs import Job, check_configurations_early, missing_variants, origin_val_bleu
from ctprune.protocol import BankCost, Configuration, Cost, TimeToTarget, saving, saving_curve
from ctprune.pruning.configs import fingerprint, model_fingerprint, variant_ids, variant_key
from ctprune.spec import OriginSpec, TuningSpec, spec_default

SIDES = ("baseline", "composed")


def _say(msg: str) -> None:
    print(f"[ctprune run] {msg}", flush=True)


@dataclass(frozen=True)
class Run:
    """What every job of one run shares: the experiment, the run folder, the origin and the
    fingerprint of its weights (in every job's key, so a changed origin redoes everything),
    the data folder resolved here (workers elsewhere do not see this process's environment)."""

    exp: Experiment
    dir: Path
    origin: Path
    origin_fp: str
    data_dir: str | None

    def job(self, name: str, fn: str, kwargs: dict[str, Any], reads_origin: bool = True, **kw: Any) -> Job:
        """A job of this run: the origin's path among its arguments (unless it reads no model),
        the origin's fingerprint in its key."""
        context = fingerprint([self.origin_fp, kw.pop("context", "")])
        return Job(name, fn, {"origin": str(self.origin), **kwargs} if reads_origin else kwargs, context=context,
                   **kw)


def _data_dir(exp: Experiment) -> str | None:
    d = exp.data
    return None if d.corpus == "synthetic" else str(resolve_data_dir(d.data_dir).resolve())


def _origin(exp: Experiment, run_dir: Path, ex: Executor) -> Path:
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
    if (out / "train_summary.json").exists():
        _say(f"origin model: done ({out})")
        return out
    if exp.configurations is not None:  # bad configurations are refused before hours of training
        check_configurations_early(o.preset, o.arch, _configurations_table(exp), str(exp.path))
    kwargs = {"output": str(out), "preset": o.preset, "corpus": d.corpus, "data_dir": _data_dir(exp),
              "epochs": o.epochs, "seed": exp.seeds[0]}
    if o.arch != spec_default(OriginSpec, "arch"):  # the key of a ctprune origin's job stays what it was
        kwargs["arch"] = o.arch
    ex.run([Job("origin model", "train_origin_job", kwargs, gpu=True, output=str(out))])
    return out


def _tuned_name(exp: Experiment, seed: int) -> str:
    """The tuned bank of one schedule and seed (names made before patience was an option stay valid)."""
    t = exp.tuning
    schedule: dict[str, Any] = {"epochs": t.epochs, "lr": t.lr, "seed": seed}
    if t.patience != spec_default(TuningSpec, "patience"):
        schedule["patience"] = t.patience
    return f"tuned-{fingerprint(schedule)[:8]}"


def _bank_jobs(r: Run, plan_file: Path, plan: dict[str, Any], seed: int, shards: int
               ) -> tuple[list[Job], Path, Path, str | None, str | None]:
    """Jobs that prune and tune the variants of ``plan`` that the run's banks lack: one prune job
    (the pruned bank is shared by all seeds), ``shards`` tuning jobs and one merge for this seed.
    Returns (jobs, pruned bank, tuned bank, name of the pruned bank's job, of the tuned bank's)."""
    exp, d, t, banks = r.exp, r.exp.data, r.exp.tuning, r.dir / "banks"
    pruned = banks / "pruned"
    jobs: list[Job] = []
    prune_name = None
    missing = missing_variants(plan, pruned)
    if missing:
        prune_name = "prune"  # the seeds' graphs share it
        jobs.append(r.job(prune_name, "prune_job", {"bank": str(pruned), "plan": str(plan_file), "keys": missing,
                                                     "corpus": d.corpus, "data_dir": r.data_dir},
                          output=str(pruned)))
    tuned = banks / _tuned_name(exp, seed)
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


def _configurations(r: Run, ex: Executor) -> tuple[dict[str, Any], float]:
    """Write conf.json and plan.json: the experiment's configurations, or with [search] the
    configurations `ctprune search` picks from a pruned, tuned (first seed) and scored grid bank.
    Returns (the plan, scoring seconds)."""
    exp, d = r.exp, r.exp.data
    conf, plan_file = r.dir / "conf.json", r.dir / "plan.json"
    if exp.search is None:
        table = _configurations_table(exp)
        content = Path(table["file"]).read_bytes().hex() if table.get("file") else ""
        ex.run([r.job("configurations", "configurations_job",
                      {"conf_out": str(conf), "plan_out": str(plan_file), "configurations": table,
                       "where": str(exp.path)}, context=fingerprint(content), output=str(conf))])
        return read_json(plan_file, "plan"), 0.0
    spec = exp.search
    ex.run([r.job("grid plan", "grid_plan_job", {"plan_out": str(plan_file), "grid": list(spec.grid),
                                                  "kinds": list(spec.kinds)}, output=str(plan_file))])
    plan = read_json(plan_file, "plan")
    jobs, _, tuned, _, _ = _bank_jobs(r, plan_file, plan, exp.seeds[0], ex.spec.tuning_shards(ex.workers))
    ex.run(jobs)
    score = r.job("score", "score_job", {"bank": str(tuned), "corpus": d.corpus, "data_dir": r.data_dir,
                                         "bank_variants": sorted(read_json(tuned / "index.json")["variants"])},
                  gpu=True)
    scores = ex.run([score])["score"]
    # the same spec and scores give the same configurations: never re-solved
    key = fingerprint([dataclasses.asdict(spec), scores["subset"], scores["digests"]])
    ex.run([r.job("search", "search_job", {"bank": str(tuned), "conf_out": str(conf),
                                           "search": {**dataclasses.asdict(spec), "run_key": key},
                                           "corpus": d.corpus, "data_dir": r.data_dir}, output=str(conf))])
    return plan, scores["total_wall_time_s"]


def _seed_summary(exp: Experiment, run_dir: Path, plan: dict[str, Any], confs: list[dict[str, float]],
                  seed: int, pruned: Path, tuned: Path, sides: list[dict[str, dict[str, Any]]],
                  scoring_seconds: float) -> dict[str, Any]:
    """The protocol's numbers of one seed. With a search the whole grid bank is paid for (tuning
    and scoring) whatever the configurations use."""
    rows, protocol_rows = [], []
    for i, conf in enumerate(confs):
        rows.append({"index": i, **sides[i]})
        protocol_rows.append(Configuration(
            tuple(variant_key(n, r) for n, r in conf.items() if r < 1),
            *(TimeToTarget(sides[i][s]["epochs_to_target"], Cost(sides[i][s]["cost_seconds"],
                                                                   sides[i][s]["cost_flops"])) for s in SIDES)))
    tuning = read_json(tuned / "index.json")["tuning"]
    pruned_index = read_json(pruned / "index.json")
    bank = BankCost(prune_seconds=float(pruned_index.get("prune_seconds", 0.0)),
                    n_pruned=len(pruned_index["variants"]),
                    tuning_seconds=tuning["wall_time_s"], teacher_flops=tuning["teacher_flops"],
                    variant_flops=tuning["variant_flops"], scoring_seconds=scoring_seconds)
    whole = [variant_key(n, r) for n, r in variant_ids(plan)] if exp.search is not None else None
    return {"seed": seed, "tuned_bank": str(tuned.relative_to(run_dir)),
            "pruned_bank": str(pruned.relative_to(run_dir)),
            "tuning": {k: v for k, v in tuning.items() if k != "variant_flops"}, "configurations": rows,
            "saving": saving(protocol_rows, bank, whole).to_dict(),
            "curve": [c.to_dict() for c in saving_curve(protocol_rows, bank, whole)]}


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """One `ctprune run` at a time per run folder (two would write the same jobs' outputs)."""
    with open(run_dir / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CtpruneError(f"another `ctprune run` is using {run_dir}; wait for it or stop it") from None
        yield


def run_experiment(exp_path: Path, run_dir: Path | None = None, execution: dict[str, Any] | None = None) -> Path:
    """Run (or finish) the experiment of ``exp_path`` in ``run_dir``; ``execution`` overrides
    keys of its [execution] section (the CLI's --executor, --workers, --ray-address, --device).
    Returns the report path."""
    from ctprune.spec import ExecutionSpec, from_table

    exp = load_experiment(exp_path)
    table = {**{k: v for k, v in dataclasses.asdict(exp.execution).items() if v is not None}, **(execution or {})}
    spec = from_table(ExecutionSpec, table, "command line", "execution")
    run_dir = Path(run_dir or Path("runs") / Path(exp_path).stem).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    with _locked(run_dir):
        if not (run_dir / "experiment.toml").exists() or not (run_dir / "experiment.toml").samefile(exp_path):
            shutil.copyfile(exp_path, run_dir / "experiment.toml")
        with make_executor(spec, run_dir) as ex:
            report = _run(exp, exp_path, run_dir, ex, spec)
    return report


def _run(exp: Experiment, exp_path: Path, run_dir: Path, ex: Executor, spec: Any) -> Path:
    from ctprune.stages.report import write_report

    d, f = exp.data, exp.finetuning
    origin = _origin(exp, run_dir, ex)
    r = Run(exp, run_dir, origin, model_fingerprint(origin), _data_dir(exp))
    plan, scoring_seconds = _configurations(r, ex)
    conf_file, plan_file = run_dir / "conf.json", run_dir / "plan.json"
    confs = read_json(conf_file, "configuration file")
    val_bleu = origin_val_bleu(origin)
    tests = test_splits(d.corpus, r.data_dir)
    pruned_dir = run_dir / "banks" / "pruned"
    jobs: list[Job] = []
    per_seed = []
    for seed in exp.seeds:
        bank_jobs, pruned, tuned, prune_job, tuned_job = _bank_jobs(r, plan_file, plan, seed,
                                                                    ex.spec.tuning_shards(ex.workers))
        jobs += [j for j in bank_jobs if j.name not in {x.name for x in jobs}]
        per_seed.append((seed, pruned, tuned, prune_job, tuned_job))
    if val_bleu is None:  # a given origin without the record of its training
        job = r.job("origin val BLEU", "val_bleu_job", {"corpus": d.corpus, "data_dir": r.data_dir})
        val_bleu = ex.run([job])[job.name]["val_bleu"]
    target = exp.target_bleu(val_bleu)
    first_prune = per_seed[0][3]
    jobs.append(r.job("describe", "describe_job", {"pruned": str(pruned_dir), "configurations": confs,
                                                   "corpus": d.corpus, "data_dir": r.data_dir, "tests": tests},
                      deps=(first_prune,) if first_prune else ()))
    finetunes: dict[tuple[int, int, str], Job] = {}
    for seed, pruned, tuned, prune_job, tuned_job in per_seed:
        for i, conf in enumerate(confs):
            for side, bank, dep in zip(SIDES, (pruned, tuned), (prune_job, tuned_job)):
                key = {"configuration": conf, "bank": bank.name, "seed": seed,
                       "target_bleu": None if target is None else round(target, 2), "epochs": f.epochs,
                       "budget_epochs": f.budget_epochs, "lr": f.lr, "max_tokens": exp.max_tokens}
                out = run_dir / "finetune" / side / f"config-{fingerprint(key)}"
                job = r.job(f"finetune {side} {i} (seed {seed})", "finetune_job",
                            {"bank": str(bank), "conf_file": str(conf_file), "index": i, "output": str(out),
                             "seed": seed, "target": target, "epochs": f.epochs, "budget_epochs": f.budget_epochs,
                             "lr": f.lr, "max_tokens": exp.max_tokens, "bf16": exp.bf16, "corpus": d.corpus,
                             "data_dir": r.data_dir, "tests": tests},
                            deps=(dep,) if dep else (), gpu=True, output=str(out))
                finetunes[seed, i, side] = job
                jobs.append(job)
    results = ex.run(jobs)
    shapes = results["describe"]["configurations"]
    latency = r.job("latency", "latency_job", {
        "output": str(run_dir / "latency.json"), "bank": str(pruned_dir), "configurations": confs,
        "flops_ratios": [s["flops_ratio"] for s in shapes], "corpus": d.corpus, "data_dir": r.data_dir,
        "test": tests[0]}, exclusive=True, gpu=True, output=str(run_dir / "latency.json"))
    lat = ex.run([latency])["latency"]
    for shape, row in zip(shapes, lat["rows"]):
        shape["latency"] = row
    seeds = []
    for seed, pruned, tuned, _, _ in per_seed:
        sides = [{side: {**results[finetunes[seed, i, side].name],
                         "dir": str(Path(finetunes[seed, i, side].kwargs["output"]).relative_to(run_dir))}
                  for side in SIDES} for i in range(len(confs))]
        seeds.append(_seed_summary(exp, run_dir, plan, confs, seed, pruned, tuned, sides, scoring_seconds))
    described = results["describe"]
    flops = sum(c[s]["train_flops"] for x in seeds for c in x["configurations"] for s in SIDES)
    seconds = sum(c[s]["train_seconds"] for x in seeds for c in x["configurations"] for s in SIDES)
    summary = {
        "experiment": str(exp_path), "seeds": exp.seeds, "corpus": d.corpus,
        "target_bleu": None if target is None else round(target, 2),
        "search": None if exp.search is None else {
            **read_json(run_dir / "search.json"), "scoring_seconds": scoring_seconds},
        "protocol": {"target": f.target_bleu, "cap_epochs": f.epochs, "budget_epochs": f.budget_epochs,
                     "tuning_epochs": exp.tuning.epochs, "latency_repeats": lat["repeats"]},
        "execution": {**dataclasses.asdict(spec), "workers": ex.workers, "cores": ex.cores,
                      "tuning_shards": spec.tuning_shards(ex.workers)},
        "test_splits": tests,
        "origin": {"dir": str(origin), **described["origin"], "val_bleu": round(val_bleu, 2)},
        "bleu_signature": described["bleu_signature"], "chrf_signature": described["chrf_signature"],
        "configurations": shapes, "runs": seeds,
        "finetune_achieved_gflops": round(flops / max(seconds, 1e-9) / 1e9, 2),
        "versions": {"ctprune": __version__, "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": cpu_threads()},
    }
    _say("report: summary.json, report.md, report.html")
    write_json(run_dir / "summary.json", summary)
    report = write_report(run_dir)
    _say(f"done: {report} (and report.html)")
    return report
