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
from ctprune.training.history import read_history
from ctprune.training.loop import Recipe


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


def test_resume_after_an_interruption_matches_an_uninterrupted_run(small_corpus: Path, tmp_path: Path) -> None:
    recipe = dict(epochs=2, lr=3e-3, warmup_steps=20, max_tokens=1024, seed=3)

    def args(out: Path, resume: bool = False) -> TrainArgs:
        return TrainArgs(output=out, preset="tiny", corpus="folder:de-en", data_dir=str(small_corpus), device="cpu",
                         vocab_size=300, resume=resume, recipe=Recipe(**recipe))

    train_origin(args(tmp_path / "straight"))

    # Interrupt in the middle of epoch 2, as a kill would.
    import ctprune.training.loop as loop

    steps = {"n": 0}
    real_step = loop.train_step

    def step_with_kill(*a, **k):  # type: ignore[no-untyped-def]
        loss = real_step(*a, **k)
        if (tmp_path / "resumed/history.csv").exists():  # epoch 1 is finished
            steps["n"] += 1
            if steps["n"] == 10:
                raise _Interrupt
        return loss

    loop.train_step = step_with_kill  # type: ignore[assignment]
    try:
        with pytest.raises(_Interrupt):
            train_origin(args(tmp_path / "resumed"))
    finally:
        loop.train_step = real_step  # type: ignore[assignment]
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


def test_evaluation_within_epochs_and_the_checkpoint_kept_by_val_loss(model_folder: Path, tmp_path: Path) -> None:
    from ctprune.data.corpus import Parallel
    from ctprune.fileio import read_json
    from ctprune.training.loop import fit

    model, tok, _ = load_model_folder(model_folder)
    train, val = load_split("synthetic", "train"), load_split("synthetic", "val")
    train, val = Parallel(train.src[:64], train.tgt[:64]), Parallel(val.src[:4], val.tgt[:4])
    out = tmp_path / "ft"
    fit(model, tok, train, val, Recipe(epochs=2, lr=3e-3, warmup_steps=2, max_tokens=256, eval_every=0.5,
                                       select="val_loss"), out, {"stage": "test"}, eval_before=True)
    rows = read_history(out / "history.csv")
    epochs = [float(r["epoch"]) for r in rows]
    assert [r["epoch"] for r in rows][::2] == ["0", "1", "2"] and 0 < epochs[1] < 1 < epochs[3] < 2
    for col in ("train_flops", "train_tokens"):  # counted up to each evaluation
        assert all(float(a[col]) < float(b[col]) for a, b in zip(rows[1:], rows[2:])), col
    # wall time too, written to 0.1 s: half an epoch of these 64 pairs can take less on a fast machine
    assert all(float(a["wall_time_s"]) <= float(b["wall_time_s"]) for a, b in zip(rows[1:], rows[2:]))
    summary = read_json(out / "train_summary.json")
    kept = min(rows, key=lambda r: float(r["val_loss"]))
    assert summary["select"] == "val_loss" and summary["epochs_done"] == 2
    assert summary["kept"] == {"epoch": kept["epoch"], "val_bleu": float(kept["val_bleu"]),
                               "val_loss": float(kept["val_loss"])}
    assert summary["best_val_bleu"] == pytest.approx(max(float(r["val_bleu"]) for r in rows), abs=0.01)
    assert float(read_json(out / "hparams.json")["epoch"]) == float(kept["epoch"])


@pytest.mark.parametrize(("epochs", "message"), [
    (["0", "0.5", "1", "2.25"], "epoch 2.25 after epoch 1"),  # epoch 2 skipped
    (["0", "0.5", "0.5"], "epoch 0.5 after epoch 0.5"),
    (["0", "1e-1"], "is not a whole number or a fraction"),
])
def test_a_history_with_fractional_epochs_is_validated(epochs: list[str], message: str, tmp_path: Path) -> None:
    path = tmp_path / "history.csv"
    path.write_text("epoch,val_bleu\n" + "".join(f"{e},1.0\n" for e in epochs))
    with pytest.raises(CtpruneError, match=message):
        read_history(path)
    path.write_text("epoch,val_bleu\n0,1\n0.25,2\n1,3\n1.5,4\n2,5\n")  # and one that is fine
    assert [r["epoch"] for r in read_history(path)] == ["0", "0.25", "1", "1.5", "2"]


def test_training_stops_at_a_flops_budget_within_an_epoch(model_folder: Path, tmp_path: Path) -> None:
    from ctprune.data.batching import TokenizedSplit
    from ctprune.data.corpus import Parallel
    from ctprune.training.loop import _batches, epochs_for_flops, fit

    model, tok, _ = load_model_folder(model_folder)
    train, val = load_split("synthetic", "train"), load_split("synthetic", "val")
    train, val = Parallel(train.src[:64], train.tgt[:64]), Parallel(val.src[:4], val.tgt[:4])
    recipe = Recipe(epochs=1, lr=3e-3, warmup_steps=2, max_tokens=256)
    fit(model, tok, train, val, recipe, tmp_path / "one", {"stage": "test"})
    epoch = float(read_history(tmp_path / "one/history.csv")[-1]["train_flops"])
    budget = 1.5 * epoch  # half way into the second epoch
    model = load_model_folder(model_folder)[0]
    epochs = epochs_for_flops(model, tok, train, recipe, budget)
    assert epochs == 3  # the first epoch's FLOPs say 2, and one more for later epochs' padding
    fit(model, tok, train, val, Recipe(**{**recipe.__dict__, "epochs": epochs}), tmp_path / "flops",
        {"stage": "test"}, max_flops=budget)
    rows = read_history(tmp_path / "flops/history.csv")
    assert rows[0]["epoch"] == "1" and 1 < float(rows[-1]["epoch"]) < 2 and len(rows) == 2
    n = len(_batches(TokenizedSplit(train, tok, model.cfg.max_len), recipe, 1))
    # stopped by the step that crosses the budget (batches differ in size), the lr schedule decayed by then
    assert budget <= float(rows[-1]["train_flops"]) < budget + 2 * epoch / n
    assert float(rows[-1]["lr"]) < 0.1 * recipe.lr
