"""Serving through ONNX Runtime: export of an unevenly pruned model, exactness against PyTorch,
int8, and refused requests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ctprune.errors import CtpruneError
from ctprune.model import decode
from ctprune.model.checkpoint import load_model_folder, save_model_folder
from ctprune.pruning import surgery
from ctprune.serve.export import ExportArgs, export
from ctprune.serve.ort import OrtSeq2Seq, translate_onnx
from tests.conftest import run_cli

SENTENCES = ["der mann sieht ein buch", "die frau liest im park auf dem tisch", "ein hund",
             "das buch der katze sieht eine frau im park", "katze"]

# Per-layer sizes after pruning: heads (of 4) and FFN widths (of 48) differ in every layer.
CUT_HEADS = {"encoder.layers.0.self_attn": [0, 2], "decoder.layers.0.self_attn": [1],
             "decoder.layers.1.self_attn": [0, 1, 3], "decoder.layers.0.cross_attn": [2, 3],
             "decoder.layers.1.cross_attn": [0]}
CUT_NEURONS = {"encoder.layers.1.ffn": 20, "decoder.layers.0.ffn": 10, "decoder.layers.1.ffn": 33}


@pytest.fixture(scope="module")
def pruned(model_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model folder pruned unevenly (heads, FFN neurons, one L1-masked Linear)."""
    model, tok, _ = load_model_folder(model_folder)
    torch.manual_seed(3)
    for name, keep in CUT_HEADS.items():
        surgery.replace_module(model, name, surgery.cut_heads(model.get_submodule(name), torch.tensor(keep)))
    for name, n in CUT_NEURONS.items():
        surgery.replace_module(model, name, surgery.cut_neurons(model.get_submodule(name), torch.randperm(48)[:n]))
    name = "decoder.layers.1.ffn.linear2"
    linear = model.get_submodule(name)
    surgery.replace_module(model, name, surgery.mask_linear(linear, surgery.l1_mask(linear.weight, 0.5)))
    model.apply_masks()
    folder = tmp_path_factory.mktemp("serve") / "pruned"
    save_model_folder(folder, model, tok, {"stage": "test"})
    return folder


@pytest.fixture(scope="module")
def fp32(pruned: Path) -> Path:
    out = pruned.parent / "onnx-fp32"
    export(ExportArgs(model=pruned, output=out), quiet=True)
    return out


def _src(model: torch.nn.Module, tok: object) -> torch.Tensor:
    from ctprune.data.batching import pad

    return pad([s + [3] for s in tok.encode(SENTENCES)], 0)  # type: ignore[attr-defined]


def test_export_writes_per_layer_graphs(pruned: Path, fp32: Path) -> None:
    cfg = json.loads((pruned / "config.json").read_text())
    assert cfg["decoder_self_heads"] == [1, 3] and cfg["decoder_cross_heads"] == [2, 1]
    assert cfg["encoder_heads"] == [2, 4] and cfg["decoder_ffn"] == [10, 33]
    assert sorted(p.name for p in fp32.iterdir()) == sorted(
        ["encoder.onnx", "decoder_step.onnx", "tokenizer.model", "config.json", "graphs.json", "manifest.json"])
    assert (fp32 / "tokenizer.model").read_bytes() == (pruned / "tokenizer.model").read_bytes()
    manifest = json.loads((fp32 / "manifest.json").read_text())
    assert manifest["format"] == "ctprune-onnx/1"
    assert all(len(r["sha256"]) == 64 for r in manifest["files"].values())
    info = json.loads((fp32 / "graphs.json").read_text())
    assert info["precision"] == "fp32"
    dec = {v["name"]: v for v in info["graphs"]["decoder_step"]["inputs"]}
    assert dec["past.0.key"]["shape"] == ["batch", 1, "past_len", 8]
    assert dec["past.1.value"]["shape"] == ["batch", 3, "past_len", 8]
    assert dec["cross.0.key"]["shape"] == ["batch", 2, "src_len", 8]
    assert dec["cross.1.key"]["shape"] == ["batch", 1, "src_len", 8]
    assert dec["src_mask"]["dtype"] == "bool" and dec["input_ids"]["shape"] == ["batch", 1]
    outs = {v["name"]: v["shape"] for v in info["graphs"]["decoder_step"]["outputs"]}
    assert outs["logits"] == ["batch", cfg["vocab_size"]]
    assert outs["present.1.key"][:2] == ["batch", 3] and outs["present.1.key"][3] == 8
    enc = [v["name"] for v in info["graphs"]["encoder"]["outputs"]]
    assert enc == ["src_mask", "cross.0.key", "cross.0.value", "cross.1.key", "cross.1.value"]


def test_fp32_step_logits_match_pytorch(pruned: Path, fp32: Path) -> None:
    """Teacher-forced steps over a padded batch: every step's logits within 1e-4."""
    model, tok, _ = load_model_folder(pruned)
    eng = OrtSeq2Seq(fp32, threads=1)
    src = _src(model, tok)
    g = torch.Generator().manual_seed(0)
    tgt = torch.randint(4, model.cfg.vocab_size, (src.shape[0], 12), generator=g)
    tgt[:, 0] = model.cfg.bos_id
    mask, cross = eng.encode(src)
    past = eng.empty_past(src.shape[0])
    worst = 0.0
    with torch.no_grad():
        memory, src_mask = model.encode(src)
        cache = model.new_cache()
        full = model(src, tgt)  # (B, T, V) without a cache
        for t in range(tgt.shape[1]):
            logits, past = eng.step(tgt[:, t:t + 1], mask, past, cross)
            ref = model.generator(model.decode(tgt[:, t:t + 1], memory, src_mask, cache, offset=t)[:, -1])
            worst = max(worst, (logits - ref).abs().max().item(), (logits - full[:, t]).abs().max().item())
            assert past[0].shape == (src.shape[0], 1, t + 1, 8) and past[2].shape == (src.shape[0], 3, t + 1, 8)
    print(f"fp32 max |logit diff| over {tgt.shape[1]} steps: {worst:.2e}")
    assert worst < 1e-4


def test_fp32_greedy_and_beam_ids_identical(pruned: Path, fp32: Path) -> None:
    model, tok, _ = load_model_folder(pruned)
    eng = OrtSeq2Seq(fp32, threads=1)
    src = _src(model, tok)
    ref = decode.greedy(model, src)
    assert eng.greedy(src) == ref
    assert max(len(r) for r in ref) >= 5  # the comparison covers several steps
    assert eng.greedy(src, steps=7) == decode.greedy(model, src, steps=7)
    assert eng.beam_search(src, 3) == decode.beam_search(model, src, 3)
    assert translate_onnx(eng, SENTENCES, batch_size=2) == decode.translate(model, tok, SENTENCES, batch_size=2)
    assert translate_onnx(fp32, SENTENCES, beam=2) == decode.translate(model, tok, SENTENCES, beam=2)


def test_int8_runs_and_is_reported(pruned: Path, fp32: Path) -> None:
    import onnx

    out = pruned.parent / "onnx-int8"
    info = export(ExportArgs(model=pruned, output=out, quantize="int8"), quiet=True)
    assert info["precision"] == "int8"
    ops = {n.op_type for n in onnx.load(str(out / "decoder_step.onnx")).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops, ops
    assert (out / "decoder_step.onnx").stat().st_size < (fp32 / "decoder_step.onnx").stat().st_size
    model, tok, _ = load_model_folder(pruned)
    src = _src(model, tok)
    eng8, eng32 = OrtSeq2Seq(out, threads=1), OrtSeq2Seq(fp32, threads=1)
    mask, cross = eng8.encode(src)
    logits8, _ = eng8.step(torch.full((src.shape[0], 1), 2), mask, eng8.empty_past(src.shape[0]), cross)
    mask, cross = eng32.encode(src)
    logits32, _ = eng32.step(torch.full((src.shape[0], 1), 2), mask, eng32.empty_past(src.shape[0]), cross)
    assert torch.isfinite(logits8).all()
    ids8, ids32 = eng8.greedy(src, steps=10), eng32.greedy(src, steps=10)
    same = sum(a == b for r8, r32 in zip(ids8, ids32) for a, b in zip(r8, r32)) / max(1, sum(map(len, ids32)))
    print(f"int8 vs fp32: first-step max |logit diff| {(logits8 - logits32).abs().max():.3f}, "
          f"greedy tokens equal {same:.0%}")
    assert len(translate_onnx(eng8, SENTENCES)) == len(SENTENCES)


def test_cli_translate_through_onnxruntime(pruned: Path, fp32: Path) -> None:
    model, tok, _ = load_model_folder(pruned)
    r = run_cli("translate", str(fp32), "--engine", "onnxruntime", stdin="\n".join(SENTENCES) + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == decode.translate(model, tok, SENTENCES)


def test_bad_requests_refused(pruned: Path, fp32: Path, tmp_path: Path) -> None:
    with pytest.raises(CtpruneError, match="--format must be one of onnx"):
        ExportArgs(model=pruned, output=tmp_path / "x", format="tensorrt")
    with pytest.raises(CtpruneError, match="ctranslate2 is not supported yet"):
        ExportArgs(model=pruned, output=tmp_path / "x", format="ctranslate2")
    with pytest.raises(CtpruneError, match="--quantize must be one of"):
        ExportArgs(model=pruned, output=tmp_path / "x", quantize="int4")
    (tmp_path / "notes").mkdir()
    with pytest.raises(CtpruneError, match="not a ctprune model folder"):
        export(ExportArgs(model=tmp_path / "notes", output=tmp_path / "y"))
    with pytest.raises(CtpruneError, match="model folder not found"):
        export(ExportArgs(model=tmp_path / "missing", output=tmp_path / "y"))
    with pytest.raises(CtpruneError, match="is inside the model folder"):
        export(ExportArgs(model=pruned, output=pruned / "onnx"))
    with pytest.raises(CtpruneError, match="already exists and is not an ONNX export folder"):
        export(ExportArgs(model=pruned, output=tmp_path / "notes"))
    assert not list(tmp_path.glob(".y-*")) and not (tmp_path / "y").exists()
    with pytest.raises(CtpruneError, match="not an ONNX serving folder"):
        OrtSeq2Seq(pruned)
    # A graph altered after export fails the manifest check.
    bad = tmp_path / "tampered"
    bad.mkdir()
    for f in fp32.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = bytearray((bad / "decoder_step.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bad / "decoder_step.onnx").write_bytes(bytes(data))
    with pytest.raises(CtpruneError, match="does not match the SHA-256"):
        OrtSeq2Seq(bad)
    r = run_cli("export", str(pruned), "--format", "tflite", "-o", str(tmp_path / "z"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--format must be one of onnx" in r.stderr and not (tmp_path / "z").exists()


@pytest.mark.slow
def test_trained_model_bleu_through_onnxruntime(trained: Path, tmp_path: Path) -> None:
    """A trained tiny model, pruned unevenly, on the synthetic test split: fp32 greedy and beam-4
    translations equal PyTorch's (so BLEU is equal); int8's BLEU change is printed, not hidden."""
    from ctprune.pruning import importance
    from ctprune.serve.ort import evaluate_onnx
    from ctprune.stages.evaluate import evaluate

    model, tok, hparams = load_model_folder(trained)
    for name, n in {"encoder.layers.1.self_attn": 3, "decoder.layers.0.cross_attn": 2,
                    "decoder.layers.1.self_attn": 3}.items():
        keep = importance.head_l1(model.get_submodule(name)).topk(n).indices
        surgery.replace_module(model, name, surgery.cut_heads(model.get_submodule(name), keep))
    for name, n in {"encoder.layers.0.ffn": 96, "decoder.layers.1.ffn": 80}.items():
        keep = importance.neuron_l1(model.get_submodule(name)).topk(n).indices
        surgery.replace_module(model, name, surgery.cut_neurons(model.get_submodule(name), keep))
    trained = tmp_path / "pruned"
    save_model_folder(trained, model, tok, hparams)
    fp32, int8 = tmp_path / "fp32", tmp_path / "int8"
    export(ExportArgs(model=trained, output=fp32), quiet=True)
    export(ExportArgs(model=trained, output=int8, quantize="int8"), quiet=True)
    kw = dict(corpus="synthetic", split="test", quiet=True)
    lines = []
    for beam in (1, 4):
        ref = evaluate(trained, beam=beam, device="cpu", output=tmp_path / "eval-torch", **kw)
        got = evaluate_onnx(fp32, beam=beam, output=tmp_path / "eval-ort", **kw)
        q = evaluate_onnx(int8, beam=beam, output=tmp_path / "eval-ort8", **kw)
        decoder = ref["decoder"]
        assert (tmp_path / "eval-ort" / f"test.onnxruntime-fp32.{decoder}.en").read_text() == \
            (tmp_path / "eval-torch" / f"test.{decoder}.en").read_text()
        assert abs(got["bleu"] - ref["bleu"]) < 0.1 and got["engine"] == "onnxruntime-fp32"
        lines.append(f"{decoder}: torch {ref['bleu']:.2f}  ort-fp32 {got['bleu']:.2f}  ort-int8 {q['bleu']:.2f} "
                     f"(int8 change {q['bleu'] - got['bleu']:+.2f})")
    assert ref["bleu"] > 5  # the model learned something, so the comparison means something
    print("\nsynthetic test BLEU " + "; ".join(lines))


def test_removed_blocks_export_and_match_pytorch(pruned: Path, tmp_path: Path) -> None:
    """Keep 0 (issue 21's no-op block): decoder layer 0's self-attention and an encoder FFN
    removed; the step graph reads the position from the first cache that has heads."""
    model, tok, _ = load_model_folder(pruned)
    nothing = torch.tensor([], dtype=torch.long)
    name = "decoder.layers.0.self_attn"
    surgery.replace_module(model, name, surgery.cut_heads(model.get_submodule(name), nothing))
    name = "encoder.layers.0.ffn"
    surgery.replace_module(model, name, surgery.cut_neurons(model.get_submodule(name), nothing))
    assert model.cfg.decoder_self_heads == [0, 3] and model.cfg.encoder_ffn[0] == 0
    save_model_folder(tmp_path / "removed", model, tok, {"stage": "test"})
    export(ExportArgs(model=tmp_path / "removed", output=tmp_path / "onnx"), quiet=True)
    src = _src(model, tok)
    assert OrtSeq2Seq(tmp_path / "onnx", threads=1).greedy(src) == decode.greedy(model, src)
