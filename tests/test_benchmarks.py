"""The benchmarks that run in seconds at their smallest, run here so that they cannot rot unseen
(their committed results come from full-size runs; these check only that they run and report)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ctprune.data.corpus import load_split
from ctprune.stages.prune import PruneArgs, prune
from ctprune.stages.score import ScoreArgs, score_bank

from .conftest import REPO


def run_benchmark(script: str, *args: str) -> list[dict[str, Any]]:
    """Run benchmarks/SCRIPT; its JSON lines, parsed."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_train_throughput_reports_every_precision_against_its_peak() -> None:
    lines = run_benchmark("train_throughput.py", "--steps", "1", "--max-tokens", "128")
    steps = [r for r in lines if "precision" in r]
    assert [r["precision"] for r in steps] == ["fp32", "bf16"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["fraction_of_peak"] < 2 for r in steps)
    assert lines[-1]["fastest"] in ("fp32", "bf16")


def test_solver_time_compares_the_highs_settings_on_a_scored_bank(tmp_path: Path, model_folder: Path) -> None:
    prune(PruneArgs(model=model_folder, output=tmp_path / "bank", grid=[0.25, 0.5]))
    score_bank(ScoreArgs(model=model_folder, bank=tmp_path / "bank", corpus="synthetic", batches=1, max_tokens=1024))
    out = tmp_path / "solver-time.json"
    lines = run_benchmark("solver_time.py", str(model_folder), "--bank", str(tmp_path / "bank"), "--flops", "0.9",
                          "-k", "3", "--min-distance", "1", "--repeats", "1", "--output", str(out))
    result = json.loads(out.read_text())
    assert lines == [result] and result["same_solutions"] and result["k"] == 3
    assert set(result["seconds"]) == {"ctprune", "presolve off", "HiGHS defaults", "presolve off, heuristics on"}


def multi30k_shaped(folder: Path, sentences: int = 64) -> Path:
    """A Multi30k-named folder (train, test_2016_flickr) filled with synthetic sentence pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train"), ("test", "test_2016_flickr")):
        data = load_split("synthetic", split)
        (folder / f"{name}.de").write_text("\n".join(data.src[:sentences]) + "\n")
        (folder / f"{name}.en").write_text("\n".join(data.tgt[:sentences]) + "\n")
    return folder


def test_pruned_speed_measures_every_composed_model_against_the_origin(tmp_path: Path, model_folder: Path) -> None:
    data = multi30k_shaped(tmp_path / "data")
    out = tmp_path / "pruned_speed.json"
    lines = run_benchmark("pruned_speed.py", str(model_folder), "--data-dir", str(data), "--sentences", "8",
                          "--single", "2", "--repeats", "1", "--output", str(out))
    result = json.loads(out.read_text())
    assert lines == [result] and result["results"][0]["model"] == "origin"
    smaller = [r for r in result["results"] if r["model"].startswith("heads+ffn")]
    assert len(smaller) == 3 and all(r["flops_ratio"] < 1 and r["batched_s"] > 0 for r in smaller)


def test_tuning_cost_times_joint_and_one_at_a_time_tuning(tmp_path: Path, model_folder: Path) -> None:
    data = multi30k_shaped(tmp_path / "data")
    lines = run_benchmark("tuning_cost.py", str(model_folder), "--data-dir", str(data), "--batches", "1",
                          "--max-tokens", "256", "--experiment", str(REPO / "examples" / "demo-configs.toml"))
    result = lines[-1]
    assert result["variants"] == 28 and result["joint_s_per_batch"] > 0 and result["one_at_a_time_s_per_batch"] > 0


def test_serving_times_and_scores_every_model_on_every_engine(tmp_path: Path, model_folder: Path) -> None:
    data = multi30k_shaped(tmp_path / "data")
    out = tmp_path / "serving.json"
    lines = run_benchmark("serving.py", str(model_folder), "--data-dir", str(data), "--ratios", "0.5", "--runs", "2",
                          "--sentences", "8", "--threads", "1", "--extra", f"again={model_folder}",
                          "--output", str(out))
    result = json.loads(out.read_text())
    assert lines == [result] and result["sentences"] == 8 and result["threads"] == 1
    cells = {(r["model"], r["engine"]): r for r in result["results"]}
    assert set(cells) == {(m, e) for m in ("origin", "heads+ffn 0.5", "again")
                          for e in ("torch", "ort-fp32", "ort-int8", "ct2-int8")}
    assert cells["again", "ct2-int8"]["padded_fraction"] == cells["heads+ffn 0.5", "ct2-int8"]["padded_fraction"] == 0
    assert cells["again", "torch"]["bleu"] == cells["origin", "torch"]["bleu"]  # the same model, loaded again
    assert all(r[w]["median_ms"] > 0 and r[w]["p90_ms"] >= r[w]["median_ms"] for r in cells.values()
               for w in ("single", "batch"))
    assert cells["origin", "torch"]["single"]["speedup_vs_torch_origin"] == 1.0
    for r in cells.values():  # components: one step alone, then the mean later step
        for w in ("single", "batch"):
            assert 0 < r[w]["encoder_and_first_step_ms"] < r[w]["median_ms"] and r[w]["later_step_ms"] is not None
    # fp32 ONNX Runtime emits PyTorch's tokens, so its translations and BLEU are the same
    assert cells["origin", "ort-fp32"]["same_as_torch"] == 1.0
    assert cells["origin", "ort-fp32"]["bleu"] == cells["origin", "torch"]["bleu"]


def test_ort_batched_times_both_spinning_settings_and_profiles_each_engine(tmp_path: Path,
                                                                           model_folder: Path) -> None:
    data = multi30k_shaped(tmp_path / "data")
    out = tmp_path / "ort-batched.json"
    lines = run_benchmark("ort_batched.py", str(model_folder), "--data-dir", str(data), "--runs", "2",
                          "--threads", "1", "--output", str(out))
    result = json.loads(out.read_text())
    assert lines and lines[0]["runs"] == 2 and result["batch"] == 32 and result["steps"] > 0
    assert set(result["timings"]) == {f"{e}{part}" for e in ("torch", "ort-fp32", "ort-fp32 spinning")
                                      for part in ("", " encoder")}
    assert result["timings"]["torch"]["x_torch"] == 1.0 and result["timings"]["torch encoder"]["x_torch"] is None
    for engine in ("ort-fp32", "torch"):
        rows = result["operators"][engine]
        assert abs(sum(r["share"] for r in rows) - 1) < 0.01 and rows[0]["ms"] >= rows[-1]["ms"]
        assert "output projection" in {r["op"] for r in rows}  # found by its (batch, vocab) output


def test_serving_takes_a_hugging_face_origin(tmp_path: Path) -> None:
    """The same benchmark on a (tiny, random) MarianMT: its own generate for PyTorch, Hugging
    Face's decoding rules through ONNX Runtime, so fp32 translations equal PyTorch's."""
    from ctprune.arch.marian import marian_tokenizer
    from ctprune.data.tokenizer import Tokenizer
    from ctprune.model.checkpoint import load_model_folder, save_model_folder
    from tests.test_hf import tiny_marian

    pairs = load_split("synthetic", "train")
    proto = Tokenizer.train(pairs.src + pairs.tgt, 300).proto
    tok = marian_tokenizer(proto, tmp_path / "hf")
    tiny_marian(vocab=len(tok)).save_pretrained(str(tmp_path / "hf"))
    model, tok, hparams = load_model_folder(tmp_path / "hf")
    save_model_folder(tmp_path / "marian", model, tok, hparams)
    data, out = multi30k_shaped(tmp_path / "data", 16), tmp_path / "serving.json"
    run_benchmark("serving.py", str(tmp_path / "marian"), "--data-dir", str(data), "--ratios", "0.5", "--runs", "2",
                  "--sentences", "8", "--threads", "1", "--output", str(out))
    cells = {(r["model"], r["engine"]): r for r in json.loads(out.read_text())["results"]}
    assert len(cells) == 8 and cells["origin", "ort-fp32"]["same_as_torch"] == 1.0
    assert cells["heads+ffn 0.5", "ct2-int8"]["padded_fraction"] == 0  # every block at 0.5: nothing to pad
