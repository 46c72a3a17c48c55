"""Jobs and executors: scheduling (dependencies, exclusive jobs, failures, dead workers), sharded
tuning, and `ctprune run` giving the same numbers on every executor."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from ctprune.errors import CtpruneError
from ctprune.pruning.bank import Bank
from ctprune.run.executors import RETRY, Executor, LocalExecutor, ProcessExecutor, make_executor
from ctprune.run.runtime import FAULT_ENV, Job
from ctprune.spec import ExecutionSpec
from ctprune.stages.prune import PruneArgs, prune
from ctprune.stages.tune_blocks import TuneArgs, tune_blocks

from .test_run import EXPERIMENT, _numbers
from .test_tuning import CONFS

HERE = "tests.test_executors"


def stamp(log: str, name: str, seconds: float = 0.0, meet: str | None = None, device: str = "cpu"
          ) -> dict[str, float]:
    """A job for the scheduling tests: appends its start and end times to ``log``; with ``meet``
    it first waits (up to a minute) until the job of that name has started too."""
    t0 = time.time()
    Path(f"{log}.{name}.started").touch()
    deadline = t0 + 60
    while meet and not Path(f"{log}.{meet}.started").exists():
        if time.time() > deadline:
            raise CtpruneError(f"{name} never met {meet}")
        time.sleep(0.05)
    time.sleep(seconds)
    with open(log, "a") as f:
        f.write(json.dumps({"name": name, "start": t0, "end": time.time()}) + "\n")
    return {"t": t0}


def refuse(device: str = "cpu") -> None:
    raise CtpruneError("bad input: the one-line error")


def test_job_keys_are_those_of_the_code_before_the_run_package() -> None:
    # Guards resumability of existing run folders: a job's record is found by its key, so a changed
    # key reruns every finished job. These are the keys computed on ctprune/jobs.py before it moved
    # into ctprune/run/ (issue 23); bare function names still resolve to the jobs module.
    assert Job("x", "finetune_job", {"a": 1}, context="c").key == "058d3bd7e0e8"
    assert Job("origin model", "train_origin_job", {"output": "o", "epochs": 2}, context="d").key == "4a4106df3bde"
    import ctprune.run.jobs as jobs

    assert callable(jobs.finetune_job) and callable(jobs.train_origin_job)


def _job(name: str, log: Path, seconds: float = 0.0, deps: tuple[str, ...] = (), exclusive: bool = False,
         meet: str | None = None) -> Job:
    return Job(name, f"{HERE}:stamp", {"log": str(log), "name": name, "seconds": seconds, "meet": meet},
               deps=deps, exclusive=exclusive)


def _spans(log: Path) -> dict[str, tuple[float, float]]:
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return {r["name"]: (r["start"], r["end"]) for r in rows}


@pytest.mark.parametrize("executor", ["local", "process"])
def test_dependencies_exclusive_jobs_and_records(executor: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    two = executor == "process"  # two workers: a and b run at once (each waits for the other)
    jobs = [_job("a", log, 0.3, meet="b" if two else None), _job("b", log, 0.3, meet="a" if two else None),
            _job("alone", log, 0.1, exclusive=True),
            _job("c", log, 0.1, deps=("a", "b")), _job("d", log, 0.1, deps=("outside the graph",))]
    with make_executor(ExecutionSpec(executor=executor, workers=2), tmp_path) as ex:
        results = ex.run(jobs)
    spans = _spans(log)
    assert set(results) == set(spans) == {"a", "b", "alone", "c", "d"}
    assert spans["c"][0] >= max(spans["a"][1], spans["b"][1])  # after both dependencies
    for name, (start, end) in spans.items():  # nothing ran beside the exclusive job
        if name != "alone":
            assert end <= spans["alone"][0] or start >= spans["alone"][1], name
    # every job left a record: a second run starts none and returns the same results
    log.unlink()
    for f in tmp_path.glob("log.*.started"):
        f.unlink()
    with make_executor(ExecutionSpec(executor=executor, workers=2), tmp_path) as ex:
        assert ex.run(jobs) == results
    assert not log.exists()


@pytest.mark.parametrize("edit", ["number", "missing result", "missing key", "result null", "not json",
                                  "no checksum"])
def test_an_edited_or_incomplete_job_record_is_run_again_never_read(edit: str, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A record carries the SHA-256 of its content: an edited one (its numbers would flow into the
    report) or one missing a field is not trusted; the job runs again, with one line saying why."""
    log = tmp_path / "log"
    job = _job("a", log)
    with LocalExecutor(ExecutionSpec(), tmp_path) as ex:
        first = ex.run([job])["a"]
    path = job.record(tmp_path)
    record = json.loads(path.read_text())
    assert len(record["sha256"]) == 64
    if edit == "number":
        record["result"]["t"] = 12345.0
    elif edit == "result null":
        record["result"] = None
    elif edit == "no checksum":
        del record["sha256"]
    else:
        record.pop("result" if edit == "missing result" else "key", None)
    path.write_text("{ not json" if edit == "not json" else json.dumps(record))
    log.unlink()
    capsys.readouterr()
    with LocalExecutor(ExecutionSpec(), tmp_path) as ex:
        again = ex.run([job])["a"]
    assert again != {"t": 12345.0} and again["t"] > first["t"] and log.is_file()  # the job ran again
    out = capsys.readouterr().out
    assert "a: its record" in out and "running the job again" in out and "Traceback" not in out
    assert json.loads(path.read_text())["result"] == again  # a valid record again


def test_no_json_file_gets_nan_or_infinity(tmp_path: Path) -> None:
    from ctprune.run.runtime import write_json_strict

    with pytest.raises(CtpruneError, match=r"summary .*: origin.val_bleu is not a finite number; nothing written"):
        write_json_strict(tmp_path / "s.json", {"origin": {"val_bleu": float("-inf")}}, "summary")
    with pytest.raises(CtpruneError, match=r"runs.1 is not a finite number"):
        write_json_strict(tmp_path / "s.json", {"runs": [1.0, float("nan")]}, "summary")
    assert list(tmp_path.iterdir()) == []


# Tests that start a local Ray cluster share one xdist group: never two clusters at once
RAY = pytest.mark.xdist_group("ray")


@pytest.mark.parametrize("executor", ["local", "process", pytest.param("ray", marks=RAY)])
def test_a_failing_job_stops_the_run_with_its_own_error(executor: str, tmp_path: Path) -> None:
    jobs = [Job("bad", f"{HERE}:refuse", {}), _job("after", tmp_path / "log", deps=("bad",))]
    with make_executor(ExecutionSpec(executor=executor, workers=2), tmp_path) as ex:
        with pytest.raises(CtpruneError, match="^bad input: the one-line error$"):
            ex.run(jobs)
    assert not (tmp_path / "log").exists() and not (tmp_path / "jobs").exists()


def test_a_job_whose_worker_dies_is_retried_then_given_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "log"
    monkeypatch.setenv(FAULT_ENV, f"slow:0.2:{tmp_path / 'killed'}")
    with ProcessExecutor(ExecutionSpec(executor="process", workers=2), tmp_path) as ex:
        results = ex.run([_job("slow", log, 1.0), _job("other", log, 0.1)])
    assert (tmp_path / "killed").read_text() == "slow" and set(results) == {"slow", "other"}
    assert set(_spans(log)) >= {"slow", "other"}  # "slow" ran to its end on the second attempt
    # a worker that dies on every attempt: the run stops after MAX_ATTEMPTS with a one-line error
    monkeypatch.setenv(FAULT_ENV, "doomed:0.1:always")
    with ProcessExecutor(ExecutionSpec(executor="process", workers=1), tmp_path) as ex:
        with pytest.raises(CtpruneError, match="worker died 3 times"):
            ex.run([_job("doomed", log, 1.0)])


class _PoolThatBreaksOnBad(Executor):
    """Two workers in this process; whenever the job "bad" runs, its worker dies and takes the
    pool down: every job then running comes back RETRY, as from a real process pool."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(ExecutionSpec(workers=2), run_dir)
        self.finished: list[str] = []
        self.n = 0

    def _start(self, job: Job, threads: int) -> int:
        self.n += 1
        return self.n

    def _wait(self, running: dict[Any, Job]) -> list[tuple[Any, Any]]:
        if any(j.name == "bad" for j in running.values()):
            return [(h, RETRY) for h in running]
        handle, job = next(iter(running.items()))
        self.finished.append(job.name)
        return [(handle, {"job": job.name})]


def test_a_dead_worker_is_charged_to_its_own_job_not_to_those_that_shared_its_pool(tmp_path: Path) -> None:
    """"bad" and "good" start together; the pool breaks under both. Both rerun alone, so only "bad"
    is charged: "good" finishes and the run stops on "bad"'s third death, naming "bad"."""
    ex = _PoolThatBreaksOnBad(tmp_path)
    log = tmp_path / "log"
    with pytest.raises(CtpruneError, match="job 'bad': its worker died 3 times"):
        ex.run([_job("bad", log), _job("good", log)])
    assert ex.finished == ["good"] and ex.alone == {"bad", "good"}


def test_threads_are_shared_out_among_the_jobs_that_run_at_once(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """4 cores, 2 workers: a job alone (or exclusive) gets all 4 threads; two at once get 2 each."""
    monkeypatch.setattr("ctprune.run.executors.cpu_threads", lambda: 4)
    started: dict[str, int] = {}
    ex = LocalExecutor(ExecutionSpec(workers=2), tmp_path)
    ex.workers = 2  # the scheduling of a 2-worker executor, run in this process
    monkeypatch.setattr(ex, "_start", lambda job, threads: started.setdefault(job.name, threads) and job.name)
    monkeypatch.setattr(ex, "_wait", lambda running: [(h, {}) for h in list(running)])
    log = tmp_path / "log"
    ex.run([_job("first", log), _job("a", log, deps=("first",)), _job("b", log, deps=("first",)),
            _job("alone", log, deps=("a", "b"), exclusive=True)])
    assert started == {"first": 4, "a": 2, "b": 2, "alone": 4}


def test_sharded_tuning_merged_equals_one_shard(trained: Path, small_corpus: Path, tmp_path: Path) -> None:
    from ctprune.stages.configs import PlanArgs, write_plan

    (tmp_path / "conf.json").write_text(json.dumps(CONFS))
    write_plan(PlanArgs(configurations=tmp_path / "conf.json", model=trained, output=tmp_path / "plan.json"))
    prune(PruneArgs(model=trained, output=tmp_path / "pruned", plan=tmp_path / "plan.json"))
    keys = sorted(json.loads((tmp_path / "pruned" / "index.json").read_text())["variants"])
    kw = dict(epochs=1, corpus="folder:de-en", data_dir=str(small_corpus), lr=2e-3, max_tokens=1024, device="cpu",
              seed=3)
    tune_blocks(TuneArgs(model=trained, bank=tmp_path / "pruned", output=tmp_path / "whole", only=keys,
                         **kw))  # type: ignore[arg-type]
    shards = [(tmp_path / f"shard-{i}", keys[i::2]) for i in range(2)]
    for shard, part in shards:
        tune_blocks(TuneArgs(model=trained, bank=tmp_path / "pruned", output=shard, only=part,
                             **kw))  # type: ignore[arg-type]
    Bank.merge(shards, tmp_path / "merged")
    whole = json.loads((tmp_path / "whole" / "index.json").read_text())
    merged = json.loads((tmp_path / "merged" / "index.json").read_text())
    assert sorted(merged["variants"]) == keys and not any(s.exists() for s, _ in shards)
    for k in keys:
        f = whole["variants"][k]["file"]
        assert (tmp_path / "merged" / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), k
        assert merged["variants"][k]["checksum"] == whole["variants"][k]["checksum"]
    # the cost adds up over the shards (each pays its own teacher pass)
    t = merged["tuning"]
    assert t["sessions"] == 2 and t["variants"] == len(keys)
    assert t["train_flops"] > whole["tuning"]["train_flops"] and t["teacher_flops"] == 2 * whole["tuning"][
        "teacher_flops"]
    assert t["variant_flops"] == whole["tuning"]["variant_flops"]


@pytest.mark.slow
@pytest.mark.xdist_group("finished-run")  # beside the test that builds and edits it (test_run)
def test_run_gives_the_same_numbers_on_the_process_executor(trained: Path, small_corpus: Path, finished_run: Path,
                                                            tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The tiny experiment on the process executor (2 workers, tuning in 2 shards; one worker
    killed inside a finetuning job) gives seed 0 the BLEU, parameters, FLOPs and epochs to target of
    the local executor's run (``finished_run``, seeds 0 and 1: a seed's numbers are its own). Ray
    runs the same jobs, compared job by job below."""
    import ctprune.run.graph as run_stage

    resume = json.loads((finished_run / "resume.json").read_text())
    expected = {k: v for k, v in resume["numbers"].items() if not k.endswith("-1")}  # the local executor's
    local = resume["summary"]
    assert local["execution"]["executor"] == "local" and [r["seed"] for r in local["runs"]] == [0, 1]
    exp = tmp_path / "exp.toml"
    exp.write_text(EXPERIMENT.format(model=trained, data=small_corpus).replace("seeds = [0, 1]", "seeds = [0]"))
    monkeypatch.setenv(FAULT_ENV, f"finetune composed 1:0.3:{tmp_path / 'killed'}")  # the job: ~1 s
    run_stage.run_experiment(exp, tmp_path / "process", execution={"executor": "process", "workers": 2, "shards": 2})
    assert (tmp_path / "killed").read_text() == "finetune composed 1 (seed 0)"
    out = capsys.readouterr().out  # the job ran alone when its worker died, or beside another job
    assert any(f"finetune composed 1 (seed 0): {said}" in out
               for said in ("its worker died; retrying", "a worker of its pool died; rerunning it alone"))
    # Two workers tune two shards, each with its own teacher pass: the same tuned variants (so the
    # same BLEU everywhere), at the price of a second teacher pass in the bank's FLOPs.
    got = json.loads(json.dumps(_numbers(tmp_path / "process")))  # tuples as JSON gives them back: lists
    assert {k: v for k, v in got.items() if k != "flops-0"} == {k: v for k, v in expected.items() if k != "flops-0"}
    sharded = json.loads((tmp_path / "process" / "summary.json").read_text())
    assert sharded["execution"]["executor"] == "process" and sharded["execution"]["workers"] == 2
    assert sharded["runs"][0]["tuning"]["sessions"] == 2 and local["runs"][0]["tuning"]["sessions"] == 1
    assert sharded["runs"][0]["tuning"]["teacher_flops"] == 2 * local["runs"][0]["tuning"]["teacher_flops"]


def _run_jobs(origin: Path, conf: Path, pruned: Path, out: Path, data_dir: Path) -> list[Job]:
    """Real jobs of a `ctprune run` graph (as ctprune/run/graph.py builds them) on the corpus of
    ``data_dir``, writing under ``out``: the origin's val BLEU, block tuning of the pruned bank in one
    shard (what Ray on one machine gets) and its merge, one side of configuration 0 finetuned from the
    tuned bank, and the origin and configurations described."""
    keys = sorted(json.loads((pruned / "index.json").read_text())["variants"])
    data = {"corpus": "folder:de-en", "data_dir": str(data_dir)}
    shard, tuned, ft = str(out / "shard"), str(out / "tuned"), str(out / "composed")
    return [
        Job("origin val BLEU", "val_bleu_job", {"origin": str(origin), **data}),
        Job("tune-blocks seed 0 shard 1/1", "tune_job",
            {"origin": str(origin), "pruned": str(pruned), "output": shard, "keys": keys, "epochs": 1, "lr": 2e-3,
             "patience": 2, "seed": 0, "max_tokens": 1024, "bf16": False, **data}, gpu=True, output=shard),
        Job("merge tuned bank seed 0", "merge_job", {"shards": [[shard, keys]], "bank": tuned},
            deps=("tune-blocks seed 0 shard 1/1",), output=tuned),
        Job("finetune composed 0 (seed 0)", "finetune_job",
            {"origin": str(origin), "bank": tuned, "conf_file": str(conf), "index": 0, "output": ft, "seed": 0,
             "target": None, "epochs": 1, "budget_epochs": 1, "lr": 1e-3, "max_tokens": 1024, "bf16": False,
             "tests": ["test"], **data}, deps=("merge tuned bank seed 0",), gpu=True, output=ft),
        Job("describe", "describe_job", {"origin": str(origin), "pruned": str(pruned), "configurations": CONFS,
                                         "tests": ["test"], **data}, gpu=True),
    ]


CLOCK = ("wall_time_s", "cost_seconds", "train_seconds")  # read off the clock: they differ from run to run


@pytest.mark.slow
@RAY
def test_the_jobs_of_a_run_give_the_same_results_on_local_and_ray(trained: Path, small_corpus: Path,
                                                                   tmp_path: Path) -> None:
    """The jobs of a run (``_run_jobs``: BLEU, tuning, merging, finetuning, describing) on the local
    executor and on Ray (a local cluster of this machine's cores, the jobs' device "auto"):
    identical results but for the clock, and the same tuned variants, byte for byte."""
    from ctprune.stages.configs import PlanArgs, write_plan

    (tmp_path / "conf.json").write_text(json.dumps(CONFS))
    write_plan(PlanArgs(configurations=tmp_path / "conf.json", model=trained, output=tmp_path / "plan.json"))
    prune(PruneArgs(model=trained, output=tmp_path / "pruned", plan=tmp_path / "plan.json"))
    results = {}
    for executor, device in (("local", "cpu"), ("ray", "auto")):
        out = tmp_path / executor
        with make_executor(ExecutionSpec(executor=executor, workers=2, device=device), out) as ex:
            got = ex.run(_run_jobs(trained, tmp_path / "conf.json", tmp_path / "pruned", out, small_corpus))
        results[executor] = {name: {k: v for k, v in r.items() if k not in CLOCK} for name, r in got.items()}
        assert json.loads((out / "tuned" / "index.json").read_text())["tuning"]["sessions"] == 1
    assert results["ray"] == results["local"]
    assert results["local"]["finetune composed 0 (seed 0)"]["epochs_trained"] == 1
    index = json.loads((tmp_path / "local" / "tuned" / "index.json").read_text())
    for entry in index["variants"].values():
        assert (tmp_path / "ray" / "tuned" / entry["file"]).read_bytes() == \
            (tmp_path / "local" / "tuned" / entry["file"]).read_bytes()
    # `ctprune run` on Ray without a cluster address tunes in one shard whatever its workers (the
    # summary's execution.tuning_shards): these jobs, so the bank's cost and every number of the run
    assert ExecutionSpec(executor="ray", workers=2, device="auto").tuning_shards(2) == 1
