"""Hugging Face origin models (tiny random MarianMT and T5, gated and plain FFN): pruning is
exact, a non-uniformly pruned model reloads into its HF class, and the pipeline's stages run on
them. Nothing is downloaded: models come from config objects, tokenizers from a sentencepiece
model trained on the synthetic corpus."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"  # also inherited by the CLI subprocesses
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from ctprune.arch import arch_of  # noqa: E402
from ctprune.data.synthetic import synthetic_corpus  # noqa: E402
from ctprune.data.tokenizer import Tokenizer  # noqa: E402
from ctprune.errors import CtpruneError  # noqa: E402
from ctprune.model.checkpoint import load_model_folder, save_model_folder  # noqa: E402

from .conftest import run_cli  # noqa: E402

T5_FFN = ("gated-gelu", "relu")


@pytest.fixture(scope="module")
def spm_proto() -> bytes:
    pairs = synthetic_corpus("train")
    return Tokenizer.train([p[0] for p in pairs] + [p[1] for p in pairs], 300).proto


def tiny_marian(vocab: int = 99, seed: int = 0):  # type: ignore[no-untyped-def]
    from transformers import MarianMTModel

    from ctprune.arch.marian import marian_config

    torch.manual_seed(seed)
    cfg = marian_config(vocab, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2,
                        dropout=0.0, max_len=64)
    cfg.init_std = 0.3  # HF's 0.02 makes every head matter too little to see the cut
    return MarianMTModel(cfg).eval()


def tiny_t5(ffn: str, vocab: int = 99, seed: int = 0):  # type: ignore[no-untyped-def]
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab, d_model=32, num_heads=4, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   feed_forward_proj=ffn, dropout_rate=0.0, relative_attention_num_buckets=8,
                   pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def batch(vocab: int = 99) -> tuple[torch.Tensor, torch.Tensor]:
    """src (3, 7) ending in EOS (3) with padding (0) in two rows; tgt_in (3, 5) starting with 0."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, vocab, (3, 7), generator=g)
    src[:, -1] = 3
    src[1, 5:] = 0
    src[2, 4:] = 0
    tgt = torch.randint(4, vocab, (3, 5), generator=g)
    tgt[:, 0] = 0
    return src, tgt


def _zero_heads(model, name: str, heads: list[int], out: str) -> None:  # type: ignore[no-untyped-def]
    w = getattr(model.get_submodule(name), out).weight  # (d, heads * hd)
    hd = w.shape[1] // 4
    for h in heads:
        w[:, h * hd:(h + 1) * hd] = 0


def _assert_cut_equals_zeroed(model, names: list[str], keep: list[int], zero) -> None:  # type: ignore[no-untyped-def]
    arch = arch_of(model)
    src, tgt = batch()
    zeroed, cut = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            zero(zeroed, name)
            arch.set_block(cut, name, arch.cut(arch.block(cut, name), torch.tensor(keep)))
        want, got = arch.logits(zeroed, src, tgt), arch.logits(cut, src, tgt)
        assert not torch.allclose(want, arch.logits(model, src, tgt), atol=1e-4)  # the cut does change the model
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert arch.generate(cut, src, 1) == arch.generate(zeroed, src, 1)  # cached decoding too
        assert arch.generate(cut, src, 2) == arch.generate(zeroed, src, 2)
    assert sum(p.numel() for p in cut.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("names", [["model.encoder.layers.0.self_attn"], ["model.decoder.layers.1.self_attn"],
                                   ["model.decoder.layers.0.encoder_attn", "model.encoder.layers.1.self_attn"]])
def test_marian_removed_heads_equal_zeroed_heads(names: list[str]) -> None:
    model = tiny_marian()
    _assert_cut_equals_zeroed(model, names, [0, 2], lambda m, n: _zero_heads(m, n, [1, 3], "out_proj"))
    cut = copy.deepcopy(model)
    arch = arch_of(cut)
    arch.set_block(cut, names[0], arch.cut(arch.block(cut, names[0]), torch.tensor([0, 2])))
    attn = cut.get_submodule(names[0])
    assert attn.num_heads == 2 and attn.q_proj.weight.shape == (16, 32) and attn.out_proj.weight.shape == (32, 16)
    assert attn.q_proj.bias.shape == (16,) and arch.units(cut)[names[0]].size == 2


def _assert_cuts_equal_zeroed(model, keep: dict[str, list[int]], out: str) -> None:  # type: ignore[no-untyped-def]
    """Each block of ``keep`` cut to its own heads (in one or two steps) equals the model with the
    other heads' output columns zeroed."""
    arch = arch_of(model)
    src, tgt = batch()
    zeroed, cut = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for name, heads in keep.items():
            _zero_heads(zeroed, name, [h for h in range(4) if h not in heads], out)
            first = arch.cut(arch.block(cut, name), torch.tensor([h for h in range(4) if h != 0 or 0 in heads]))
            kept = arch.kept_heads(first)
            arch.set_block(cut, name, arch.cut(first, torch.tensor([kept.index(h) for h in heads])))
        torch.testing.assert_close(arch.logits(cut, src, tgt), arch.logits(zeroed, src, tgt), atol=1e-5, rtol=1e-5)
        assert arch.generate(cut, src, 2) == arch.generate(zeroed, src, 2)


def test_marian_a_cut_of_a_cut_keeps_the_head_size() -> None:
    _assert_cuts_equal_zeroed(tiny_marian(), {"model.encoder.layers.0.self_attn": [1, 3],
                                              "model.decoder.layers.1.encoder_attn": [2]}, "out_proj")


@pytest.mark.parametrize("ffn", T5_FFN)
def test_t5_layers_keeping_different_heads_each_read_their_own_bias_slices(ffn: str) -> None:
    _assert_cuts_equal_zeroed(tiny_t5(ffn), {"encoder.block.0.layer.0.SelfAttention": [0, 2, 3],
                                             "encoder.block.1.layer.0.SelfAttention": [1, 3],
                                             "decoder.block.0.layer.0.SelfAttention": [3],
                                             "decoder.block.1.layer.0.SelfAttention": [0, 1]}, "o")


def test_marian_removed_neurons_equal_zeroed_neurons() -> None:
    model = tiny_marian()
    keep = list(range(0, 64, 3))
    drop = sorted(set(range(64)) - set(keep))

    def zero(m, name: str) -> None:  # type: ignore[no-untyped-def]
        m.get_submodule(name.removesuffix(".ffn")).fc2.weight[:, drop] = 0

    _assert_cut_equals_zeroed(model, ["model.encoder.layers.1.ffn", "model.decoder.layers.0.ffn"], keep, zero)


@pytest.mark.parametrize("ffn", T5_FFN)
@pytest.mark.parametrize("names", [
    ["encoder.block.0.layer.0.SelfAttention"],  # layer 0 owns the relative position bias
    ["encoder.block.1.layer.0.SelfAttention"],  # a later layer reads layer 0's bias
    ["decoder.block.0.layer.0.SelfAttention", "decoder.block.1.layer.0.SelfAttention"],
    ["decoder.block.0.layer.1.EncDecAttention", "encoder.block.0.layer.0.SelfAttention",
     "encoder.block.1.layer.0.SelfAttention"],
])
def test_t5_removed_heads_equal_zeroed_heads(ffn: str, names: list[str]) -> None:
    model = tiny_t5(ffn)
    _assert_cut_equals_zeroed(model, names, [1, 3], lambda m, n: _zero_heads(m, n, [0, 2], "o"))


def test_t5_layer0_pruning_keeps_the_shared_bias_whole() -> None:
    model = tiny_t5("relu")
    arch = arch_of(model)
    name = "encoder.block.0.layer.0.SelfAttention"
    table = model.get_submodule(name).relative_attention_bias.weight.clone()  # (buckets, 4)
    cut = arch.cut(arch.block(model, name), torch.tensor([2]))
    assert cut.n_heads == 1 and cut.inner_dim == 8 and cut.heads.tolist() == [2]
    assert torch.equal(cut.relative_attention_bias.weight, table)
    assert all(p is not cut.relative_attention_bias.weight for p in arch.tuning_parameters(cut))
    again = arch.cut(cut, torch.tensor([0]))  # a cut of a cut still names the layer's head 2
    assert again.heads.tolist() == [2]


@pytest.mark.parametrize("ffn", T5_FFN)
def test_t5_removed_neurons_equal_zeroed_neurons(ffn: str) -> None:
    model = tiny_t5(ffn)
    keep = list(range(1, 64, 4))
    drop = sorted(set(range(64)) - set(keep))

    def zero(m, name: str) -> None:  # type: ignore[no-untyped-def]
        m.get_submodule(name).wo.weight[:, drop] = 0

    names = ["encoder.block.0.layer.1.DenseReluDense", "decoder.block.1.layer.2.DenseReluDense"]
    _assert_cut_equals_zeroed(model, names, keep, zero)


def _prune_unevenly(model) -> None:  # type: ignore[no-untyped-def]
    """Different heads and widths per layer, one unit at a time, and one masked Linear."""
    from ctprune.pruning.surgery import l1_mask, mask_linear

    arch = arch_of(model)
    units = arch.units(model)
    blocks = [n for n, u in units.items() if u.kind != "linear"]
    for i, name in enumerate(blocks[:-1]):
        keep = torch.arange(i % 3, units[name].size - 1)  # e.g. heads 0-2, 1-2, 2
        arch.set_block(model, name, arch.cut(arch.block(model, name), keep))
    linear = next(n for n, u in units.items() if u.kind == "linear" and u.parent == blocks[-1])
    w = model.get_submodule(linear)
    arch.set_block(model, linear, mask_linear(w, l1_mask(w.weight, 0.3)))


@pytest.mark.parametrize("family", ["marian", "gated-gelu", "relu"])
def test_non_uniform_model_saves_and_reloads_into_its_class(family: str, tmp_path: Path) -> None:
    model = tiny_marian() if family == "marian" else tiny_t5(family)
    _prune_unevenly(model)
    arch = arch_of(model)
    sizes = {n: u.size for n, u in arch.units(model).items() if u.kind != "linear"}
    assert len(set(sizes.values())) > 2  # really non-uniform
    save_model_folder(tmp_path / "m", model, None, {"stage": "test"})
    assert not [p for p in (tmp_path / "m").iterdir() if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
    layers = json.loads((tmp_path / "m" / "ctprune_layers.json").read_text())
    assert len(layers["attention"]) + len(layers["ffn"]) == len(sizes) - 1 and len(layers["sparse_linears"]) == 1
    again, tok, hparams = load_model_folder(tmp_path / "m", tokenizer=False)
    assert type(again) is type(model) and tok is None and hparams == {"stage": "test"}
    assert {n: u.size for n, u in arch.units(again).items() if u.kind != "linear"} == sizes
    src, tgt = batch()
    with torch.no_grad():
        torch.testing.assert_close(arch.logits(again, src, tgt), arch.logits(model, src, tgt), atol=0, rtol=0)
    for beam in (1, 3):
        a = again.generate(input_ids=src, attention_mask=src.ne(0), num_beams=beam, max_new_tokens=12, do_sample=False)
        b = model.generate(input_ids=src, attention_mask=src.ne(0), num_beams=beam, max_new_tokens=12, do_sample=False)
        assert torch.equal(a, b)
    masked = again.get_submodule(layers["sparse_linears"][0])
    assert int((masked.weight != 0).sum()) == int(masked.weight_mask.sum()) < masked.weight.numel()


@pytest.fixture(scope="module")
def marian_folder(spm_proto: bytes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face folder as a user brings one (save_pretrained): tiny random MarianMT with a
    Marian tokenizer over the synthetic corpus's sentencepiece model."""
    from ctprune.arch.marian import marian_tokenizer

    folder = tmp_path_factory.mktemp("hf") / "marian"
    tok = marian_tokenizer(spm_proto, folder)
    model = tiny_marian(vocab=len(tok))
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def t5_folder(spm_proto: bytes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ctprune.arch.t5 import t5_tokenizer

    folder = tmp_path_factory.mktemp("hf") / "t5"
    tok = t5_tokenizer(spm_proto, folder)
    tiny_t5("gated-gelu", vocab=len(tok)).save_pretrained(str(folder))
    return folder


CONFS = [{"model.encoder.layers.0.self_attn": 0.5, "model.decoder.layers.1.encoder_attn": 0.25,
          "model.encoder.layers.1.ffn": 0.25, "model.decoder.layers.0.fc1": 0.2},
         {"model.encoder.layers.0.self_attn": 0.75, "model.decoder.layers.1.encoder_attn": 0.25,
          "model.decoder.layers.0.ffn": 0.5, "model.decoder.layers.1.self_attn.q_proj": 0.5}]


@pytest.fixture(scope="module")
def marian_banks(marian_folder: Path, small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from ctprune.stages.configs import PlanArgs, write_plan
    from ctprune.stages.prune import PruneArgs, prune
    from ctprune.stages.tune_blocks import TuneArgs, tune_blocks

    d = tmp_path_factory.mktemp("marian-banks")
    (d / "conf.json").write_text(json.dumps(CONFS))
    write_plan(PlanArgs(configurations=d / "conf.json", model=marian_folder, output=d / "plan.json"))
    prune(PruneArgs(model=marian_folder, output=d / "pruned", plan=d / "plan.json"))
    tune_blocks(TuneArgs(model=marian_folder, bank=d / "pruned", output=d / "tuned", epochs=2, corpus="folder:de-en",
                         data_dir=str(small_corpus), lr=2e-3, max_tokens=1024, device="cpu"))
    return {"dir": d, "conf": d / "conf.json", "pruned": d / "pruned", "tuned": d / "tuned"}


def test_marian_tune_blocks_lowers_every_variant_block_loss(marian_banks: dict[str, Path]) -> None:
    from ctprune.pruning.bank import load_index
    from ctprune.training.history import read_history

    index = load_index(marian_banks["tuned"])
    assert len(index["variants"]) == 7
    rows = read_history(marian_banks["tuned"] / "history.csv")
    for key, v in index["variants"].items():
        losses = {int(r["epoch"]): float(r["val_loss"]) for r in rows if r["variant"] == key}
        assert min(losses[e] for e in losses if e > 0) < losses[0], key
        assert v["provenance"]["stage"] == "tuned"
    assert index["tuning"]["train_flops"] > 0


def test_marian_compose_finetune_evaluate_translate(marian_folder: Path, marian_banks: dict[str, Path],
                                                    small_corpus: Path, tmp_path: Path) -> None:
    from ctprune.stages.compose import ComposeArgs, compose_to_folder
    from ctprune.stages.evaluate import EvaluateArgs, evaluate
    from ctprune.stages.finetune import FinetuneArgs, finetune
    from ctprune.training.loop import Recipe

    out = compose_to_folder(ComposeArgs(model=marian_folder, bank=marian_banks["tuned"],
                                        configurations=marian_banks["conf"], n=0, output=tmp_path / "c0"))
    model, tok, hp = load_model_folder(out)
    assert type(model).__name__ == "MarianMTModel" and hp["configuration_index"] == 0
    assert model.model.encoder.layers[0].self_attn.num_heads == 2
    assert model.model.decoder.layers[1].encoder_attn.num_heads == 1
    assert model.model.encoder.layers[1].fc1.out_features == 16
    fc1 = model.model.decoder.layers[0].fc1
    assert int((fc1.weight != 0).sum()) == int(0.2 * fc1.weight.numel() + 0.5)
    recipe = Recipe.finetune(epochs=1, lr=1e-3, max_tokens=1024)
    result = finetune(FinetuneArgs(model=marian_folder, bank=marian_banks["tuned"], configurations=marian_banks["conf"],
                                   n=1, output=tmp_path / "f1", recipe=recipe, target_bleu=None, corpus="folder:de-en",
                                   data_dir=str(small_corpus), device="cpu"))
    assert result.epochs_done == 1 and (tmp_path / "f1" / "history.csv").is_file()
    tuned, _, _ = load_model_folder(tmp_path / "f1")
    q = tuned.model.decoder.layers[1].self_attn.q_proj
    assert int((q.weight != 0).sum()) == int(q.weight_mask.sum()) == q.weight.numel() // 2  # the mask held
    report = evaluate(EvaluateArgs(model=tmp_path / "f1", corpus="synthetic", split="test", device="cpu", quiet=True))
    assert report["sentences"] == 200 and 0 <= report["bleu"] <= 100
    r = run_cli("translate", str(tmp_path / "f1"), stdin="der Mann sieht einen Hund .\nheute schläft die Katze .\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2


def _one_line_error(call, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CtpruneError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


def test_unsupported_folders_are_refused_naming_what_is_supported(marian_folder: Path, tmp_path: Path) -> None:
    from ctprune.stages.configs import InspectArgs, inspect_model

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a model\n")
    bart = tmp_path / "bart"
    bart.mkdir()
    (bart / "config.json").write_text(json.dumps({"model_type": "bart",
                                                  "architectures": ["BartForConditionalGeneration"]}))
    encoder_only = tmp_path / "t5enc"
    encoder_only.mkdir()
    (encoder_only / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5EncoderModel"]}))
    pickled = tmp_path / "pickled"
    shutil.copytree(marian_folder, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    supported = "supported: ctprune's own Transformer, MarianMTModel .*T5ForConditionalGeneration"
    _one_line_error(lambda: inspect_model(InspectArgs(model=junk)),
                    "not a ctprune model folder nor a supported Hugging Face model.*" + supported)
    _one_line_error(lambda: inspect_model(InspectArgs(model=bart)),
                    "BartForConditionalGeneration .*does not support; " + supported)
    _one_line_error(lambda: inspect_model(InspectArgs(model=encoder_only)),
                    "T5EncoderModel model; ctprune supports T5ForConditionalGeneration")
    _one_line_error(lambda: inspect_model(InspectArgs(model=pickled)),
                    "only pytorch_model.bin .*reads safetensors only")
    r = run_cli("inspect", str(bart))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "MarianMTModel" in r.stderr


def test_configuration_of_another_architecture_is_refused(marian_folder: Path, model_folder: Path,
                                                          tmp_path: Path) -> None:
    from ctprune.stages.configs import PlanArgs, write_plan

    (tmp_path / "native.json").write_text(json.dumps([{"encoder.layers.0.self_attn": 0.5}]))
    _one_line_error(lambda: write_plan(PlanArgs(configurations=tmp_path / "native.json", model=marian_folder,
                                                output=tmp_path / "p.json")),
                    "unknown module 'encoder.layers.0.self_attn'")
    (tmp_path / "marian.json").write_text(json.dumps(CONFS))
    _one_line_error(lambda: write_plan(PlanArgs(configurations=tmp_path / "marian.json", model=model_folder,
                                                output=tmp_path / "p.json")),
                    "unknown module 'model.encoder.layers.0.self_attn'")
    assert not (tmp_path / "p.json").exists()


def test_folder_without_tokenizer_serves_the_commands_that_need_no_text(marian_folder: Path,
                                                                        marian_banks: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    from ctprune.stages.compose import ComposeArgs, compose_to_folder
    from ctprune.stages.configs import ConfigsArgs, InspectArgs, PlanArgs, inspect_model, write_configs, write_plan
    from ctprune.stages.evaluate import EvaluateArgs, evaluate
    from ctprune.stages.prune import PruneArgs, prune
    from ctprune.stages.tune_blocks import TuneArgs, tune_blocks

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copyfile(marian_folder / f, bare / f)
    assert any("model.decoder.layers.1.encoder_attn" in line and "4 heads" in line
               for line in inspect_model(InspectArgs(model=bare)))
    confs = write_configs(ConfigsArgs(model=bare, n=2, output=tmp_path / "conf.json", attention=[0.5, 0.25],
                                      ffn=[0.5, 0.75]))
    assert confs[1]["model.decoder.layers.0.encoder_attn"] == 0.25 and confs[0]["model.encoder.layers.1.ffn"] == 0.5
    write_plan(PlanArgs(configurations=tmp_path / "conf.json", model=bare, output=tmp_path / "plan.json"))
    prune(PruneArgs(model=bare, output=tmp_path / "bank", plan=tmp_path / "plan.json", criterion="l1"))
    out = compose_to_folder(ComposeArgs(model=bare, bank=tmp_path / "bank", configurations=tmp_path / "conf.json", n=1,
                                        output=tmp_path / "c1"))
    model, tok, _ = load_model_folder(out, tokenizer=False)
    assert tok is None and model.model.decoder.layers[0].encoder_attn.num_heads == 1
    _one_line_error(lambda: evaluate(EvaluateArgs(model=bare, corpus="synthetic", split="test", quiet=True)),
                    "has no tokenizer")
    assert not (bare / "eval").exists()
    _one_line_error(lambda: tune_blocks(TuneArgs(model=bare, bank=marian_banks["pruned"], output=tmp_path / "tuned",
                                                 epochs=1, corpus="synthetic")), "has no tokenizer")
    assert not (tmp_path / "tuned").exists()
    _one_line_error(lambda: prune(PruneArgs(model=bare, output=tmp_path / "b2", ratio=0.5, criterion="activation",
                                            corpus="synthetic")),
                    "has no tokenizer")


def test_train_arch_marian_builds_and_trains_a_marian_of_the_preset(small_corpus: Path, tmp_path: Path) -> None:
    r = run_cli("train", "--arch", "marian", "--preset", "tiny", "--corpus", "folder:de-en", "--data-dir",
                str(small_corpus), "-e", "1", "-o", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    model, tok, hp = load_model_folder(tmp_path / "m")
    cfg = model.config
    assert type(model).__name__ == "MarianMTModel" and hp["arch"] == "marian" and hp["epoch"] == 1
    assert (cfg.d_model, cfg.encoder_attention_heads, cfg.encoder_ffn_dim, cfg.encoder_layers) == (64, 4, 128, 2)
    assert tok.vocab_size == cfg.vocab_size and (tmp_path / "m" / "source.spm").is_file()
    r = run_cli("translate", str(tmp_path / "m"), stdin="der Mann sieht einen Hund .\n")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1, r.stderr


def test_t5_prune_tune_compose_evaluate(t5_folder: Path, small_corpus: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from ctprune.pruning.bank import load_index
    from ctprune.stages.compose import ComposeArgs, compose_to_folder
    from ctprune.stages.configs import PlanArgs, write_plan
    from ctprune.stages.evaluate import EvaluateArgs, evaluate
    from ctprune.stages.prune import PruneArgs, prune
    from ctprune.stages.tune_blocks import TuneArgs, tune_blocks
    from ctprune.training.history import read_history

    layer0 = "encoder.block.0.layer.0.SelfAttention"
    confs = [{layer0: 0.5, "decoder.block.1.layer.1.EncDecAttention": 0.25,
              "encoder.block.1.layer.1.DenseReluDense": 0.5, "decoder.block.0.layer.2.DenseReluDense.wo": 0.5}]
    (tmp_path / "conf.json").write_text(json.dumps(confs))
    write_plan(PlanArgs(configurations=tmp_path / "conf.json", model=t5_folder, output=tmp_path / "plan.json"))
    prune(PruneArgs(model=t5_folder, output=tmp_path / "pruned", plan=tmp_path / "plan.json", criterion="l1"))
    tune_blocks(TuneArgs(model=t5_folder, bank=tmp_path / "pruned", output=tmp_path / "tuned", epochs=1,
                         corpus="folder:de-en", data_dir=str(small_corpus), lr=2e-3, max_tokens=1024, device="cpu"))
    rows = read_history(tmp_path / "tuned" / "history.csv")
    index = load_index(tmp_path / "tuned")
    for key in index["variants"]:
        losses = {int(r["epoch"]): float(r["val_loss"]) for r in rows if r["variant"] == key}
        assert losses[1] < losses[0], key
    origin, _, _ = load_model_folder(t5_folder)
    variant = load_file(str(tmp_path / "tuned" / index["variants"][f"{layer0}@0.5"]["file"]))
    table = variant["relative_attention_bias.weight"]  # tuned around, never itself: later layers read it
    torch.testing.assert_close(table, origin.get_submodule(layer0).relative_attention_bias.weight, atol=0, rtol=0)
    out = compose_to_folder(ComposeArgs(model=t5_folder, bank=tmp_path / "tuned", configurations=tmp_path / "conf.json",
                                        n=0, output=tmp_path / "c0"))
    model, _, _ = load_model_folder(out)
    assert model.get_submodule(layer0).n_heads == 2 and len(model.get_submodule(layer0).heads) == 2
    data = tmp_path / "data"  # the user's own files: SPLIT.SRC / SPLIT.TGT
    data.mkdir()
    for lang, side in (("de", 0), ("en", 1)):
        (data / f"test.{lang}").write_text("".join(p[side] + "\n" for p in synthetic_corpus("test")[:50]),
                                           encoding="utf-8")
    report = evaluate(EvaluateArgs(model=out, corpus="folder:de-en", data_dir=str(data), split="test", beam=2,
                                   device="cpu", quiet=True))
    assert report["sentences"] == 50 and report["decoder"] == "beam2"


def test_marian_grid_bank_scores_and_search(marian_folder: Path, tmp_path: Path) -> None:
    from ctprune.pruning.bank import compose, load_index
    from ctprune.pruning.configs import load_configurations, prunable_modules
    from ctprune.stages.prune import PruneArgs, prune
    from ctprune.stages.score import ScoreArgs, score_bank
    from ctprune.stages.search import SearchArgs, parse_budget, search

    prune(PruneArgs(model=marian_folder, output=tmp_path / "grid", grid=[0.5], kinds=("attention", "ffn")))
    scores = score_bank(ScoreArgs(model=marian_folder, bank=tmp_path / "grid", corpus="synthetic", batches=2,
                                  max_tokens=1024, latency=True, latency_repeats=1, device="cpu"))
    assert scores["scored"] == 10 and all(v["kl"] >= 0 for v in scores["variants"].values())
    assert "origin_ms" in scores["latency"]
    problem, report = search(SearchArgs(model=marian_folder, bank=tmp_path / "grid", output=tmp_path / "conf.json",
                                        budgets=(parse_budget("flops", "0.9"),), k=2, min_distance=1))
    assert report["solver"]["found"] >= 1 and report["configurations"][0]["flops_fraction"] <= 0.9
    origin, _, _ = load_model_folder(marian_folder)
    conf = load_configurations(tmp_path / "conf.json", prunable_modules(origin))[0]
    model = compose(origin, tmp_path / "grid", conf, load_index(tmp_path / "grid"))
    assert arch_of(model).forward_flops(model, 12, 12) <= 0.9 * arch_of(origin).forward_flops(origin, 12, 12)


def test_early_t5_checkpoints_name_the_same_class(t5_folder: Path, tmp_path: Path) -> None:
    from ctprune.stages.configs import InspectArgs, inspect_model

    old = tmp_path / "t5-old"
    shutil.copytree(t5_folder, old)
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "architectures": ["T5WithLMHeadModel"]}))
    assert "decoder.block.1.layer.1.EncDecAttention" in "\n".join(inspect_model(InspectArgs(model=old)))


@pytest.mark.parametrize("family", ["marian", "t5"])
def test_activation_criterion_on_hf_models(family: str, marian_folder: Path, t5_folder: Path,
                                           tmp_path: Path) -> None:
    from ctprune.pruning.bank import load_index
    from ctprune.stages.prune import PruneArgs, prune

    folder = marian_folder if family == "marian" else t5_folder
    prune(PruneArgs(model=folder, output=tmp_path / "bank", ratio=0.5, criterion="activation", corpus="synthetic",
                    calibration_batches=2))
    index = load_index(tmp_path / "bank")
    blocks = [v for v in index["variants"].values() if v["kind"] != "linear"]
    assert len(blocks) == 10 and all(len(v["scores"]) == v["of"] and v["size"] == v["of"] // 2 for v in blocks)
    assert all(max(v["scores"]) > min(v["scores"]) >= 0 for v in blocks)


@pytest.mark.parametrize("origin", ["given", "trained"])
def test_run_end_to_end_on_a_marian_origin(origin: str, marian_folder: Path, small_corpus: Path,
                                           tmp_path: Path) -> None:
    """`ctprune run` with a Hugging Face origin, given as a folder or trained by the run
    ([origin] arch = "marian"): both sides finetuned under the protocol, the describe and latency
    jobs through the architecture seam, a report."""
    from ctprune.run.graph import run_experiment

    exp = tmp_path / "exp.toml"
    given = f'model = "{marian_folder}"' if origin == "given" else 'arch = "marian"\nepochs = 1'
    exp.write_text(f"""
[data]
corpus = "folder:de-en"
data_dir = "{small_corpus}"
[origin]
preset = "tiny"
{given}
[configurations]
attention = [0.5]
[tuning]
epochs = 1
lr = 2e-3
[finetuning]
epochs = 1
lr = 1e-3
target_bleu = "none"
""")
    run_experiment(exp, tmp_path / "run")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    if origin == "trained":
        model, _, hp = load_model_folder(tmp_path / "run" / "origin", tokenizer=False)
        assert type(model).__name__ == "MarianMTModel" and hp["arch"] == "marian" and hp["epoch"] == 1
    c = s["configurations"][0]
    assert 0 < c["flops_ratio"] < 1 and c["params"] < s["origin"]["params"] and c["latency"]["ratio"] > 0
    for side in ("baseline", "composed"):  # no target: both sides train the cap of one epoch
        r = s["runs"][0]["configurations"][0][side]
        assert r["epochs_to_target"] == 1 and r["epochs_trained"] == 1 and set(r["test_bleu_best"]) == {"test"}
    assert (tmp_path / "run" / "report.html").is_file()


def test_t5_task_prefix_from_the_folder_goes_before_every_source_and_stays_with_derived_models(
        t5_folder: Path, tmp_path: Path) -> None:
    from ctprune.stages.compose import ComposeArgs, compose_to_folder

    folder = tmp_path / "t5"
    shutil.copytree(t5_folder, folder)
    prefix = "translate German to English: "
    (folder / "hparams.json").write_text(json.dumps({"source_prefix": prefix}))  # as a user writes it
    _, tok, _ = load_model_folder(folder)
    assert tok.encode(["ein Hund"]) == tok.hf([prefix + "ein Hund"], add_special_tokens=False)["input_ids"]
    assert tok.encode(["ein Hund"]) != tok.hf(["ein Hund"], add_special_tokens=False)["input_ids"]
    assert tok.encode_target(["a dog"]) == tok.hf(text_target=["a dog"], add_special_tokens=False)["input_ids"]
    (tmp_path / "conf.json").write_text(json.dumps([{"encoder.block.0.layer.0.SelfAttention": 0.5}]))
    out = compose_to_folder(ComposeArgs(model=folder, bank=_t5_bank(folder, tmp_path),
                                        configurations=tmp_path / "conf.json", n=0, output=tmp_path / "c0"))
    _, composed_tok, _ = load_model_folder(out)
    assert composed_tok.source_prefix == prefix
    (folder / "hparams.json").write_text(json.dumps({"source_prefix": 3}))
    with pytest.raises(CtpruneError, match="source_prefix must be a string"):
        load_model_folder(folder)


def _t5_bank(folder: Path, tmp_path: Path) -> Path:
    from ctprune.stages.configs import PlanArgs, write_plan
    from ctprune.stages.prune import PruneArgs, prune

    write_plan(PlanArgs(configurations=tmp_path / "conf.json", model=folder, output=tmp_path / "plan.json"))
    prune(PruneArgs(model=folder, output=tmp_path / "pruned", plan=tmp_path / "plan.json", criterion="l1"))
    return tmp_path / "pruned"


@pytest.mark.parametrize("kind, value, fragment", [
    ("attention", [0, 0], "expected distinct head indices in 0..3"),
    ("attention", [7], "expected distinct head indices in 0..3"),
    ("attention", [], "expected distinct head indices"),
    ("attention", [True], "expected distinct head indices"),
    ("ffn", 0, "expected an integer in 1..64"),
    ("ffn", "16", "expected an integer in 1..64"),
])
def test_per_layer_sizes_out_of_range_are_refused_in_one_line(kind: str, value: object, fragment: str,
                                                               tmp_path: Path) -> None:
    model = tiny_marian()
    _prune_unevenly(model)
    save_model_folder(tmp_path / "m", model, None, {"stage": "test"})
    (tmp_path / "m" / "manifest.json").unlink()  # as a hand-made folder: nothing but the sizes file to trust
    path = tmp_path / "m" / "ctprune_layers.json"
    layers = json.loads(path.read_text())
    name = next(iter(layers[kind]))
    layers[kind][name] = value
    path.write_text(json.dumps(layers))
    with pytest.raises(CtpruneError, match=fragment):
        load_model_folder(tmp_path / "m", tokenizer=False)


# ------------------------------------------------------------------------------------------------
# Issue 25: weights that do not fit their config, edited configs, absurd sizes, out-of-range ids.


def _hf_copy(folder: Path, tmp_path: Path, edit=None, name: str = "m") -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path / name
    shutil.copytree(folder, out)
    if edit is not None:
        edit(out)
    return out


def _drop_tensors(fragment: str):  # type: ignore[no-untyped-def]
    def edit(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / "model.safetensors"))
        save_file({k: v for k, v in tensors.items() if fragment not in k}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
    return edit


def _add_tensor(name: str):  # type: ignore[no-untyped-def]
    def edit(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / "model.safetensors"))
        save_file({**tensors, name: torch.zeros(2, 2)}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return edit


def _set_json(file: str, **values: object):  # type: ignore[no-untyped-def]
    def edit(folder: Path) -> None:
        path = folder / file
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
    return edit


@pytest.mark.parametrize("edit, fragment", [
    (_drop_tensors("encoder.layers.0."), "describes a MarianMTModel of at least"),  # fewer stored than it needs
    (_drop_tensors("encoder.layers.0.fc1.bias"),
     "do not fit its config.json (MarianMTModel): tensors 1 missing (e.g. model.encoder.layers.0.fc1.bias)"),
    (_add_tensor("model.encoder.layers.9.fc1.weight"),
     "do not fit its config.json (MarianMTModel): tensors 1 unexpected (e.g. model.encoder.layers.9.fc1.weight)"),
    (_set_json("config.json", encoder_layers=100_000), "describes a MarianMTModel of at least"),
    (_set_json("config.json", d_model=2**20, encoder_attention_heads=4), "describes a MarianMTModel of at least"),
    (_set_json("config.json", max_position_embeddings=10**9), "a position table of 1000000000 entries"),
    (_set_json("generation_config.json", eos_token_id=10**6), "eos_token_id 1000000 is not a token id"),
    (_set_json("generation_config.json", bad_words_ids=[[1]], decoder_start_token_id=-3),
     "decoder_start_token_id -3 is not a token id"),
    (_set_json("config.json", pad_token_id=10**6), "pad_token_id 1000000 is not a token id"),
    (lambda f: (f / "generation_config.json").write_text("[" * 100_000 + "]" * 100_000), "nests deeper than 32"),
    (lambda f: (f / "config.json").write_text('{"model_type": "marian", "model_type": "t5"}'), "appears twice"),
])
def test_hf_folder_that_does_not_fit_is_refused_in_one_line(marian_folder: Path, tmp_path: Path, edit,  # type: ignore[no-untyped-def]
                                                            fragment: str) -> None:
    folder = _hf_copy(marian_folder, tmp_path, edit)
    _one_line_error(lambda: load_model_folder(folder), re.escape(fragment))


def test_t5_config_over_marian_weights_is_refused(marian_folder: Path, t5_folder: Path, tmp_path: Path) -> None:
    folder = _hf_copy(marian_folder, tmp_path, lambda f: shutil.copy(t5_folder / "config.json", f / "config.json"))
    _one_line_error(lambda: load_model_folder(folder), r"do not fit its config.json \(T5ForConditionalGeneration\)")
    r = run_cli("evaluate", str(folder), "--corpus", "synthetic", "--split", "val")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("file, values", [("config.json", {"eos_token_id": 5}),
                                          ("generation_config.json", {"eos_token_id": 5})])
def test_an_edited_config_of_a_saved_hf_folder_is_detected(marian_folder: Path, tmp_path: Path, file: str,
                                                           values: dict[str, object]) -> None:
    model, tok, hparams = load_model_folder(marian_folder)
    save_model_folder(tmp_path / "saved", model, tok, hparams)
    load_model_folder(tmp_path / "saved")  # as written: accepted
    _set_json(file, **values)(tmp_path / "saved")
    _one_line_error(lambda: load_model_folder(tmp_path / "saved"), f"{file} .*altered or swapped")


def test_transformers_bars_are_off_when_stderr_is_not_a_terminal() -> None:
    from transformers.utils import logging

    from ctprune.arch.hf import quiet_transformers

    assert logging.is_progress_bar_enabled()
    with quiet_transformers():  # pytest captures stderr: not a terminal
        assert not logging.is_progress_bar_enabled()
    assert logging.is_progress_bar_enabled()
