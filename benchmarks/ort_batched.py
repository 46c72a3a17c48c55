"""Where batched greedy decoding spends its time: PyTorch eager vs ONNX Runtime fp32 (issue 24).

``benchmarks/serving.py`` found ONNX Runtime fp32 slower than PyTorch on a batch of 32 (0.57x at
the Multi30k origin) though faster on one sentence. This benchmark takes that batch and asks why:

- timing: the origin's first 32 test sentences, greedy for exactly the origin's step count, on
  PyTorch eager, on ONNX Runtime fp32 as ctprune runs it (intra-op threads not spinning:
  ``ort.SESSION_CONFIG``), and on the same with ONNX Runtime's default, spinning threads
  (``session.intra_op.allow_spinning=1``); one warm-up round, then --runs
  rounds each running every variant once in a shuffled order; median and p90 in ms;
- components, timed apart in the same rounds: the encoder (PyTorch ``model.encode``; ONNX
  Runtime's encoder graph, which also computes the cross keys/values) and, per engine, the
  decoding loop that follows;
- operators: one more profiled run per engine after a warm-up run (ONNX Runtime's profiler,
  events of the warm-up dropped; ``torch.profiler``), the time per operator type, the output
  projection (the MatMul / Gemm / addmm whose output is (batch, vocab)) named apart. Profiled runs
  are slower than plain ones: read their shares, not their sums. ONNX Runtime's shares cover its
  graph nodes only, not the torch work ctprune's loop does between session runs.

ctprune's own Transformer only (``decode.greedy``, ``model.cfg``).

Usage:
    python benchmarks/ort_batched.py MODEL [--data-dir DIR] [--runs 20] [--threads 2] [--output F]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from timing import interleaved_ms, p90  # benchmarks/ is this script's sys.path[0]

from ctprune.data.batching import pad
from ctprune.data.corpus import load_split
from ctprune.fileio import write_json
from ctprune.model.checkpoint import load_model_folder
from ctprune.model.decode import greedy
from ctprune.serve.export import ExportArgs, export
from ctprune.serve.ort import OrtSeq2Seq

BATCH = 32
SPIN = {"session.intra_op.allow_spinning": "1"}  # ONNX Runtime's own default


PROJECTION_OPS = ("MatMul", "Gemm", "FusedMatMul")


def ort_operators(profile: Path, vocab: int, after_us: float) -> dict[str, float]:
    """ms per operator type in one ONNX Runtime profile (node events from ``after_us`` on), the
    matrix products whose output's last dimension is the vocabulary counted as ``output projection``."""
    out: dict[str, float] = collections.defaultdict(float)
    for e in json.loads(profile.read_text()):
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < after_us:
            continue
        args = e.get("args", {})
        shapes = [next(iter(s.values())) for s in args.get("output_type_shape", [])]
        op = args.get("op_name", "?")
        if op in PROJECTION_OPS and any(s and s[-1] == vocab for s in shapes):
            op = "output projection"
        out[op] += e["dur"] / 1e3
    return dict(out)


def torch_operators(run: Callable[[], Any], vocab: int) -> dict[str, float]:
    """ms per aten operator (self CPU time) of one run under ``torch.profiler``, the linear ops
    whose output is (batch, vocab) counted as ``output projection``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    out: dict[str, float] = collections.defaultdict(float)
    for e in prof.key_averages(group_by_input_shape=True):
        shapes = [s for s in e.input_shapes if s]
        projection = e.key in ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul") and any(
            s[-1] == vocab or (len(s) == 2 and s[0] == vocab) for s in shapes)
        out["output projection" if projection else e.key] += e.self_cpu_time_total / 1e3
    return dict(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--split", default="test_2016_flickr")
    ap.add_argument("--runs", type=int, default=20, help="timed rounds after one warm-up round")
    ap.add_argument("--threads", type=int, default=2, help="torch threads = ONNX Runtime intra-op threads")
    ap.add_argument("--seed", type=int, default=0, help="of the per-round order")
    ap.add_argument("--output", type=Path, default=None, help="write the results here as JSON")
    a = ap.parse_args()
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    model, tok, _ = load_model_folder(a.model)
    vocab = model.cfg.vocab_size
    data = load_split("multi30k", a.split, a.data_dir)
    ids = [s[:model.cfg.max_len - 1] + [tok.eos_id] for s in tok.encode(data.src[:BATCH])]
    src = pad(ids, tok.pad_id)  # (B, S)
    with torch.inference_mode():
        steps = max(map(len, greedy(model, src))) + 1
    with tempfile.TemporaryDirectory() as tmp:
        export(ExportArgs(model=a.model, output=Path(tmp) / "onnx"), quiet=True)
        engines = {"ort-fp32": OrtSeq2Seq(Path(tmp) / "onnx", threads=a.threads),
                   "ort-fp32 spinning": OrtSeq2Seq(Path(tmp) / "onnx", threads=a.threads, session_config=SPIN)}
        cells: dict[str, Callable[[], Any]] = {"torch": lambda: greedy(model, src, steps=steps)}
        cells["torch encoder"] = lambda: model.encode(src)
        for name, eng in engines.items():
            cells[name] = lambda e=eng: e.greedy(src, steps=steps)
            cells[f"{name} encoder"] = lambda e=eng: e.encode(src)
        times = interleaved_ms(cells, a.runs, a.seed)
        with torch.inference_mode():
            prof = OrtSeq2Seq(Path(tmp) / "onnx", threads=a.threads, profile=str(Path(tmp) / "prof"))
            prof.greedy(src, steps=steps)  # warm-up: its events are dropped
            after = {s: (time.time_ns() - s.get_profiling_start_time_ns()) / 1e3 for s in (prof.encoder, prof.decoder)}
            prof.greedy(src, steps=steps)
            ort_ops: dict[str, float] = collections.defaultdict(float)
            for session in (prof.encoder, prof.decoder):  # as ctprune runs it
                for op, ms in ort_operators(Path(session.end_profiling()), vocab, after[session]).items():
                    ort_ops[op] += ms
            torch_ops = torch_operators(lambda: greedy(model, src, steps=steps), vocab)
    stats = {c: {"median_ms": round(statistics.median(t), 2), "p90_ms": round(p90(t), 2)} for c, t in times.items()}
    torch_ms = stats["torch"]["median_ms"]
    for c, s in stats.items():
        whole = c.removesuffix(" encoder")
        s["x_torch"] = round(torch_ms / s["median_ms"], 3) if c == whole else None
        print(f"{c:<26} median {s['median_ms']:8.1f} ms  p90 {s['p90_ms']:8.1f} ms"
              + (f"  x{s['x_torch']:.2f} torch" if s["x_torch"] is not None else
                 f"  ({s['median_ms'] / stats[whole]['median_ms']:.0%} of its whole run)"))

    def ranked(ops: dict[str, float]) -> list[dict[str, Any]]:
        total = sum(ops.values())
        return [{"op": op, "ms": round(ms, 2), "share": round(ms / total, 4)}
                for op, ms in sorted(ops.items(), key=lambda kv: -kv[1])]

    profiles = {"ort-fp32": ranked(ort_ops), "torch": ranked(torch_ops)}
    for name, rows in profiles.items():
        print(f"{name} profiled run, time by operator: "
              + ", ".join(f"{r['op']} {r['share']:.0%}" for r in rows[:8]))
    import onnxruntime

    out = {"model": str(a.model), "split": a.split, "batch": BATCH, "src_len": int(src.shape[1]), "steps": steps,
           "runs": a.runs, "threads": a.threads, "timings": stats, "operators": profiles,
           "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
           "seconds": round(time.perf_counter() - t_start, 1)}
    print(json.dumps({k: out[k] for k in ("batch", "steps", "runs", "threads", "seconds")}))
    if a.output:
        write_json(a.output, out)


if __name__ == "__main__":
    main()
