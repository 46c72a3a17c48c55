"""Serving a MarianMT and a T5 pruned unevenly through ONNX Runtime: per-layer graphs, exactness
against the Hugging Face model (step logits, greedy and beam-4 token ids), the CLI, --optimize and
int8, and refused requests. Tiny random models from config objects: nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from ctprune.arch import arch_of  # noqa: E402
from ctprune.cli import main  # noqa: E402
from ctprune.data.batching import pad  # noqa: E402
from ctprune.data.synthetic import synthetic_corpus  # noqa: E402
from ctprune.errors import CtpruneError  # noqa: E402
from ctprune.model import decode  # noqa: E402
from ctprune.model.checkpoint import load_model_folder, save_model_folder  # noqa: E402
from ctprune.serve.engines import translate_served  # noqa: E402
from ctprune.serve.export import ExportArgs, export  # noqa: E402
from ctprune.serve.ort import OrtSeq2Seq  # noqa: E402

FAMILIES = ("marian", "t5")
PREFIX = "translate German to English: "
SENTENCES = [p[0] for p in synthetic_corpus("test")[:6]]
# Per-layer cuts (kept heads of 4, FFN widths of 64): every block a different size; T5's layer 0
# (which owns the shared bias table) keeps heads 1-3, so later layers read other slices than it adds.
CUTS = {
    "marian": {"model.encoder.layers.0.self_attn": [0, 2, 3], "model.encoder.layers.1.self_attn": [1],
               "model.decoder.layers.0.self_attn": [3], "model.decoder.layers.1.self_attn": [0, 1, 2],
               "model.decoder.layers.0.encoder_attn": [1, 2], "model.decoder.layers.1.encoder_attn": [0, 3],
               "model.encoder.layers.1.ffn": 20, "model.decoder.layers.0.ffn": 9},
    "t5": {"encoder.block.0.layer.0.SelfAttention": [1, 2, 3], "encoder.block.1.layer.0.SelfAttention": [0, 2],
           "decoder.block.0.layer.0.SelfAttention": [2], "decoder.block.1.layer.0.SelfAttention": [0, 1, 3],
           "decoder.block.0.layer.1.EncDecAttention": [1, 2], "decoder.block.1.layer.1.EncDecAttention": [3],
           "encoder.block.0.layer.1.DenseReluDense": 20, "decoder.block.1.layer.2.DenseReluDense": 9},
}


def _tiny_t5(vocab: int):  # type: ignore[no-untyped-def]
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=vocab, d_model=32, num_heads=4, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0, relative_attention_num_buckets=8,
                   pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(cfg).eval()
    # This random T5 emits PAD at every step (then dropped: empty translations); banned, as Marian
    # checkpoints ban it, it translates into long sequences, and the ban itself is checked.
    model.generation_config.bad_words_ids = [[0]]
    return model


@pytest.fixture(scope="module")
def spm_proto() -> bytes:
    from ctprune.data.tokenizer import Tokenizer

    pairs = synthetic_corpus("train")
    return Tokenizer.train([p[0] for p in pairs] + [p[1] for p in pairs], 300).proto


@pytest.fixture(scope="module", params=FAMILIES)
def pruned(request: pytest.FixtureRequest, spm_proto: bytes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random MarianMT / T5 with its tokenizer, pruned unevenly by ctprune and saved."""
    from tests.test_hf import tiny_marian

    family = request.param
    d = tmp_path_factory.mktemp(family)
    if family == "marian":
        from ctprune.arch.marian import marian_tokenizer

        model = tiny_marian(vocab=len(marian_tokenizer(spm_proto, d / "origin")))
        # As Helsinki-NLP's opus-mt checkpoints: PAD banned, log-probabilities renormalized after it.
        model.generation_config.bad_words_ids = [[model.config.pad_token_id]]
        model.generation_config.renormalize_logits = True
    else:
        from ctprune.arch.t5 import t5_tokenizer

        model = _tiny_t5(len(t5_tokenizer(spm_proto, d / "origin")))
    model.save_pretrained(str(d / "origin"))
    model, tok, hparams = load_model_folder(d / "origin")
    if family == "t5":  # T5's task prefix goes before every source, in PyTorch and in the served model
        hparams = {**hparams, "source_prefix": PREFIX}
    arch = arch_of(model)
    for name, keep in CUTS[family].items():
        idx = torch.tensor(keep) if isinstance(keep, list) else torch.arange(keep)
        arch.set_block(model, name, arch.cut(arch.block(model, name), idx))
    save_model_folder(d / "pruned", model, tok, hparams)
    return d / "pruned"


@pytest.fixture(scope="module")
def onnx_fp32(pruned: Path) -> Path:
    """Exported through the CLI."""
    out = pruned.parent / "onnx"
    assert main(["export", str(pruned), "--format", "onnx", "-o", str(out)]) == 0
    return out


def _src(tok: object) -> torch.Tensor:
    return pad([s + [tok.eos_id] for s in tok.encode(SENTENCES)], tok.pad_id)  # type: ignore[attr-defined]


def test_export_writes_per_layer_graphs_and_the_tokenizer(pruned: Path, onnx_fp32: Path) -> None:
    model, _, _ = load_model_folder(pruned)
    family = arch_of(model).name
    info = json.loads((onnx_fp32 / "graphs.json").read_text())
    assert info["architecture"] == family and info["precision"] == "fp32" and info["format"] == "ctprune-onnx/1"
    self_heads, cross_heads = ([1, 3], [2, 2]) if family == "marian" else ([1, 3], [2, 1])
    assert info["decoder_self_heads"] == self_heads and info["decoder_cross_heads"] == cross_heads
    assert info["layers"]["attention"]  # the per-layer sizes of ctprune_layers.json
    dec = {v["name"]: v["shape"] for v in info["graphs"]["decoder_step"]["inputs"]}
    assert dec["past.0.key"] == ["batch", self_heads[0], "past_len", 8]
    assert dec["past.1.value"] == ["batch", self_heads[1], "past_len", 8]
    assert dec["cross.1.key"] == ["batch", cross_heads[1], "src_len", 8]
    assert dec["input_ids"] == ["batch", 1]
    wanted = {"source.spm", "target.spm", "vocab.json"} if family == "marian" else {"tokenizer.json"}
    assert wanted <= set(info["tokenizer_files"])
    for f in info["tokenizer_files"]:
        assert (onnx_fp32 / f).read_bytes() == (pruned / f).read_bytes()
    manifest = json.loads((onnx_fp32 / "manifest.json").read_text())
    assert set(manifest["files"]) == {"encoder.onnx", "decoder_step.onnx", "config.json", "graphs.json",
                                      *info["tokenizer_files"]}
    assert info["generation"]["forced_eos"] is (family == "marian")
    assert info["generation"]["suppressed"] == [0]
    assert info["generation"]["renormalize"] is (family == "marian")
    assert info["source_prefix"] == ("" if family == "marian" else PREFIX)
    assert OrtSeq2Seq(onnx_fp32).tokenizer.source_prefix == info["source_prefix"]


def test_fp32_step_logits_and_token_ids_match_pytorch(pruned: Path, onnx_fp32: Path) -> None:
    """Teacher-forced step logits of a padded batch within 1e-4 of the Hugging Face model's; greedy
    and beam-4 token ids identical to ``arch.generate``'s, and batched translations too."""
    model, tok, _ = load_model_folder(pruned)
    arch = arch_of(model)
    eng = OrtSeq2Seq(onnx_fp32, threads=1)
    src = _src(tok)
    g = torch.Generator().manual_seed(0)
    tgt = torch.randint(4, model.config.vocab_size, (src.shape[0], 10), generator=g)
    tgt[:, 0] = model.config.decoder_start_token_id
    mask, cross = eng.encode(src)
    past = eng.empty_past(src.shape[0])
    worst = 0.0
    with torch.no_grad():
        full = arch.logits(model, src, tgt)  # (B, T, V), no cache
        for t in range(tgt.shape[1]):
            logits, past = eng.step(tgt[:, t:t + 1], mask, past, cross)
            worst = max(worst, (logits - full[:, t]).abs().max().item())
        greedy, beam4 = arch.generate(model, src, 1), arch.generate(model, src, 4)
    print(f"{arch.name} fp32 max |step logit diff| over 10 steps: {worst:.2e}")
    assert worst < 1e-4
    assert eng.generate(src) == greedy
    assert eng.generate(src, 4) == beam4
    lengths = [len(h) for h in greedy + beam4]
    assert max(lengths) >= 5  # the comparison covers many steps
    if arch.name == "marian":  # and finished hypotheses (the random T5 never emits EOS)
        assert min(lengths) < max(lengths)
    assert translate_served(eng, SENTENCES, beam=4, batch_size=4) == decode.translate(model, tok, SENTENCES, beam=4,
                                                                                      batch_size=4)


def test_cli_translate_and_evaluate_through_onnxruntime(pruned: Path, onnx_fp32: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    model, tok, _ = load_model_folder(pruned)
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(SENTENCES) + "\n"))
    assert main(["translate", str(onnx_fp32), "--engine", "onnxruntime", "--beam", "4"]) == 0
    assert capsys.readouterr().out.splitlines() == decode.translate(model, tok, SENTENCES, beam=4)
    reports = {}
    for engine, folder in (("torch", pruned), ("onnxruntime", onnx_fp32)):
        out = tmp_path / engine
        assert main(["evaluate", str(folder), "--engine", engine, "--corpus", "synthetic", "--split", "val",
                     "--beam", "4", "-o", str(out), "--device", "cpu"]) == 0
        reports[engine] = json.loads(next(out.glob("*.json")).read_text())
    assert reports["onnxruntime"]["engine"] == "onnxruntime-fp32"
    print(f"{arch_of(model).name} beam-4 val BLEU: torch {reports['torch']['bleu']:.2f}, "
          f"onnxruntime {reports['onnxruntime']['bleu']:.2f}")
    assert abs(reports["onnxruntime"]["bleu"] - reports["torch"]["bleu"]) < 0.1
    hyps = {e: next((tmp_path / e).glob("*.en")).read_text() for e in reports}
    assert hyps["onnxruntime"] == hyps["torch"]


def test_optimized_int8_export_runs(pruned: Path, onnx_fp32: Path) -> None:
    """--optimize (each fused graph checked against the unfused one) then int8 quantization."""
    out = pruned.parent / "onnx-opt-int8"
    info = export(ExportArgs(model=pruned, output=out, optimize=True, quantize="int8"), quiet=True)
    opt = info["optimization"]
    assert info["precision"] == "int8" and opt["model_type"] == ("t5" if info["architecture"] == "t5" else "bart")
    assert all(r["max_difference"] is None or r["max_difference"] <= 1e-4 for r in opt["graphs"].values())
    print(f"{info['architecture']} fusions: " + "; ".join(f"{g} {r['fused']} kept={r['kept']}"
                                                          for g, r in opt["graphs"].items()))
    _, tok, _ = load_model_folder(pruned)
    eng8, eng32 = OrtSeq2Seq(out, threads=1), OrtSeq2Seq(onnx_fp32, threads=1)
    src = _src(tok)
    ids8, ids32 = eng8.generate(src), eng32.generate(src)
    same = sum(a == b for r8, r32 in zip(ids8, ids32) for a, b in zip(r8, r32)) / max(1, sum(map(len, ids32)))
    print(f"{info['architecture']} int8 vs fp32 greedy tokens equal: {same:.0%}")
    assert len(translate_served(eng8, SENTENCES)) == len(SENTENCES)


def test_generation_settings_it_cannot_copy_are_refused(pruned: Path, tmp_path: Path) -> None:
    model, tok, hparams = load_model_folder(pruned)
    model.generation_config.no_repeat_ngram_size = 3
    save_model_folder(tmp_path / "m", model, tok, hparams)
    with pytest.raises(CtpruneError, match="sets no_repeat_ngram_size=3, which ctprune's serving decoders "
                                           "do not reproduce; export refused"):
        export(ExportArgs(model=tmp_path / "m", output=tmp_path / "onnx"), quiet=True)
    assert not (tmp_path / "onnx").exists() and not list(tmp_path.glob(".onnx-*"))


def test_a_tampered_or_foreign_tokenizer_file_is_refused(onnx_fp32: Path, tmp_path: Path) -> None:
    from ctprune.fileio import file_record

    def copy(name: str) -> Path:
        out = tmp_path / name
        out.mkdir()
        for f in onnx_fp32.iterdir():
            (out / f.name).write_bytes(f.read_bytes())
        return out

    bad = copy("tampered")
    (bad / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CtpruneError, match="tokenizer_config.json .* was truncated, altered or swapped"):
        OrtSeq2Seq(bad)
    # A file the manifest lists (checksum and all) but graphs.json does not name as the tokenizer's.
    extra = copy("extra")
    (extra / "added_tokens.json").write_text("{}")
    manifest = json.loads((extra / "manifest.json").read_text())
    manifest["files"]["added_tokens.json"] = file_record(extra / "added_tokens.json")
    (extra / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CtpruneError, match="graphs.json does not match its manifest"):
        OrtSeq2Seq(extra)


def test_ctranslate2_matches_pytorch(pruned: Path, tmp_path: Path) -> None:
    """CTranslate2 for a MarianMT and a T5 pruned unevenly: every block padded to its stack's widest
    (T5: each self-attention with its own bias table, the shared table's columns of the heads it
    keeps, which differ from layer 0's); teacher-forced log-probabilities within 1e-4 of the Hugging
    Face model's; greedy ids identical to ``arch.generate``'s (the banned PAD suppressed, as the
    generation config bans it) and translations, with T5's task prefix, identical to PyTorch's."""
    from ctprune.serve.ct2 import Ct2Seq2Seq

    model, tok, _ = load_model_folder(pruned)
    arch = arch_of(model)
    out = tmp_path / "ct2"
    assert main(["export", str(pruned), "--format", "ctranslate2", "-o", str(out)]) == 0
    info = json.loads((out / "spec.json").read_text())
    assert info["architecture"] == arch.name and info["generation"]["suppressed"] == [0]
    assert info["source_prefix"] == ("" if arch.name == "marian" else PREFIX)
    enc_self = [3, 1] if arch.name == "marian" else [3, 2]
    assert info["heads"]["encoder_heads"] == enc_self and info["heads"]["decoder_self_heads"] == [1, 3]
    assert info["num_heads"] == {"encoder": 3, "decoder": 3}  # each stack's widest block, not the full 4
    qkv = info["variables"]["encoder/layer_1/self_attention/linear_0/weight"]["shape"]
    assert qkv == [3 * info["num_heads"]["encoder"] * 8, 32]
    eng = Ct2Seq2Seq(out, threads=1)
    assert eng.tokenizer.source_prefix == info["source_prefix"]
    src = _src(tok)
    g = torch.Generator().manual_seed(0)
    tgt = [torch.randint(4, model.config.vocab_size, (n,), generator=g).tolist() for n in (6, 2, 9, 4, 7, 3)]
    worst = 0.0
    with torch.no_grad():
        for i, (t, got) in enumerate(zip(tgt, eng.score(src, tgt), strict=True)):
            s = src[i:i + 1, :int((src[i] != tok.pad_id).sum())]
            dec_in = torch.tensor([[model.config.decoder_start_token_id, *t]])
            logp = model(input_ids=s, decoder_input_ids=dec_in).logits.log_softmax(-1)[0]
            ref = [logp[j, y].item() for j, y in enumerate([*t, tok.eos_id])]
            worst = max(worst, *(abs(a - b) for a, b in zip(ref, got, strict=True)))
        greedy = arch.generate(model, src, 1)
    print(f"CTranslate2 {arch.name} fp32 max |log-prob diff|: {worst:.2e}")
    assert worst < 1e-4
    assert eng.generate(src) == greedy and max(map(len, greedy)) >= 5
    assert translate_served(eng, SENTENCES) == decode.translate(model, tok, SENTENCES)


def test_ctranslate2_t5_without_output_scaling(spm_proto: bytes, tmp_path: Path) -> None:
    """A T5 whose decoder output is not scaled (``tie_word_embeddings=False``: transformers keeps
    that in ``scale_decoder_outputs``, as T5 v1.1 and flan-t5 have it): log-probabilities through
    CTranslate2 as the model's, so the scaling is read from the flag the model itself reads."""
    from transformers import T5Config, T5ForConditionalGeneration

    from ctprune.arch.t5 import t5_tokenizer
    from ctprune.serve.ct2 import Ct2Seq2Seq

    tok = t5_tokenizer(spm_proto, tmp_path / "t5")
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, num_heads=4, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   feed_forward_proj="relu", dropout_rate=0.0, relative_attention_num_buckets=8, pad_token_id=0,
                   eos_token_id=3, decoder_start_token_id=0, tie_word_embeddings=False)
    model = T5ForConditionalGeneration(cfg).eval()
    assert not model.config.scale_decoder_outputs
    model.save_pretrained(str(tmp_path / "t5"))
    model, tok, _ = load_model_folder(tmp_path / "t5")
    export(ExportArgs(model=tmp_path / "t5", output=tmp_path / "ct2", format="ctranslate2"), quiet=True)
    eng = Ct2Seq2Seq(tmp_path / "ct2", threads=1)
    src = _src(tok)[:1]
    src = src[:, :int((src[0] != tok.pad_id).sum())]
    tgt = [5, 9, 7, 4]
    with torch.no_grad():
        logp = model(input_ids=src, decoder_input_ids=torch.tensor([[0, *tgt]])).logits.log_softmax(-1)[0]
    ref = [logp[j, y].item() for j, y in enumerate([*tgt, tok.eos_id])]
    got = eng.score(src, [tgt])[0]
    assert max(abs(a - b) for a, b in zip(ref, got, strict=True)) < 1e-4
