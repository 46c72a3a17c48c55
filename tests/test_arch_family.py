"""A fourth encoder-decoder family is one module plus one registration: a test-only family
("toy": ctprune's Transformer under another class, stored in its own folder layout with its own
``model_type``) is registered here and goes through plan, prune, tune-blocks, compose and evaluate
by the CLI, detected from its folders and recognised from its loaded models, without a line of
ctprune changed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ctprune import arch
from ctprune.arch import Family, arch_of, detect
from ctprune.arch.native import NativeArchitecture
from ctprune.cli import main
from ctprune.fileio import write_json
from ctprune.model.checkpoint import load_model_folder, save_model_folder
from ctprune.model.transformer import Seq2SeqTransformer

INNER = "weights"  # a toy folder keeps the native files in this subfolder


class ToyTransformer(Seq2SeqTransformer):
    """The toy family's model class (what ``arch_of`` recognises)."""


class ToyArchitecture(NativeArchitecture):
    name = "toy"
    model_class = "ToyTransformer"
    required_files = ("config.json",)

    def claims(self, folder: Path, config: dict[str, Any]) -> bool:
        return config.get("model_type") == "toy" and (folder / INNER).is_dir()

    def load(self, folder: Path, device: str | torch.device = "cpu", tokenizer: bool = True
             ) -> tuple[nn.Module, Any, dict[str, Any]]:
        model, tok, hparams = super().load(folder / INNER, device, tokenizer)
        model.__class__ = ToyTransformer  # same state, the family's own class
        return model, tok, hparams

    def save(self, folder: Path, model: nn.Module, tok: Any, hparams: dict[str, Any]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        super().save(folder / INNER, model, tok, hparams)
        write_json(folder / "config.json", {"model_type": "toy", "architectures": ["ToyTransformer"]})

    def fingerprint(self, folder: Path) -> str:
        return super().fingerprint(folder / INNER)


@pytest.fixture
def toy_family() -> Iterator[None]:
    arch.register("toy", Family(__name__, "ToyArchitecture", "ToyTransformer (model_type toy)", "toy",
                                ("ToyTransformer",)))
    yield
    arch._REGISTRY.pop("toy")
    arch._loaded.pop("toy", None)


def test_a_registered_family_runs_the_pipeline(toy_family: None, model_folder: Path, tmp_path: Path) -> None:
    native, tok, _ = load_model_folder(model_folder)
    toy = tmp_path / "toy-origin"
    ToyArchitecture().save(toy, native, tok, {"stage": "test"})
    assert detect(toy).name == "toy" and detect(model_folder).name == "ctprune"
    model, _, _ = load_model_folder(toy)
    assert type(model) is ToyTransformer and arch_of(model).name == "toy"
    assert "ToyTransformer (model_type toy)" in arch.supported()

    conf = [{"encoder.layers.0.self_attn": 0.5, "decoder.layers.1.ffn": 0.25}]
    (tmp_path / "conf.json").write_text(json.dumps(conf))
    for argv in (["plan", "-m", str(toy), "-o", str(tmp_path / "plan.json"), str(tmp_path / "conf.json")],
                 ["prune", str(toy), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "pruned")],
                 ["tune-blocks", str(toy), "--bank", str(tmp_path / "pruned"), "--corpus", "synthetic", "-e", "1",
                  "--max-tokens", "1024", "--device", "cpu", "-o", str(tmp_path / "tuned")],
                 ["compose", str(toy), "--bank", str(tmp_path / "tuned"), "-c", str(tmp_path / "conf.json"),
                  "-n", "0", "-o", str(tmp_path / "c0")]):
        assert main(argv) == 0, argv
    composed, _, _ = load_model_folder(tmp_path / "c0")  # written by the toy family's save, read back by it
    assert type(composed) is ToyTransformer and (tmp_path / "c0" / INNER).is_dir()
    assert composed.get_submodule("encoder.layers.0.self_attn").n_heads == 2
    assert composed.get_submodule("decoder.layers.1.ffn").linear1.out_features == \
        native.get_submodule("decoder.layers.1.ffn").linear1.out_features // 4
    assert main(["evaluate", str(tmp_path / "c0"), "--corpus", "synthetic", "--split", "val",
                 "-o", str(tmp_path / "eval")]) == 0
    assert len((tmp_path / "eval" / "val.greedy.en").read_text().splitlines()) == 200


def test_an_unregistered_family_is_refused_naming_the_registered_ones(model_folder: Path, tmp_path: Path) -> None:
    native, tok, _ = load_model_folder(model_folder)
    ToyArchitecture().save(tmp_path / "toy", native, tok, {"stage": "test"})
    with pytest.raises(Exception, match="model_type 'toy'.*supported: ctprune's own Transformer"):
        detect(tmp_path / "toy")
    save_model_folder(tmp_path / "plain", native, tok, {"stage": "test"})
    model, _, _ = load_model_folder(tmp_path / "plain")
    model.__class__ = ToyTransformer
    assert arch_of(model).name == "ctprune"  # an unregistered subclass is its base class's family
