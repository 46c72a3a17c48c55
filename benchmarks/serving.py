"""Serving latency and BLEU on CPU: PyTorch eager vs ONNX Runtime fp32 / int8 vs CTranslate2 int8,
origin vs pruned, for any architecture ctprune exports (its own Transformer, MarianMT, T5).

Models: the origin, every attention head + FFN neuron kept at each of --ratios (built by
``pruned_speed.composed_models``; its unstructured case is left out) and any --extra model folder
of the same origin (e.g. a searched configuration, finetuned; its blocks pruned unevenly, so
CTranslate2 pads its heads: each CTranslate2 cell reports its ``padded_fraction``). Engines:
PyTorch eager (the architecture's own ``generate``: ``decode.greedy``, or Hugging Face's
``generate``), ONNX Runtime fp32 and int8, CTranslate2 int8 (heads zero-padded per stack); each
model is saved and exported with ``ctprune.serve.export`` into a temp folder. Workloads:
``single``, one sentence at batch 1 (the first of median source length), and ``batch``, the first
32 sentences padded into one batch; greedy with exactly the origin's step count on those inputs
(its output length + EOS), so every cell does the same work (EOS suppressed before that step).
Timing: one warm-up round, then --runs rounds, each running every (model, engine, workload) once
in a shuffled order; median and p90 in ms. Threads pinned: torch, ONNX Runtime and CTranslate2
intra-op all --threads (inter-op 1). BLEU: greedy on the first --sentences sentences of
test_2016_flickr (``decode.translate`` / ``translate_served``), with the fraction of translations
identical to the same model's PyTorch ones. Components, for every cell: the same input decoded
for one step only, timed in the same rounds, gives the encoder + first step
(``encoder_and_first_step_ms``), and (median whole - median one step) / (steps - 1) the cost of
a later step (``later_step_ms``; a difference of medians: on a noisy cell it can be off, even
negative); the output projection's share needs a profiler (``ort_batched.py``, origin,
ONNX Runtime and PyTorch). Not measured: GPU. Usage:
    python benchmarks/serving.py MODEL [--data-dir DIR] [--ratios 0.75 0.5 0.25] [--extra NAME=DIR ...]
        [--runs 30] [--sentences 1000] [--threads 2] [--output serving.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pruned_speed import RATIOS, composed_models  # benchmarks/ is this script's sys.path[0]
from timing import interleaved_ms, p90

from ctprune.arch import Architecture, arch_of
from ctprune.data.batching import pad
from ctprune.data.corpus import load_split
from ctprune.fileio import write_json
from ctprune.model.checkpoint import load_model_folder, save_model_folder
from ctprune.model.decode import translate
from ctprune.serve.ct2 import Ct2Seq2Seq
from ctprune.serve.engines import translate_served
from ctprune.serve.export import ExportArgs, export
from ctprune.serve.ort import OrtSeq2Seq
from ctprune.task import TRANSLATION

ENGINES = ("torch", "ort-fp32", "ort-int8", "ct2-int8")
BATCH = 32


Cell = tuple[Callable[[torch.Tensor, int], Any], Callable[[list[str]], list[str]]]


def runners(arch: Architecture, models: dict[str, torch.nn.Module], tok: Any, tmp: Path, threads: int,
            padded: dict[str, float]) -> dict[tuple[str, str], Cell]:
    """(model, engine) -> (greedy(src (B, S), steps), translate(sentences)), exporting each model to
    ONNX (fp32, int8) and CTranslate2 (int8); ``padded`` gets each model's fraction of CTranslate2
    heads that are padding."""
    out: dict[tuple[str, str], Any] = {}
    for i, (name, model) in enumerate(models.items()):
        folder = tmp / f"model-{i}"
        save_model_folder(folder, model, tok, {"stage": "serving benchmark", "model": name})
        out[name, "torch"] = (lambda src, n, m=model: arch.generate(m, src, steps=n),
                              lambda s, m=model: translate(m, tok, s))
        for q in ("fp32", "int8"):
            export(ExportArgs(model=folder, output=tmp / f"onnx-{i}-{q}", quantize="none" if q == "fp32" else q),
                   quiet=True)
            eng = OrtSeq2Seq(tmp / f"onnx-{i}-{q}", threads=threads)
            out[name, f"ort-{q}"] = (lambda src, n, e=eng: e.greedy(src, steps=n),
                                     lambda s, e=eng: translate_served(e, s))
        export(ExportArgs(model=folder, output=tmp / f"ct2-{i}-int8", format="ctranslate2", quantize="int8"),
               quiet=True)
        ct2 = Ct2Seq2Seq(tmp / f"ct2-{i}-int8", threads=threads)
        padded[name] = float(ct2.info["padded_fraction"])
        out[name, "ct2-int8"] = (lambda src, n, e=ct2: e.generate(src, steps=n),
                                 lambda s, e=ct2: translate_served(e, s))
    return out


def extra_models(specs: list[str], arch: Architecture, tok: Any, sentences: list[str]) -> dict[str, torch.nn.Module]:
    """NAME=DIR -> the model of DIR; of the origin's architecture, its tokenizer encoding
    ``sentences`` as the origin's ``tok`` does."""
    out = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"--extra takes NAME=DIR, got {spec!r}")
        model, its_tok, _ = load_model_folder(Path(folder))
        if arch_of(model).name != arch.name:
            raise SystemExit(f"--extra {name}: {folder} is a {arch_of(model).name} model, the origin a {arch.name} one")
        if its_tok.encode(sentences) != tok.encode(sentences):
            raise SystemExit(f"--extra {name}: {folder} has another tokenizer than the origin")
        out[name] = model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--split", default="test_2016_flickr")
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS), choices=RATIOS)
    ap.add_argument("--extra", nargs="+", default=[], metavar="NAME=DIR",
                    help="more model folders to time, with the origin's tokenizer (e.g. a searched configuration)")
    ap.add_argument("--runs", type=int, default=30, help="timed rounds after one warm-up round")
    ap.add_argument("--sentences", type=int, default=None, help="first sentences of the split (default: all)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads = ONNX Runtime intra-op threads")
    ap.add_argument("--seed", type=int, default=0, help="of the per-round order")
    ap.add_argument("--output", type=Path, default=None, help="write the results here as JSON")
    a = ap.parse_args()
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    origin, tok, _ = load_model_folder(a.model)
    arch = arch_of(origin)
    data = load_split("multi30k", a.split, a.data_dir)
    src_text, refs = data.src[:a.sentences], data.tgt[:a.sentences]
    ids = [s[:arch.max_len(origin) - 1] + [tok.eos_id] for s in tok.encode(src_text)]
    median_len = sorted(map(len, ids))[len(ids) // 2]
    single = pad([next(s for s in ids if len(s) == median_len)], tok.pad_id)  # (1, S)
    batch = pad(ids[:BATCH], tok.pad_id)  # (B, S)
    with torch.inference_mode():  # the origin's output lengths fix every cell's step count
        work = {w: (src, max(map(len, arch.generate(origin, src))) + 1)
                for w, src in (("single", single), ("batch", batch))}
    with tempfile.TemporaryDirectory() as tmp:
        built = composed_models(a.model, Path(tmp))
        models = {"origin": origin, **{f"heads+ffn {r}": built[f"heads+ffn {r}"] for r in a.ratios},
                  **extra_models(a.extra, arch, tok, src_text[:100])}
        padded: dict[str, float] = {}
        cells = runners(arch, models, tok, Path(tmp), a.threads, padded)
        # Each cell also decodes one step alone: the encoder and the first step, apart from the rest.
        times = interleaved_ms({(c, w, first): (lambda f=cells[c][0], s=src, k=1 if first else n: f(s, k))
                                for c in cells for w, (src, n) in work.items() for first in (False, True)},
                               a.runs, a.seed)
        with torch.inference_mode():
            hyps = {cell: fns[1](src_text) for cell, fns in cells.items()}
    results = []
    for (model, engine) in cells:
        r: dict[str, Any] = {"model": model, "engine": engine,
                             "bleu": round(TRANSLATION.measure(hyps[model, engine], refs), 2),
                             "same_as_torch": round(sum(x == y for x, y in zip(hyps[model, engine],
                                                                                 hyps[model, "torch"])) / len(refs), 4)}
        if engine.startswith("ct2"):
            r["padded_fraction"] = padded[model]
        for w, (_, n) in work.items():
            ms = times[(model, engine), w, False]
            med, first = statistics.median(ms), statistics.median(times[(model, engine), w, True])
            r[w] = {"median_ms": round(med, 2), "p90_ms": round(p90(ms), 2),
                    "speedup_vs_engine_origin": round(statistics.median(times[("origin", engine), w, False]) / med, 3),
                    "speedup_vs_torch_origin": round(statistics.median(times[("origin", "torch"), w, False]) / med, 3),
                    "encoder_and_first_step_ms": round(first, 2),
                    "later_step_ms": round((med - first) / (n - 1), 3) if n > 1 else None}
        results.append(r)
        print(f"{model:<15} {engine:<8} " + "  ".join(
            f"{w} {r[w]['median_ms']:8.1f} ms (p90 {r[w]['p90_ms']:8.1f}) x{r[w]['speedup_vs_engine_origin']:.2f} "
            f"engine-origin x{r[w]['speedup_vs_torch_origin']:.2f} torch-origin" for w in work)
            + f"  BLEU {r['bleu']:5.2f} (same as torch {r['same_as_torch']:.0%})"
            + (f"  padded heads {r['padded_fraction']:.0%}" if "padded_fraction" in r else ""), flush=True)
    import ctranslate2
    import onnxruntime

    out = {"model": str(a.model), "split": a.split, "sentences": len(refs), "runs": a.runs, "threads": a.threads,
           "workloads": {w: {"batch": int(src.shape[0]), "src_len": int(src.shape[1]), "steps": n}
                         for w, (src, n) in work.items()},
           "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                        "ctranslate2": ctranslate2.__version__},
           "wall_s": round(time.perf_counter() - t_start, 1), "results": results}
    print(json.dumps(out))
    if a.output:
        write_json(a.output, out)


if __name__ == "__main__":
    main()
