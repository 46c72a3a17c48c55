"""Origin training on the synthetic corpus: it learns, checkpoints round-trip, resume is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ctprune.data.corpus import load_split
from ctprune.errors import CtpruneError
from ctprune.model.checkpoint import load_model_folder, save_model_folder
from ctprune.model.decode import translate
from ctprune.scoring import bleu_score
from ctprune.stages.train import TrainArgs, train_origin
from ctprune.training.loop import Recipe, read_history


def test_training_reaches_a_bleu_far_above_untrained(trained: Path) -> None:
    model, tok, hparams = load_model_folder(trained)
    test = load_split("synthetic", "test")
    bleu = bleu_score(translate(model, tok, test.src), test.tgt).score
    torch.manual_seed(0)
    untrained = type(model)(model.cfg).eval()
    base = bleu_score(translate(untrained, tok, test.src), test.tgt).score
    assert bleu > 40 and bleu > base + 35, (bleu, base)
    assert hparams["recipe"]["epochs"] == 4 and hparams["preset"] == "tiny"


def test_history_and_files(trained: Path) -> None:
    rows = read_history(trained / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[-1]["wall_time_s"]) > 0 and int(rows[-1]["train_tokens"]) > 0
    for f in ("config.json", "model.safetensors", "tokenizer.model", "hparams.json",
              "last/trainer_state.pt", "train_summary.json"):
        assert (trained / f).is_file(), f
    best = max(float(r["val_bleu"]) for r in rows)
    import json
    assert json.loads((trained / "hparams.json").read_text())["val_bleu"] == pytest.approx(best, abs=0.01)


def test_checkpoint_round_trip_gives_identical_outputs(trained: Path, tmp_path: Path) -> None:
    model, tok, hp = load_model_folder(trained)
    save_model_folder(tmp_path / "copy", model, tok, hp)
    again, tok2, _ = load_model_folder(tmp_path / "copy")
    src = load_split("synthetic", "val").src[:16]
    assert translate(model, tok, src) == translate(again, tok2, src)
    a, b = load_file(str(trained / "model.safetensors")), load_file(str(tmp_path / "copy/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_beam_search_is_at_least_as_likely_as_greedy(trained: Path) -> None:
    model, tok, _ = load_model_folder(trained)
    test = load_split("synthetic", "test")
    greedy = bleu_score(translate(model, tok, test.src), test.tgt).score
    beam = bleu_score(translate(model, tok, test.src, beam=4), test.tgt).score
    assert beam > greedy - 3  # beam search works and is no worse than greedy by much


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(CtpruneError, match="not a ctprune model folder"):
        load_model_folder(tmp_path)
    with pytest.raises(CtpruneError, match="model folder not found"):
        load_model_folder(tmp_path / "absent")


class _Interrupt(Exception):
    pass


def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    recipe = dict(epochs=2, lr=3e-3, warmup_steps=20, max_tokens=1024, seed=3)

    def args(out: Path, resume: bool = False) -> TrainArgs:
        return TrainArgs(output=out, preset="tiny", corpus="synthetic", device="cpu",
                         vocab_size=300, resume=resume, recipe=Recipe(**recipe))

    train_origin(args(tmp_path / "straight"))

    # Interrupt in the middle of epoch 2, as a kill would.
    import ctprune.training.loop as loop

    steps = {"n": 0}
    real_fit = loop.fit

    def fit_with_kill(*a, **k):  # type: ignore[no-untyped-def]
        def after_step(_model):  # type: ignore[no-untyped-def]
            if (tmp_path / "resumed/history.csv").exists():  # epoch 1 is finished
                steps["n"] += 1
                if steps["n"] == 10:
                    raise _Interrupt
        return real_fit(*a, **k, after_step=after_step)

    import ctprune.stages.train as train_stage
    train_stage.fit = fit_with_kill  # type: ignore[assignment]
    try:
        with pytest.raises(_Interrupt):
            train_origin(args(tmp_path / "resumed"))
    finally:
        train_stage.fit = real_fit  # type: ignore[assignment]
    assert [r["epoch"] for r in read_history(tmp_path / "resumed/history.csv")] == ["1"]
    with pytest.raises(CtpruneError, match="--resume"):
        train_origin(args(tmp_path / "resumed"))
    train_origin(args(tmp_path / "resumed", resume=True))
    a = load_file(str(tmp_path / "straight/last/model.safetensors"))
    b = load_file(str(tmp_path / "resumed/last/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha = read_history(tmp_path / "straight/history.csv")
    hb = read_history(tmp_path / "resumed/history.csv")
    assert [r["train_loss"] for r in ha] == [r["train_loss"] for r in hb]
