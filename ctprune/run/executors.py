"""Executors: run a graph of jobs (ctprune/run/runtime.py) in this process, in worker processes, or as
Ray tasks. Every executor starts a job once its dependencies have records, never runs anything
beside an ``exclusive`` job (latency is timed alone), shares the CPU threads out among the jobs
that run at once (a job alone gets them all; never more threads than cores in use: two processes
spinning all cores' OpenMP threads ran a tiny training 40-150x slower here), retries a job whose
worker died (a dead worker breaks its whole pool, so the jobs that shared it rerun one at a time
and a death is charged only to the job that ran alone), and stops the run at the first job that
fails (a bad input's one-line error reaches the user as it is).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ctprune.errors import CtpruneError
from ctprune.run.runtime import Job, read_record, run_job
from ctprune.spec import ExecutionSpec

MAX_ATTEMPTS = 3  # a job whose worker dies (while it runs alone) is run at most this many times
RETRY = object()  # outcome of a job whose worker died


def _say(msg: str) -> None:
    print(f"[ctprune run] {msg}", flush=True)


def cpu_threads() -> int:
    """The CPU threads this process may use (``--threads`` / $CTPRUNE_THREADS, else PyTorch's)."""
    import torch

    return torch.get_num_threads()


class Executor:
    """The scheduling loop; subclasses say how a job is started and how outcomes arrive."""

    def __init__(self, spec: ExecutionSpec, run_dir: Path) -> None:
        self.spec, self.run_dir, self.workers = spec, Path(run_dir), spec.workers
        self.cores = cpu_threads()
        self.threads: dict[Any, int] = {}  # running job handle -> its threads
        self.alone: set[str] = set()  # jobs that shared a broken pool: they rerun one at a time
        if self.workers > self.cores and spec.executor != "local":
            _say(f"{self.workers} workers share {self.cores} CPU thread(s): each job gets one, the cores are "
                 "oversubscribed")

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(abort=exc_type is not None)  # Ctrl-C or a failure: running jobs are stopped

    def close(self, abort: bool = False) -> None:
        pass

    def _start(self, job: Job, threads: int) -> Any:
        raise NotImplementedError

    def _wait(self, running: dict[Any, Job]) -> list[tuple[Any, Any]]:
        """Block until at least one running job ends; its (handle, result | exception | RETRY)."""
        raise NotImplementedError

    def _abort(self, running: dict[Any, Job]) -> None:
        pass

    def run(self, jobs: list[Job]) -> dict[str, dict[str, Any]]:
        """Run ``jobs`` (skipping those with a record); returns every job's result by name."""
        names = {j.name for j in jobs}
        if len(names) != len(jobs):
            raise CtpruneError("internal error: two jobs of one graph share a name")
        results: dict[str, dict[str, Any]] = {}
        for j in jobs:
            if (r := read_record(j, self.run_dir)) is not None:
                results[j.name] = r
        pending = [j for j in jobs if j.name not in results]
        running: dict[Any, Job] = {}
        attempts: Counter[str] = Counter()
        deaths: Counter[str] = Counter()  # the times a job's worker died and no other job's did
        started: dict[str, float] = {}
        self.alone.clear()
        while pending or running:
            ready = self._ready(pending, running, results, names)
            free = self.cores - sum(self.threads.get(h, 0) for h in running)
            for job in ready:  # at least one thread each (more workers than threads share the cores)
                threads = max(1, free // len(ready)) if len(running) + len(ready) > 1 or self._solo(job) \
                    else self.cores  # a job alone, or exclusive: every thread
                pending.remove(job)
                attempts[job.name] += 1
                started[job.name] = time.perf_counter()
                again = f" (attempt {attempts[job.name]})" if attempts[job.name] > 1 else ""
                _say(f"{job.name}: started{again}")
                handle = self._start(job, threads)
                self.threads[handle] = threads
                running[handle] = job
            if not running:
                waiting = ", ".join(sorted(j.name for j in pending))
                raise CtpruneError(f"internal error: jobs wait for jobs that never run: {waiting}")
            outcomes = []
            for handle, outcome in self._wait(running):
                job = running.pop(handle)
                self.threads.pop(handle, None)
                if outcome is RETRY and (r := read_record(job, self.run_dir)) is not None:
                    outcome = r  # it finished before its pool broke: never run it twice
                outcomes.append((job, outcome))
            shared = sum(o is RETRY for _, o in outcomes) > 1  # no telling whose worker died
            for job, outcome in outcomes:
                if outcome is RETRY:
                    if shared:
                        self.alone.add(job.name)
                        _say(f"{job.name}: a worker of its pool died; rerunning it alone")
                    else:
                        deaths[job.name] += 1
                        if deaths[job.name] >= MAX_ATTEMPTS:
                            self._abort(running)
                            raise CtpruneError(f"job {job.name!r}: its worker died {MAX_ATTEMPTS} times")
                        _say(f"{job.name}: its worker died; retrying")
                    pending.append(job)  # the other pending jobs first
                elif isinstance(outcome, BaseException):
                    self._abort(running)
                    raise outcome
                else:
                    results[job.name] = outcome
                    _say(f"{job.name}: done ({time.perf_counter() - started[job.name]:.0f} s)")
        return results

    def _solo(self, job: Job) -> bool:
        return job.exclusive or job.name in self.alone

    def _ready(self, pending: list[Job], running: dict[Any, Job], results: dict[str, Any],
               names: set[str]) -> list[Job]:
        """The jobs to start now: dependencies done (a dependency outside this graph counts as
        done), free workers, and nothing beside an exclusive job or one that reruns alone."""
        if any(self._solo(j) for j in running.values()):
            return []
        free, out = self.workers - len(running), []
        for job in pending:
            if free <= 0:
                break
            if any(d in names and d not in results for d in job.deps):
                continue
            if self._solo(job):
                if not running and not out:
                    return [job]
                continue
            out.append(job)
            free -= 1
        return out


class LocalExecutor(Executor):
    """One job at a time, in this process, with this process's threads."""

    def __init__(self, spec: ExecutionSpec, run_dir: Path) -> None:
        super().__init__(spec, run_dir)
        self.workers = 1
        self._done: dict[int, Any] = {}
        self._n = 0

    def _start(self, job: Job, threads: int) -> Any:
        handle = self._n = self._n + 1  # threads: this process's own, left as they are
        try:
            self._done[handle] = run_job(job, str(self.run_dir), None, self.spec.device)
        except Exception as e:  # handed to the loop, which stops the run with it
            self._done[handle] = e
        return handle

    def _wait(self, running: dict[Any, Job]) -> list[tuple[Any, Any]]:
        return [(h, self._done.pop(h)) for h in list(running)]


def _init_worker() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the run, which stops the pool
    try:  # Linux: die with the run, so no orphan keeps writing a job's output beside a re-run
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ProcessExecutor(Executor):
    """``workers`` worker processes on this machine (spawned, so no state leaks in), each with
    its share of the CPU threads; a pool whose worker died is replaced and its jobs retried."""

    def __init__(self, spec: ExecutionSpec, run_dir: Path) -> None:
        super().__init__(spec, run_dir)
        self.pool: cf.ProcessPoolExecutor | None = None

    def _pool(self) -> cf.ProcessPoolExecutor:
        if self.pool is None:
            self.pool = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                               initializer=_init_worker)
        return self.pool

    def _start(self, job: Job, threads: int) -> Any:
        try:
            return self._pool().submit(run_job, job, str(self.run_dir), threads, self.spec.device)
        except cf.process.BrokenProcessPool:  # a worker died since the last wait: retry on a new pool
            broken: cf.Future[Any] = cf.Future()
            broken.set_exception(cf.process.BrokenProcessPool("a worker died"))
            return broken

    def _wait(self, running: dict[Any, Job]) -> list[tuple[Any, Any]]:
        done, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
        out = []
        for f in done:
            try:
                out.append((f, f.result()))
            except cf.process.BrokenProcessPool:
                out.append((f, RETRY))
            except Exception as e:
                out.append((f, e))
        if any(o is RETRY for _, o in out):  # a dead worker breaks the whole pool: retry all its jobs
            for f in running:
                if f not in done:
                    out.append((f, RETRY))
            self._shutdown()
        return out

    def _shutdown(self) -> None:
        if self.pool is not None:
            for p in list(getattr(self.pool, "_processes", {}).values()):
                p.terminate()  # a job of a failed run need not finish; its output stays resumable
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def _abort(self, running: dict[Any, Job]) -> None:
        self._shutdown()

    def close(self, abort: bool = False) -> None:
        if abort:
            self._shutdown()
        elif self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


class RayExecutor(Executor):
    """Ray tasks: ``ray.init(address)`` for a cluster (whose nodes see the run folder at the
    same path), else a small local Ray on this machine's cores. A job asks ``num_cpus`` = its
    share of threads and a GPU share when the cluster has GPUs and the job uses the device;
    Ray retries a task whose worker died."""

    def __init__(self, spec: ExecutionSpec, run_dir: Path) -> None:
        super().__init__(spec, run_dir)
        try:
            import ray
        except ImportError:
            raise CtpruneError("executor ray needs Ray: pip install 'ctprune[ray]'") from None
        self.ray, self.started = ray, not ray.is_initialized()
        if self.started:
            try:
                if spec.address:
                    ray.init(address=spec.address, log_to_driver=True)
                else:
                    ray.init(num_cpus=self.cores, object_store_memory=200 * 1024 ** 2, include_dashboard=False,
                             log_to_driver=True)
            except (ConnectionError, ray.exceptions.RayError, RuntimeError, ValueError) as e:
                raise CtpruneError(f"cannot start or reach Ray{' at ' + spec.address if spec.address else ''}: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        resources = ray.cluster_resources()
        self.cores = max(1, min(self.cores, int(resources.get("CPU", 1))))
        gpus = resources.get("GPU", 0) if spec.device != "cpu" else 0
        self.gpu_share = min(1.0, gpus / self.workers) if gpus else 0.0
        self.remote = ray.remote(run_job)

    def _start(self, job: Job, threads: int) -> Any:
        gpu = self.gpu_share if job.gpu else 0.0
        # Ray shows a task only its GPU share (as cuda:0): cuda:N means nothing inside a task
        device = "cpu" if not gpu and self.spec.device == "auto" else \
            "cuda" if self.spec.device.startswith("cuda") else self.spec.device
        return self.remote.options(num_cpus=threads, num_gpus=gpu, max_retries=MAX_ATTEMPTS - 1,
                                   retry_exceptions=False, name=job.name).remote(
            job, str(self.run_dir), threads, device)

    def _wait(self, running: dict[Any, Job]) -> list[tuple[Any, Any]]:
        done, _ = self.ray.wait(list(running), num_returns=1)
        out = []
        for ref in done:
            try:
                out.append((ref, self.ray.get(ref)))
            except self.ray.exceptions.RayTaskError as e:  # the job raised: hand on its own error
                cause = e.cause if isinstance(e.cause, BaseException) else e
                out.append((ref, cause))
            except self.ray.exceptions.RayError as e:  # worker or node died (after Ray's retries), OOM, ...
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                out.append((ref, CtpruneError(f"job {running[ref].name!r} failed in Ray ({type(e).__name__}"
                                              f"{': ' + first[:200] if first else ''})")))
        return out

    def _abort(self, running: dict[Any, Job]) -> None:
        for ref in running:
            self.ray.cancel(ref, force=True)

    def close(self, abort: bool = False) -> None:
        if self.started:
            self.ray.shutdown()


EXECUTORS: dict[str, type[Executor]] = {"local": LocalExecutor, "process": ProcessExecutor, "ray": RayExecutor}


def make_executor(spec: ExecutionSpec, run_dir: Path) -> Executor:
    return EXECUTORS[spec.executor](spec, run_dir)
