"""Serving through ONNX Runtime and CTranslate2: export of an unevenly pruned model, exactness
against PyTorch, int8, and refused requests."""

from __future__ import annotations

import json
import math
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
    surgery.replace_module(model, name, surgery.mask_linear(linear, surgery.l1_mask(linear.weight, 0.5)))  # zeroed
    folder = tmp_path_factory.mktemp("serve") / "pruned"
    save_model_folder(folder, model, tok, {"stage": "test"})
    return folder


@pytest.fixture(scope="module")
def fp32(pruned: Path) -> Path:
    out = pruned.parent / "onnx-fp32"
    export(ExportArgs(model=pruned, output=out), quiet=True)
    return out


@pytest.fixture(scope="module")
def biased(pruned: Path) -> Path:
    """``pruned`` with random biases and LayerNorm weights (the tiny model starts with zero
    biases and unit norms), so that a fusion that drops or misplaces one shows."""
    model, tok, _ = load_model_folder(pruned)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
    folder = pruned.parent / "biased"
    save_model_folder(folder, model, tok, {"stage": "test"})
    return folder


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
    worst = _worst_step_logits(model, OrtSeq2Seq(fp32, threads=1), _src(model, tok))
    print(f"fp32 max |logit diff| over 12 steps: {worst:.2e}")
    assert worst < 1e-4


def _worst_step_logits(model: torch.nn.Module, eng: OrtSeq2Seq, src: torch.Tensor) -> float:
    """Largest |ONNX - PyTorch| of the step logits over 12 teacher-forced steps of random targets."""
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
    return worst


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
    with pytest.raises(CtpruneError, match="--format must be one of onnx, ctranslate2, got 'tensorrt'"):
        ExportArgs(model=pruned, output=tmp_path / "x", format="tensorrt")
    with pytest.raises(CtpruneError, match="--quantize must be one of"):
        ExportArgs(model=pruned, output=tmp_path / "x", quantize="int4")
    with pytest.raises(CtpruneError, match="--optimize applies to --format onnx only .*not --format ctranslate2"):
        ExportArgs(model=pruned, output=tmp_path / "x", format="ctranslate2", optimize=True)
    (tmp_path / "notes").mkdir()
    with pytest.raises(CtpruneError, match="not a ctprune model folder"):
        export(ExportArgs(model=tmp_path / "notes", output=tmp_path / "y"))
    with pytest.raises(CtpruneError, match="model folder not found"):
        export(ExportArgs(model=tmp_path / "missing", output=tmp_path / "y"))
    with pytest.raises(CtpruneError, match="is inside the model folder"):
        export(ExportArgs(model=pruned, output=pruned / "onnx"))
    with pytest.raises(CtpruneError, match="already exists and is not an export folder"):
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
    assert "--format must be one of onnx, ctranslate2" in r.stderr and not (tmp_path / "z").exists()
    r = run_cli("export", str(pruned), "--format", "ctranslate2", "--optimize", "-o", str(tmp_path / "z"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--optimize applies to --format onnx only" in r.stderr and not (tmp_path / "z").exists()


def _ops(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_optimized_fp32_matches_pytorch(biased: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--optimize: ONNX Runtime's fusions with heads read per layer; the fused graphs replace the
    exported ones under the same manifest, and translate exactly as PyTorch does."""
    out = tmp_path / "opt"
    info = export(ExportArgs(model=biased, output=out, optimize=True))
    printed = capsys.readouterr()
    assert "warning" not in printed.err, printed.err
    opt = info["optimization"]
    assert (opt["model_type"], opt["num_heads"], opt["hidden_size"]) == ("bart", 0, 0)
    for graph, name in (("encoder", "encoder.onnx"), ("decoder_step", "decoder_step.onnx")):
        record = opt["graphs"][graph]
        assert record["kept"] and record["warning"] is None and record["max_difference"] <= 1e-4
        assert record["fused"].get("SkipLayerNormalization", 0) > 0, record
        assert "SkipLayerNormalization" in _ops(out / name)
        assert f"optimized {name}: SkipLayerNormalization x" in printed.out
    print("fusions: " + "; ".join(f"{g} {r['fused']}" for g, r in opt["graphs"].items()))
    assert json.loads((out / "graphs.json").read_text())["optimization"] == opt
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {"encoder.onnx", "decoder_step.onnx", "tokenizer.model", "config.json",
                                      "graphs.json"}
    model, tok, _ = load_model_folder(biased)
    eng = OrtSeq2Seq(out, threads=1)  # checks every file against the manifest
    src = _src(model, tok)
    worst = _worst_step_logits(model, eng, src)
    print(f"optimized fp32 max |logit diff| over 12 steps: {worst:.2e}")
    assert worst < 1e-4
    ref = decode.greedy(model, src)
    assert eng.greedy(src) == ref and max(len(r) for r in ref) >= 5
    assert eng.beam_search(src, 3) == decode.beam_search(model, src, 3)
    assert translate_onnx(eng, SENTENCES, batch_size=2) == decode.translate(model, tok, SENTENCES, batch_size=2)
    # Quantization comes after the fusions, on the fused graphs.
    info8 = export(ExportArgs(model=biased, output=tmp_path / "opt8", optimize=True, quantize="int8"), quiet=True)
    assert info8["precision"] == "int8" and info8["optimization"]["graphs"]["encoder"]["kept"]
    assert {"SkipLayerNormalization", "MatMulInteger"} <= _ops(tmp_path / "opt8" / "encoder.onnx")
    assert len(OrtSeq2Seq(tmp_path / "opt8", threads=1).greedy(src, steps=5)) == src.shape[0]


def test_optimize_falls_back_when_a_fusion_changes_outputs(
        biased: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A fused graph that differs from the unfused one is rebuilt without that fusion; if no
    version agrees, the unfused graph is exported. One warning line per graph, naming it."""
    import onnx

    from ctprune.serve import export as export_module

    real_fuse = export_module._fuse

    def broken_fuse(path: Path, out: Path, disabled: set[str], model_type: str) -> dict[str, int]:
        """The real optimizer, with every SkipLayerNormalization's epsilon made wrong (or, for
        the decoder, every fused graph broken by a scaled output)."""
        counts = real_fuse(path, out, disabled, model_type)
        m = onnx.load(str(out))
        for node in m.graph.node:
            if node.op_type == "SkipLayerNormalization":
                del node.attribute[:]
                node.attribute.append(onnx.helper.make_attribute("epsilon", 0.5))
        if path.name == "decoder_step.onnx":
            logits = m.graph.output[0].name
            for node in m.graph.node:
                for i, o in enumerate(node.output):
                    if o == logits:
                        node.output[i] = logits + "_raw"
            m.graph.node.append(onnx.helper.make_node("Neg", [logits + "_raw"], [logits]))
        onnx.save(m, str(out))
        return counts

    monkeypatch.setattr(export_module, "_fuse", broken_fuse)
    out = tmp_path / "fallback"
    info = export(ExportArgs(model=biased, output=out, optimize=True))
    err = capsys.readouterr().err.strip().splitlines()
    enc, dec = info["optimization"]["graphs"]["encoder"], info["optimization"]["graphs"]["decoder_step"]
    # Without SkipLayerNormalization, ONNX Runtime 1.32's bart attention fusion matches encoder
    # layer 1 (LayerNormalization anchor) with its own 4 heads but takes the padding mask for a
    # causal one (unidirectional=1): the check rejects that graph too, and its fusion is turned off.
    assert enc["kept"] and "enable_skip_layer_norm" in enc["disabled"]
    assert not {"SkipLayerNormalization", "Attention"} & set(enc["fused"])
    assert not dec["kept"] and dec["fused"] == {}
    assert len(err) == 2, err
    assert err[0].startswith("warning: encoder.onnx: fused graphs changed the outputs beyond 0.0001 "
                             "(SkipLayerNormalization x4: ")
    assert "kept it without" in err[0] and "enable_skip_layer_norm" in err[0]
    assert err[1].startswith("warning: decoder_step.onnx") and err[1].endswith("kept the unfused graph")
    assert "SkipLayerNormalization" not in _ops(out / "encoder.onnx") | _ops(out / "decoder_step.onnx")
    model, tok, _ = load_model_folder(biased)
    src = _src(model, tok)
    assert OrtSeq2Seq(out, threads=1).greedy(src) == decode.greedy(model, src)


@pytest.mark.slow
def test_trained_model_bleu_through_onnxruntime_and_ctranslate2(trained: Path, tmp_path: Path) -> None:
    """A trained tiny model, pruned unevenly, on the synthetic test split: ONNX Runtime fp32 greedy
    and beam-4 translations equal PyTorch's (so BLEU is equal); CTranslate2 fp32 greedy equal
    PyTorch's, its own beam search within 0.1 BLEU; int8's BLEU change is printed, not hidden."""
    from ctprune.pruning import importance
    from ctprune.serve.engines import evaluate_served
    from ctprune.stages.evaluate import EvaluateArgs, evaluate

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
    folders = {}
    for fmt, engine in (("onnx", "onnxruntime"), ("ctranslate2", "ctranslate2")):
        for q in ("none", "int8"):
            folders[engine, q] = tmp_path / f"{fmt}-{q}"
            export(ExportArgs(model=trained, output=folders[engine, q], format=fmt, quantize=q), quiet=True)
    kw = dict(corpus="synthetic", split="test", quiet=True)
    lines, same = [], {}
    for beam in (1, 4):
        ref = evaluate(EvaluateArgs(model=trained, beam=beam, device="cpu", output=tmp_path / "eval-torch", **kw))
        decoder = ref["decoder"]
        bleu = {}
        for (engine, q), folder in folders.items():
            out = tmp_path / f"eval-{engine}-{q}"
            got = evaluate_served(engine, folder, beam=beam, output=out, **kw)
            bleu[engine, q] = got["bleu"]
            if q == "none":
                assert got["engine"] == f"{engine}-fp32"
                assert abs(got["bleu"] - ref["bleu"]) < 0.1, (engine, decoder, got["bleu"], ref["bleu"])
                hyps = (out / f"test.{engine}-fp32.{decoder}.en").read_text().splitlines()
                refs = (tmp_path / "eval-torch" / f"test.{decoder}.en").read_text().splitlines()
                same[engine, decoder] = sum(h == r for h, r in zip(hyps, refs, strict=True)) / len(refs)
                # CTranslate2's beam search is its own (see ct2.Ct2Seq2Seq.generate): BLEU only.
                assert same[engine, decoder] == 1.0 or (engine, beam) == ("ctranslate2", 4), (engine, decoder)
        lines.append(f"{decoder}: torch {ref['bleu']:.2f}  " + "  ".join(
            f"{e}-{'fp32' if q == 'none' else q} {b:.2f}" for (e, q), b in bleu.items()) + "  (int8 change: "
            + ", ".join(f"{e} {bleu[e, 'int8'] - bleu[e, 'none']:+.2f}" for e in ("onnxruntime", "ctranslate2")) + ")")
    assert ref["bleu"] > 5  # the model learned something, so the comparison means something
    print("\nsynthetic test BLEU " + "; ".join(lines) + f"; CTranslate2 beam-4 fp32 translations equal to "
          f"PyTorch's: {same['ctranslate2', 'beam4']:.1%}")


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


# ---- CTranslate2 ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ct2_fp32(pruned: Path) -> Path:
    out = pruned.parent / "ct2-fp32"
    export(ExportArgs(model=pruned, output=out, format="ctranslate2"), quiet=True)
    return out


def _teacher_forced_logprobs(model: torch.nn.Module, src: torch.Tensor, tgt: list[list[int]]) -> list[list[float]]:
    """PyTorch's log-probability of each target token and the final EOS, one sentence at a time."""
    out = []
    with torch.no_grad():
        for i, t in enumerate(tgt):
            s = src[i:i + 1, :int((src[i] != 0).sum())]
            logp = model(s, torch.tensor([[2, *t]])).log_softmax(-1)[0]  # (T+1, V)
            out.append([logp[j, y].item() for j, y in enumerate([*t, 3])])
    return out


def test_ct2_export_pads_heads_per_stack(pruned: Path, ct2_fp32: Path) -> None:
    assert sorted(p.name for p in ct2_fp32.iterdir()) == sorted(
        ["model.bin", "config.json", "shared_vocabulary.json", "tokenizer.model", "spec.json", "manifest.json"])
    assert (ct2_fp32 / "tokenizer.model").read_bytes() == (pruned / "tokenizer.model").read_bytes()
    manifest = json.loads((ct2_fp32 / "manifest.json").read_text())
    assert manifest["format"] == "ctprune-ctranslate2/1" and len(manifest["files"]) == 5
    info = json.loads((ct2_fp32 / "spec.json").read_text())
    # encoder heads [2, 4] -> 4; decoder self [1, 3], cross [2, 1] -> 3 (one count per stack)
    assert info["num_heads"] == {"encoder": 4, "decoder": 3} and info["precision"] == "fp32"
    assert info["padded_heads"] == {"encoder_heads": [2, 0], "decoder_self_heads": [2, 0],
                                    "decoder_cross_heads": [1, 2]}
    assert info["padded_fraction"] == round(1 - 13 / 20, 4)
    assert info["ffn"] == {"encoder": [48, 20], "decoder": [10, 33]}  # FFN widths as they are
    v = info["variables"]
    assert v["encoder/layer_0/self_attention/linear_0/weight"]["shape"] == [3 * 4 * 8, 32]  # fused q, k, v
    assert v["decoder/layer_1/attention/linear_1/weight"]["shape"] == [2 * 3 * 8, 32]  # fused k, v
    assert v["decoder/layer_0/attention/linear_2/weight"]["shape"] == [32, 3 * 8]
    assert v["decoder/layer_0/ffn/linear_0/weight"]["shape"] == [10, 32]
    assert "encoder/layer_norm/gamma" in v and "decoder/layer_norm/gamma" in v  # the final norms
    ct2_config = json.loads((ct2_fp32 / "config.json").read_text())
    assert ct2_config["layer_norm_epsilon"] == 1e-5 and ct2_config["eos_token"] == "</s>"


def test_ct2_fp32_matches_pytorch(pruned: Path, ct2_fp32: Path) -> None:
    """Teacher-forced log-probabilities of random targets within 1e-4 of PyTorch's (a padded batch),
    greedy token ids identical (free-running and batched translation)."""
    from ctprune.serve.ct2 import Ct2Seq2Seq
    from ctprune.serve.engines import translate_served

    model, tok, _ = load_model_folder(pruned)
    eng = Ct2Seq2Seq(ct2_fp32, threads=1)
    src = _src(model, tok)
    g = torch.Generator().manual_seed(0)
    tgt = [torch.randint(4, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (12, 3, 7, 1, 9)]
    got, ref = eng.score(src, tgt), _teacher_forced_logprobs(model, src, tgt)
    worst = max(abs(a - b) for r, o in zip(ref, got) for a, b in zip(r, o, strict=True))
    print(f"CTranslate2 fp32 max |log-prob diff| over {sum(map(len, ref))} tokens: {worst:.2e}")
    assert worst < 1e-4
    greedy = decode.greedy(model, src)
    assert eng.generate(src) == greedy and max(map(len, greedy)) >= 5
    assert translate_served(eng, SENTENCES, batch_size=2) == decode.translate(model, tok, SENTENCES, batch_size=2)
    assert [len(h) for h in eng.generate(src, steps=7)] == [7] * len(SENTENCES)


def test_ct2_removed_blocks_match_pytorch(pruned: Path, tmp_path: Path) -> None:
    """Keep 0: a removed self-attention in each stack and a removed FFN become zero blocks."""
    from ctprune.serve.ct2 import Ct2Seq2Seq

    model, tok, _ = load_model_folder(pruned)
    nothing = torch.tensor([], dtype=torch.long)
    for name in ("decoder.layers.0.self_attn", "encoder.layers.1.self_attn"):
        surgery.replace_module(model, name, surgery.cut_heads(model.get_submodule(name), nothing))
    name = "encoder.layers.0.ffn"
    surgery.replace_module(model, name, surgery.cut_neurons(model.get_submodule(name), nothing))
    cfg = model.cfg
    assert cfg.decoder_self_heads == [0, 3] and cfg.encoder_heads == [2, 0] and cfg.encoder_ffn[0] == 0
    save_model_folder(tmp_path / "removed", model, tok, {"stage": "test"})
    info = export(ExportArgs(model=tmp_path / "removed", output=tmp_path / "ct2", format="ctranslate2"), quiet=True)
    assert info["num_heads"] == {"encoder": 2, "decoder": 3}
    eng = Ct2Seq2Seq(tmp_path / "ct2", threads=1)
    src = _src(model, tok)
    tgt = [list(range(4, 4 + n)) for n in (6, 2, 5, 1, 8)]
    worst = max(abs(a - b) for r, o in zip(_teacher_forced_logprobs(model, src, tgt), eng.score(src, tgt))
                for a, b in zip(r, o, strict=True))
    assert worst < 1e-4
    assert eng.generate(src) == decode.greedy(model, src)


def test_ct2_int8_runs_and_is_reported(pruned: Path, ct2_fp32: Path) -> None:
    from ctprune.serve.ct2 import Ct2Seq2Seq

    out = pruned.parent / "ct2-int8"
    info = export(ExportArgs(model=pruned, output=out, format="ctranslate2", quantize="int8"), quiet=True)
    assert info["precision"] == "int8" and info["compute_type"] == "int8"
    assert info["variables"]["encoder/layer_0/self_attention/linear_0/weight"]["dtype"] == "int8"
    assert (out / "model.bin").stat().st_size < (ct2_fp32 / "model.bin").stat().st_size
    model, tok, _ = load_model_folder(pruned)
    src = _src(model, tok)
    eng8, eng32 = Ct2Seq2Seq(out, threads=1), Ct2Seq2Seq(ct2_fp32, threads=1)
    tgt = eng32.generate(src)
    lp8, lp32 = eng8.score(src, tgt), eng32.score(src, tgt)
    worst = max(abs(a - b) for r8, r32 in zip(lp8, lp32) for a, b in zip(r8, r32))
    ids8 = eng8.generate(src)
    same = sum(a == b for r8, r32 in zip(ids8, tgt) for a, b in zip(r8, r32)) / max(1, sum(map(len, tgt)))
    print(f"CTranslate2 int8 vs fp32: max |log-prob diff| {worst:.3f}, greedy tokens equal {same:.0%}")
    assert all(map(math.isfinite, (x for r in lp8 for x in r)))


def test_cli_export_and_translate_through_ctranslate2(pruned: Path, tmp_path: Path) -> None:
    model, tok, _ = load_model_folder(pruned)
    r = run_cli("export", str(pruned), "--format", "ctranslate2", "-o", str(tmp_path / "ct2"))
    assert r.returncode == 0, r.stderr
    assert "(ctranslate2, fp32;" in r.stdout
    r = run_cli("translate", str(tmp_path / "ct2"), "--engine", "ctranslate2", stdin="\n".join(SENTENCES) + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == decode.translate(model, tok, SENTENCES)


def test_ct2_bad_requests_refused(pruned: Path, fp32: Path, ct2_fp32: Path, tmp_path: Path) -> None:
    from ctprune.serve.ct2 import Ct2Seq2Seq

    with pytest.raises(CtpruneError, match="--quantize must be one of none, int8, got 'int4'"):
        ExportArgs(model=pruned, output=tmp_path / "x", format="ctranslate2", quantize="int4")
    # An existing export of the other format is replaced; anything else is refused, nothing written.
    (tmp_path / "notes").mkdir()
    with pytest.raises(CtpruneError, match="already exists and is not an export folder"):
        export(ExportArgs(model=pruned, output=tmp_path / "notes", format="ctranslate2"))
    with pytest.raises(CtpruneError, match="is inside the model folder"):
        export(ExportArgs(model=pruned, output=pruned / "ct2", format="ctranslate2"))
    assert not list(tmp_path.glob(".notes-*")) and not (pruned / "ct2").exists()
    with pytest.raises(CtpruneError, match="not a CTranslate2 serving folder"):
        Ct2Seq2Seq(fp32)
    with pytest.raises(CtpruneError, match="not an ONNX serving folder"):
        OrtSeq2Seq(ct2_fp32)
    bad = tmp_path / "tampered"
    bad.mkdir()
    for f in ct2_fp32.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = bytearray((bad / "model.bin").read_bytes())
    data[-10] ^= 0xFF
    (bad / "model.bin").write_bytes(bytes(data))
    with pytest.raises(CtpruneError, match="does not match the SHA-256"):
        Ct2Seq2Seq(bad)
    r = run_cli("translate", str(fp32), "--engine", "ctranslate2", stdin="ein hund\n")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not a CTranslate2 serving folder" in r.stderr
    r = run_cli("translate", str(ct2_fp32), "--engine", "tensorrt", stdin="ein hund\n")
    assert r.returncode == 2 and "invalid choice: 'tensorrt'" in r.stderr


# ---- CTranslate2, MarianMT --------------------------------------------------------------------

@pytest.fixture(scope="module")
def marian_pruned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random MarianMT with its Marian tokenizer, pruned unevenly (heads, FFN neurons, one
    L1-masked Linear) and saved as a ctprune folder."""
    from ctprune.arch.marian import marian_tokenizer
    from ctprune.data.synthetic import synthetic_corpus
    from ctprune.data.tokenizer import Tokenizer
    from tests.test_hf import _prune_unevenly, tiny_marian

    pairs = synthetic_corpus("train")
    proto = Tokenizer.train([p[0] for p in pairs] + [p[1] for p in pairs], 300).proto
    d = tmp_path_factory.mktemp("marian")
    tok = marian_tokenizer(proto, d / "origin")
    model = tiny_marian(vocab=len(tok))
    model.save_pretrained(str(d / "origin"))
    model, tok, hparams = load_model_folder(d / "origin")
    _prune_unevenly(model)
    save_model_folder(d / "pruned", model, tok, hparams)
    return d / "pruned"


def test_ct2_marian_matches_pytorch(marian_pruned: Path, tmp_path: Path) -> None:
    """MarianMT pruned unevenly: heads padded per stack, log-probabilities within 1e-4 of the
    Hugging Face model's, greedy ids identical to ``arch.generate``'s."""
    from ctprune.arch import arch_of
    from ctprune.data.batching import pad
    from ctprune.serve.ct2 import Ct2Seq2Seq
    from ctprune.serve.engines import translate_served

    model, tok, _ = load_model_folder(marian_pruned)
    info = export(ExportArgs(model=marian_pruned, output=tmp_path / "ct2", format="ctranslate2"), quiet=True)
    assert info["architecture"] == "marian" and info["padded_fraction"] > 0
    assert len(set(info["heads"]["encoder_heads"] + info["heads"]["decoder_self_heads"])) > 1
    assert any(f.startswith("tokenizer/") for f in info["tokenizer_files"])
    eng = Ct2Seq2Seq(tmp_path / "ct2", threads=1)
    sentences = ["der mann sieht ein buch", "die frau liest im park", "ein hund"]
    src = pad([s + [tok.eos_id] for s in tok.encode(sentences)], tok.pad_id)
    g = torch.Generator().manual_seed(0)
    tgt = [torch.randint(4, model.config.vocab_size, (n,), generator=g).tolist() for n in (6, 2, 9)]
    worst = 0.0
    with torch.no_grad():
        for i, (t, got) in enumerate(zip(tgt, eng.score(src, tgt))):
            s = src[i:i + 1, :int((src[i] != tok.pad_id).sum())]
            dec_in = torch.tensor([[model.config.decoder_start_token_id, *t]])
            logp = model(input_ids=s, decoder_input_ids=dec_in).logits.log_softmax(-1)[0]
            ref = [logp[j, y].item() for j, y in enumerate([*t, tok.eos_id])]
            worst = max(worst, *(abs(a - b) for a, b in zip(ref, got, strict=True)))
    print(f"CTranslate2 MarianMT fp32 max |log-prob diff|: {worst:.2e}")
    assert worst < 1e-4
    arch = arch_of(model)
    with torch.no_grad():
        ref_ids = arch.generate(model, src, 1)
    assert eng.generate(src) == ref_ids and max(map(len, ref_ids)) >= 3
    assert translate_served(eng, sentences) == decode.translate(model, tok, sentences)


def test_a_fused_graph_with_nans_fails_the_check(tmp_path: Path) -> None:
    """--optimize's check: a NaN the fused graph has and the unfused has not is an infinite
    difference (Python's max() would skip it), a NaN both have at one place is agreement."""
    import math

    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from ctprune.serve.export import _max_difference

    def graph(path: Path, *nodes: onnx.NodeProto) -> Path:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
        model = helper.make_model(helper.make_graph(list(nodes), "g", [x], [y]),
                                  opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save(model, str(path))
        return path

    identity = graph(tmp_path / "a.onnx", helper.make_node("Identity", ["x"], ["y"]))
    nan_out = graph(tmp_path / "b.onnx", helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Sqrt", ["n"], ["y"]))
    feeds = [{"x": np.array([1.0, 2.0, 3.0], dtype=np.float32)}]
    assert _max_difference(nan_out, identity, feeds) == math.inf
    assert _max_difference(identity, identity, [{"x": np.array([1.0, np.nan, 3.0], dtype=np.float32)}]) == 0.0


def test_serving_comes_from_the_family_registration() -> None:
    """What export supports, the graph builder and the optimizer type are the family's
    registration (``arch.Family.serving``): a family registered with a ``Serving`` is exportable
    with no serve table to edit; one registered without is refused in one line."""
    from ctprune import arch
    from ctprune.arch import Family, Serving
    from ctprune.serve import ct2
    from ctprune.serve.ct2 import ct2_of
    from ctprune.serve.export import exportable, graphs_of, serving
    from ctprune.serve.graphs import NATIVE, Graphs

    assert exportable("onnx") == exportable("ctranslate2") == ("ctprune", "marian", "t5")
    assert serving("ctprune").optimizer_type == "bart" and serving("t5").optimizer_type == "t5"
    assert all(isinstance(graphs_of(n), Graphs) for n in exportable("onnx"))
    base = arch.family("ctprune")
    try:
        arch.register("toy-served", Family(base.module, base.cls, "toy", "toy-served", ("ToyServed",),
                                           Serving("ctprune.serve.graphs:NATIVE", "bart")))
        arch.register("toy-unserved", Family(base.module, base.cls, "toy", "toy-unserved", ("ToyUnserved",)))
        assert "toy-served" in exportable("onnx") and "toy-served" not in exportable("ctranslate2")
        assert graphs_of("toy-served") is NATIVE
        with pytest.raises(CtpruneError, match="the toy-served architecture has no CTranslate2 registration"):
            ct2_of("toy-served")
        assert ct2_of("ctprune") is ct2.NATIVE and ct2_of("t5") is ct2.T5
        assert "toy-unserved" not in exportable("onnx")
        with pytest.raises(CtpruneError, match="no serving registration"):
            serving("toy-unserved")
    finally:
        for name in ("toy-served", "toy-unserved"):
            arch._REGISTRY.pop(name, None)
            arch._loaded.pop(name, None)


def test_onnxruntime_threads_do_not_spin_unless_asked(fp32: Path) -> None:
    """ctprune's loops run torch ops between session runs: idle ONNX Runtime threads sleep
    (``ort.SESSION_CONFIG``); a caller's own entries go over it."""
    key = "session.intra_op.allow_spinning"
    default = OrtSeq2Seq(fp32, threads=1)
    asked = OrtSeq2Seq(fp32, threads=1, session_config={key: "1"})
    for eng, want in ((default, "0"), (asked, "1")):
        for session in (eng.encoder, eng.decoder):
            assert session.get_session_options().get_session_config_entry(key) == want
