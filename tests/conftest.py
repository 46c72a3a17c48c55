"""Shared fixtures: tiny models, the synthetic corpus, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctprune.model.transformer import ModelConfig, Seq2SeqTransformer

REPO = Path(__file__).resolve().parents[1]

# A fixed thread count for the suite and the ctprune subprocesses it starts (CI may override it):
# several processes that each spin every core's OpenMP threads slow each other down badly.
os.environ.setdefault("CTPRUNE_THREADS", "1")
torch.set_num_threads(int(os.environ["CTPRUNE_THREADS"]))


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


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny origin model trained briefly on the synthetic corpus (shared by several tests)."""
    from ctprune.stages.train import TrainArgs, train_origin
    from ctprune.training.loop import Recipe

    out = tmp_path_factory.mktemp("origin") / "tiny"
    train_origin(TrainArgs(output=out, preset="tiny", corpus="synthetic", device="cpu",
                           recipe=Recipe(epochs=4, lr=3e-3, warmup_steps=100, max_tokens=1024, seed=0)))
    return out
