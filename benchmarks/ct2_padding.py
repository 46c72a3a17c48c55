"""What CTranslate2's head padding costs: the same number of heads, spread unevenly or evenly.

CTranslate2 holds one head count per stack, so ``export --format ctranslate2`` zero-pads every
attention block to its stack's widest (``ctprune.serve.ct2``). Models compared, all built from one
origin by cutting heads (L1 importance; FFNs untouched): ``uneven`` keeps 6/4/2 heads of 8 in
layers 0/1/2 of each stack (decoder cross-attention 2/4/6), so CTranslate2 computes 6 heads per
block where 4 are real on average; ``skewed`` keeps 8/2/2 (padded to 8: the origin's work);
``uniform`` keeps 4 heads everywhere: the same total heads as both, nothing padded; and the origin.
Padding's cost is uneven (or skewed) latency / uniform latency; PyTorch eager, which runs each
block at its own size, is timed beside it as the reference without padding.

Workloads: one random 15-token sentence, and 32 of them in a batch, greedy with exactly --steps
steps (CTranslate2: EOS suppressed before). One warm-up round, then --runs rounds, each running
every (model, engine, workload) once in a shuffled order; median in ms, threads pinned. Without
MODEL, a random model of the ``seed`` preset (3+3 layers, d 512, 8 heads, FFN 512) with a
tokenizer trained on the synthetic corpus. Usage:
    python benchmarks/ct2_padding.py [MODEL] [--runs 20] [--steps 20] [--threads 1] [--output padding.json]
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
from timing import interleaved_ms  # benchmarks/ is this script's sys.path[0]

from ctprune.fileio import write_json
from ctprune.model.checkpoint import load_model_folder, save_model_folder
from ctprune.model.decode import greedy
from ctprune.pruning import importance, surgery
from ctprune.serve.ct2 import Ct2Seq2Seq
from ctprune.serve.export import ExportArgs, export

# heads kept per layer (of 8 in the seed preset), per stack: encoder self, decoder self, decoder cross
PATTERNS = {"uneven": ([6, 4, 2], [2, 4, 6], [6, 2, 4]),
            "skewed": ([8, 2, 2], [2, 8, 2], [2, 2, 8]),
            "uniform": ([4, 4, 4], [4, 4, 4], [4, 4, 4])}


def random_origin(folder: Path) -> None:
    """A random ``seed``-preset model with a sentencepiece tokenizer of the synthetic corpus."""
    from ctprune.data.corpus import load_split
    from ctprune.data.tokenizer import Tokenizer
    from ctprune.model.transformer import ModelConfig, Seq2SeqTransformer

    data = load_split("synthetic", "train", None)
    tok = Tokenizer.train(data.src + data.tgt, 8000)
    torch.manual_seed(0)
    model = Seq2SeqTransformer(ModelConfig.preset("seed", tok.vocab_size, dropout=0.0)).eval()
    save_model_folder(folder, model, tok, {"stage": "ct2 padding benchmark"})


def cut(origin: torch.nn.Module, pattern: tuple[list[int], ...]) -> torch.nn.Module:
    """A copy of ``origin`` keeping the L1-most-important heads per ``pattern``."""
    import copy

    model = copy.deepcopy(origin)
    enc, dec_self, dec_cross = pattern
    names = ([(f"encoder.layers.{i}.self_attn", n) for i, n in enumerate(enc)]
             + [(f"decoder.layers.{i}.self_attn", n) for i, n in enumerate(dec_self)]
             + [(f"decoder.layers.{i}.cross_attn", n) for i, n in enumerate(dec_cross)])
    for name, n in names:
        block = model.get_submodule(name)
        if n < block.n_heads:
            keep = importance.head_l1(block).topk(n).indices.sort().values
            surgery.replace_module(model, name, surgery.cut_heads(block, keep))
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, nargs="?", default=None, help="an origin with 3+3 layers of 8 heads")
    ap.add_argument("--runs", type=int, default=20, help="timed rounds after one warm-up round")
    ap.add_argument("--steps", type=int, default=20, help="decoding steps per call")
    ap.add_argument("--threads", type=int, default=1, help="torch threads = CTranslate2 intra-op threads")
    ap.add_argument("--output", type=Path, default=None, help="write the results here as JSON")
    a = ap.parse_args()
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if a.model is None:
            random_origin(tmp / "origin")
        origin_dir = a.model or tmp / "origin"
        origin, tok, _ = load_model_folder(origin_dir)
        models = {"origin": origin, **{name: cut(origin, p) for name, p in PATTERNS.items()}}
        g = torch.Generator().manual_seed(0)
        src = torch.randint(4, origin.cfg.vocab_size, (32, 15), generator=g)
        src[:, -1] = tok.eos_id
        work = {"single": src[:1], "batch": src}
        cells: dict[tuple[str, str], Callable[[torch.Tensor], Any]] = {}
        info: dict[str, Any] = {}
        for i, (name, model) in enumerate(models.items()):
            save_model_folder(tmp / f"m{i}", model, tok, {"stage": "ct2 padding benchmark", "model": name})
            cells[name, "torch"] = lambda s, m=model: greedy(m, s, steps=a.steps)
            for q in ("none", "int8"):
                spec = export(ExportArgs(model=tmp / f"m{i}", output=tmp / f"ct2-{i}-{q}", format="ctranslate2",
                                         quantize=q), quiet=True)
                eng = Ct2Seq2Seq(tmp / f"ct2-{i}-{q}", threads=a.threads)
                cells[name, f"ct2-{spec['precision']}"] = lambda s, e=eng: e.generate(s, steps=a.steps)
            info[name] = {"num_heads": spec["num_heads"], "padded_fraction": spec["padded_fraction"],
                          "real_heads": sum(map(sum, spec["heads"].values()))}
        times = interleaved_ms({(c, w): (lambda f=cells[c], s=src: f(s)) for c in cells for w, src in work.items()},
                               a.runs)
    med = {k: statistics.median(v) for k, v in times.items()}
    results = []
    for (model, engine) in cells:
        row: dict[str, Any] = {"model": model, "engine": engine, **info[model]}
        for w in work:
            row[w] = {"median_ms": round(med[(model, engine), w], 2),
                      "vs_uniform": round(med[(model, engine), w] / med[("uniform", engine), w], 3),
                      "vs_origin": round(med[(model, engine), w] / med[("origin", engine), w], 3)}
        results.append(row)
        print(f"{model:<8} {engine:<9} heads {row['real_heads']:>2} (per-stack {row['num_heads']}, "
              f"padded {row['padded_fraction']:.0%})  " + "  ".join(
                  f"{w} {row[w]['median_ms']:7.1f} ms x{row[w]['vs_uniform']:.2f} uniform x{row[w]['vs_origin']:.2f} "
                  f"origin" for w in work), flush=True)
    import ctranslate2

    out = {"model": str(a.model) if a.model else "random seed preset", "vocab_size": origin.cfg.vocab_size,
           "runs": a.runs, "steps": a.steps, "threads": a.threads, "patterns": PATTERNS,
           "versions": {"torch": torch.__version__, "ctranslate2": ctranslate2.__version__},
           "wall_s": round(time.perf_counter() - t_start, 1), "results": results}
    print(json.dumps(out))
    if a.output:
        write_json(a.output, out)


if __name__ == "__main__":
    main()
