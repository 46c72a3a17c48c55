"""The job runtime of `ctprune run`: a ``Job`` names one call of a job function (the bodies are in
ctprune/run/jobs.py): a function of input paths and options that writes one output (a folder, or
a file of the run folder), resumable, and returns a small JSON result.

A job's fingerprint (``key``) covers the function, its arguments and the content of what its
paths hold (``context``: the origin's and the data files' fingerprints); when the job ends,
``run_job`` writes ``RUN_DIR/jobs/NAME-KEY.json`` with the result and a SHA-256 of the record,
last, so a job with a valid record is complete and is skipped, and a job without one (or with an
edited or malformed one) is (re)run, its function resuming whatever part of its output was
committed. The executors (ctprune/run/executors.py) run a graph of jobs in this process, in worker
processes, or as Ray tasks; neither they nor this module import the job bodies (a job names its
function, imported where it runs).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctprune.errors import CtpruneError
from ctprune.fileio import read_json, write_text
from ctprune.pruning.configs import fingerprint

RECORDS = "jobs"
JOBS_MODULE = "ctprune.run.jobs"  # where a job function named without a module lives
FAULT_ENV = "CTPRUNE_FAULT_KILL_JOB"  # tests: "NAME_PART:SECONDS:MARKER" kills the worker once, mid-job


@dataclass(frozen=True)
class Job:
    """One call of the job function ``fn`` ("module:function", or a function of ``ctprune.run.jobs``)
    with JSON-able ``kwargs``.
    ``deps``: names of jobs that must finish first; ``exclusive``: nothing runs beside it (timing)."""

    name: str
    fn: str
    kwargs: dict[str, Any]
    deps: tuple[str, ...] = ()
    exclusive: bool = False
    gpu: bool = False  # uses the device (a GPU when there is one); CPU-only jobs reserve none
    context: str = ""  # in the key only: what the inputs' paths hide (their content's fingerprint)
    output: str | None = None  # a record counts only while this path exists

    @property
    def key(self) -> str:
        return fingerprint([self.fn, self.kwargs, self.context])[:12]

    def record(self, run_dir: Path) -> Path:
        return Path(run_dir) / RECORDS / f"{re.sub(r'[^A-Za-z0-9]+', '-', self.name).strip('-')}-{self.key}.json"


def _non_finite(obj: Any, at: str = "") -> str | None:
    """Where in ``obj`` a float is NaN or infinite (JSON has no such number), else None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return at or "the value"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        if (where := _non_finite(v, f"{at}.{k}" if at else str(k))) is not None:
            return where
    return None


def write_json_strict(path: Path, obj: Any, what: str) -> None:
    """``write_json`` that refuses NaN and infinities (``json`` writes them as ``NaN`` /
    ``-Infinity``, which no JSON reader accepts): nothing is written then."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError:
        raise CtpruneError(f"{what} {path}: {_non_finite(obj)} is not a finite number; nothing written") from None
    write_text(Path(path), text + "\n")


def _digest(record: dict[str, Any]) -> str:
    """SHA-256 of a record without its own ``sha256`` field (canonical JSON)."""
    body = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def _record_problem(record: Any, job: Job) -> str | None:
    """Why ``record`` is not a valid record of ``job`` (None: it is)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [k for k in ("key", "result", "sha256") if k not in record]
    if missing:
        return f"no {', '.join(missing)}"
    if record["key"] != job.key:
        return f"key {str(record['key'])[:16]!r}, not {job.key!r}"
    if not isinstance(record["result"], dict):
        return "its result is not a JSON object"
    try:
        digest = _digest(record)
    except ValueError:  # NaN or Infinity, which Python's json reads but no record holds
        return "a number that is not finite"
    return None if record["sha256"] == digest else "its content does not match its SHA-256 (edited or damaged)"


def read_record(job: Job, run_dir: Path) -> dict[str, Any] | None:
    """The result of ``job`` when it finished: its record exists, is valid (key, result, SHA-256)
    and its output exists. A missing or invalid record means the job runs (again): an edited
    record's numbers never reach the report."""
    path = job.record(run_dir)
    if not path.is_file() or (job.output is not None and not Path(job.output).exists()):
        return None  # not finished, or its output was removed (to redo it)
    try:
        record = read_json(path, "job record")
    except CtpruneError as e:
        problem: str | None = str(e)
    else:
        problem = _record_problem(record, job)
    if problem is not None:
        print(f"[ctprune run] {job.name}: its record {path.name} is not valid ({problem[:200]}); "
              "running the job again", flush=True)
        return None
    return record["result"]


def _fault_hook(name: str) -> threading.Timer | None:
    """For tests only: ``$CTPRUNE_FAULT_KILL_JOB`` = NAME_PART:SECONDS:MARKER kills this worker
    process SECONDS into the first job whose name contains NAME_PART and lasts that long (MARKER,
    written as the kill fires, records that it happened, so the retry runs through; "always"
    kills every attempt)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    part, seconds, marker = spec.split(":", 2)
    if part not in name or (marker != "always" and Path(marker).exists()):
        return None
    def kill() -> None:
        if marker != "always":
            Path(marker).write_text(name)
        os._exit(137)

    timer = threading.Timer(float(seconds), kill)
    timer.start()
    return timer


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_job(job: Job, run_dir: str, threads: int | None, device: str) -> dict[str, Any]:
    """Run ``job`` here (a worker's entry point): set the thread count, call the function with
    ``device`` resolved in this process, write the record last; returns the result."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    timer = _fault_hook(job.name)
    module, _, name = job.fn.rpartition(":")
    fn = getattr(importlib.import_module(module or JOBS_MODULE), name)
    started = time.time()
    try:
        result = fn(**job.kwargs, device=device)
    finally:
        if timer is not None:
            timer.cancel()  # a kill meant for this job never hits the next one
    record = {"job": job.name, "key": job.key, "result": result, "deps": list(job.deps), "started": started,
              "seconds": round(time.time() - started, 3), "pid": os.getpid(), "threads": threads or _torch_threads()}
    write_json_strict(job.record(Path(run_dir)), {**record, "sha256": _digest(record)}, f"record of job {job.name!r}")
    return result
