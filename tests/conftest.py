"""Shared fixtures: tiny models, the synthetic corpus, a CLI runner."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ctprune.model.transformer import ModelConfig, Seq2SeqTransformer

REPO = Path(__file__).resolve().parents[1]


def _threads_per_process() -> int:
    """The suite's thread budget ($CTPRUNE_THREADS, default 1) shared out among pytest-xdist's
    workers (each at least 1): two workers on two cores get one thread each. The budget is noted
    once, by the first process (xdist's controller), so a worker never splits a split value."""
    budget = int(os.environ.setdefault("CTPRUNE_SUITE_THREADS", os.environ.get("CTPRUNE_THREADS", "1")))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, budget // workers)


# A fixed thread count for the suite and the ctprune subprocesses it starts (CI may override it):
# several processes that each spin every core's OpenMP threads slow each other down badly. The
# benchmarks' subprocesses read no $CTPRUNE_THREADS: OMP_NUM_THREADS bounds PyTorch's default there.
THREADS = _threads_per_process()
os.environ["CTPRUNE_THREADS"] = str(THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)


# pytest-xdist (scripts/test.sh: -n 2 --dist loadgroup) sends a group of tests to one worker. A
# module's tests form one group, so that its module-scoped fixtures are built once, except in the
# modules below: their long tests are independent, and as one group they would run one after
# another on one worker. Their tests that share an expensive module fixture, or that must not run
# at the same time as each other (two local Ray clusters), name a group of their own (xdist_group).
SPREAD = {"test_run.py", "test_executors.py", "test_faults.py"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    for item in items:
        if item.path.name not in SPREAD and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


@pytest.fixture(autouse=True)
def _short_latency_measurements(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ctprune run`'s latency job, where it runs in the test's process (the local executor), times
    2 interleaved rounds over 16 sentences instead of 5 over up to 256: the tests check what the job
    computes and reports (ratio, spread, flag, the report's columns), not how steady the clock is.
    The job reads these module names; a refactor that moves them fails here, loudly."""
    import ctprune.run.jobs as jobs

    for name, value in (("LATENCY_REPEATS", 2), ("LATENCY_SENTENCES", 16)):
        monkeypatch.setattr(jobs, name, value)  # raising: the name must exist


def tiny_config(**overrides: object) -> ModelConfig:
    base = dict(vocab_size=99, d_model=32, n_heads=4, d_ff=48, n_encoder_layers=2,
                n_decoder_layers=2, dropout=0.0, max_len=64)
    return ModelConfig(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.fixture
def tiny_model() -> Seq2SeqTransformer:
    torch.manual_seed(0)
    return Seq2SeqTransformer(tiny_config()).eval()


def random_batch(vocab: int = 99, b: int = 3, s: int = 7, t: int = 5, seed: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """src (B, S) with some padding at the end of rows, tgt_in (B, T); ids >= 4."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (b, s), generator=g)
    src[1, s - 2:] = 0
    src[2, s - 3:] = 0
    tgt = torch.randint(4, vocab, (b, t), generator=g)
    tgt[:, 0] = 2
    return src, tgt


def run_cli(*args: str, cwd: Path | None = None, stdin: str | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "ctprune", *args], cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model folder with a real tokenizer (no training needed)."""
    from ctprune.data.tokenizer import Tokenizer
    from ctprune.model.checkpoint import save_model_folder

    words = "der die das mann frau hund katze sieht liest ein eine buch park im auf tisch".split()
    text = [" ".join(words[(i * 7 + j) % len(words)] for j in range(6)) for i in range(200)]
    tok = Tokenizer.train(text + [t.upper() for t in text], 80)
    torch.manual_seed(0)
    model = Seq2SeqTransformer(tiny_config(vocab_size=tok.vocab_size, dropout=0.1))
    folder = tmp_path_factory.mktemp("models") / "origin"
    save_model_folder(folder, model, tok, {"stage": "test"})
    return folder


def once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``build(folder)`` once for the whole test run, even under pytest-xdist, whose workers each
    hold their own session: the first to take the lock builds ``folder`` in the temporary root the
    workers share, the others wait for it and use it as it is."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "shared"  # pytest-N: one per run
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            if folder.exists():  # a worker that failed half-way: start again
                shutil.rmtree(folder)
            build(folder)
            done.touch()
    return folder


def write_corpus(folder: Path, train: int | None = None, val: int | None = None, test: int | None = None) -> Path:
    """The synthetic corpus as a folder of SPLIT.de / SPLIT.en files (corpus "folder:de-en"), a split
    cut to its first ``train`` / ``val`` / ``test`` pairs where that is given."""
    from ctprune.data.synthetic import SPLITS, synthetic_corpus

    sizes = {"train": train, "val": val, "test": test}
    folder.mkdir(parents=True)
    for split in SPLITS:
        pairs = synthetic_corpus(split)[:sizes[split]]
        for i, lang in enumerate(("de", "en")):
            (folder / f"{split}.{lang}").write_text("".join(p[i] + "\n" for p in pairs), encoding="utf-8")
    return folder


# The corpus of the `ctprune run` tests: the synthetic corpus's first 1000 training pairs (of 4000),
# 100 val and 64 test pairs (of 200 each). Every job of a run still runs on it; a finetuning epoch,
# a tuning epoch, a BLEU and a latency measurement each take a fraction of the time.
SMALL = {"train": 1000, "val": 100, "test": 64}


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data folder of SMALL (corpus "folder:de-en"), written once per test run."""
    return once_per_run(tmp_path_factory, "small-corpus", lambda folder: write_corpus(folder, **SMALL))


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny origin model trained briefly on the synthetic corpus (shared by several tests and,
    under pytest-xdist, by every worker: tests only read it)."""
    from ctprune.stages.train import TrainArgs, train_origin
    from ctprune.training.loop import Recipe

    def build(out: Path) -> None:
        train_origin(TrainArgs(output=out, preset="tiny", corpus="synthetic", device="cpu",
                               recipe=Recipe(epochs=4, lr=3e-3, warmup_steps=100, max_tokens=1024, seed=0)))

    return once_per_run(tmp_path_factory, "tiny", build)


@pytest.fixture(scope="session")
def finished_run(trained: Path, small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished `ctprune run` of tests/test_run.py's EXPERIMENT (two seeds) on ``trained`` and
    ``small_corpus``,
    made the hard way: killed in its third finetuning, then resumed. Returns its folder: ``exp.toml``,
    the run folder ``run`` and ``resume.json`` (what the resume redid, the run's numbers and its
    summary as they were when it finished). test_run_end_to_end_with_a_kill_and_resume goes on to
    edit the run; other tests read only ``resume.json``."""
    return once_per_run(tmp_path_factory, "finished-run", lambda folder: _finish_run(trained, small_corpus, folder))


def _finish_run(trained: Path, data: Path, folder: Path) -> None:
    import json

    import ctprune.run.graph as run_stage
    import ctprune.stages.finetune as finetune_stage

    from .test_run import EXPERIMENT, _numbers

    folder.mkdir()
    exp, run_dir = folder / "exp.toml", folder / "run"
    exp.write_text(EXPERIMENT.format(model=trained, data=data))
    real, calls = finetune_stage.finetune, {"n": 0}

    class Killed(Exception):
        pass

    def killed_on_third(*a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(finetune_stage, "finetune", killed_on_third)
        with pytest.raises(Killed):
            run_stage.run_experiment(exp, run_dir)
    finished = sorted((run_dir / "finetune").glob("*/config-*/model.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in
              finished + sorted(run_dir.glob("banks/*/index.json")) + sorted(run_dir.glob("banks/*/variants/*"))}
    run_stage.run_experiment(exp, run_dir)
    (folder / "resume.json").write_text(json.dumps({
        "finished_when_killed": [str(p.relative_to(run_dir)) for p in finished],
        "redone": [str(p.relative_to(run_dir)) for p, t in stamps.items() if p.stat().st_mtime_ns != t],
        "numbers": _numbers(run_dir), "summary": json.loads((run_dir / "summary.json").read_text())}))
