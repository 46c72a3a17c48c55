"""Stage `evaluate` (split -> hypotheses + BLEU/chrF report) and `translate` (stdin -> stdout)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from ctprune.data.corpus import load_split, split_lines
from ctprune.device import resolve_device
from ctprune.errors import CtpruneError
from ctprune.fileio import check_existing, check_output, write_json, write_text
from ctprune.model.checkpoint import load_model_folder
from ctprune.model.decode import check_beam, translate
from ctprune.scoring import score
from ctprune.stages.args import EvaluateArgs, TranslateArgs

# What `evaluate` writes into its folder: SPLIT.DECODER.en / .json (and its atomic writes' temp files).
OWN_FILE = re.compile(r"\.?[^/]+\.(greedy|beam\d+)\.(en|json)(\.[^/]*\.tmp)?")


def _is_eval_folder(path: Path) -> bool:
    """An existing folder that only `evaluate` wrote into (or an empty one): safe to add to."""
    return path.is_dir() and not path.is_symlink() and all(
        p.is_file() and not p.is_symlink() and OWN_FILE.fullmatch(p.name) for p in path.iterdir())


def evaluate(args: EvaluateArgs) -> dict[str, Any]:
    """Translate ``args.split``, score it, write ``SPLIT.DECODER.en`` and ``SPLIT.DECODER.json``
    into ``args.output`` (default MODEL/eval), print a summary unless ``quiet``, and return the
    report. ``engine`` other than torch: the model is a serving folder (``ctprune export``)."""
    if args.engine != "torch":
        from ctprune.serve.engines import evaluate_served

        return evaluate_served(args.engine, args.model, corpus=args.corpus, split=args.split, data_dir=args.data_dir,
                               beam=args.beam, output=args.output, quiet=args.quiet)
    check_beam(args.beam)
    out = eval_output(args.model, args.output, args.data_dir, "model folder")
    dev = resolve_device(args.device)
    data = load_split(args.corpus, args.split, args.data_dir)
    model, tok, _ = load_model_folder(args.model, dev)
    t0 = time.perf_counter()
    hyps = translate(model, tok, data.src, beam=args.beam, progress=not args.quiet)
    return write_report(out, {"model": str(args.model), "corpus": args.corpus, "split": args.split}, hyps, data.tgt,
                        args.beam, time.perf_counter() - t0, {"device": dev, "threads": torch.get_num_threads()},
                        quiet=args.quiet)


def eval_output(model_dir: Path, output: Path | None, data_dir: str | None, what: str) -> Path:
    """The folder ``evaluate`` writes into (default MODEL/eval), checked before any work: not an
    input, not a file, empty or holding only ``evaluate``'s own files."""
    out = Path(output) if output else Path(model_dir) / "eval"
    check_output(out, {what: model_dir, "data folder": data_dir}, may_be_inside=(what,))
    if out.exists() and not out.is_dir():
        raise CtpruneError(f"output {out} exists and is not a folder; -o names the folder for the hypotheses")
    check_existing(out, _is_eval_folder, "empty or an `evaluate` folder (it holds files `evaluate` does not write)")
    return out


def write_report(out: Path, head: dict[str, Any], hyps: list[str], refs: list[str], beam: int, seconds: float,
                 where: dict[str, Any], engine: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Score ``hyps``, write ``SPLIT[.ENGINE].DECODER.en`` / ``.json`` into ``out``, print the
    summary unless ``quiet``, and return the report (``head`` first, ``where`` last)."""
    s = score(hyps, refs)
    decoder = "greedy" if beam == 1 else f"beam{beam}"
    report = {**head, **({"engine": engine} if engine else {}), "decoder": decoder,
              "sentences": len(hyps), "bleu": round(s.bleu, 2), "chrf": round(s.chrf, 2),
              "bleu_detail": s.bleu_text, "bleu_signature": s.bleu_signature,
              "chrf_signature": s.chrf_signature, "translate_seconds": round(seconds, 2), **where}
    stem = ".".join(x for x in (head["split"], engine, decoder) if x)
    write_text(out / f"{stem}.en", "\n".join(hyps) + "\n")
    write_json(out / f"{stem}.json", report)
    if not quiet:
        label = ", ".join(x for x in (engine, decoder) if x)
        print(f"{head['corpus']} {head['split']} ({label}, {len(hyps)} sentences, {seconds:.1f}s)")
        print(f"  {s.bleu_text}")
        print(f"  signature: {s.bleu_signature}")
        print(f"  {s.chrf_text}  ({s.chrf_signature})")
        print(f"  hypotheses: {out / f'{stem}.en'}")
    return report


def read_source_lines(inp: TextIO | None, out: TextIO | None) -> tuple[list[str], TextIO]:
    """The German lines of ``inp`` and the open ``out`` (checked: both streams open, UTF-8)."""
    if inp is None or inp.closed:  # `ctprune translate <&-`: Python gives sys.stdin = None
        raise CtpruneError("standard input is closed; give one German sentence per line on it")
    if out is None or out.closed:
        raise CtpruneError("standard output is closed; the translations are written to it")
    data = inp.buffer.read() if hasattr(inp, "buffer") else inp.read().encode("utf-8")
    try:
        return split_lines(data.decode("utf-8")), out
    except UnicodeDecodeError as e:
        raise CtpruneError(f"standard input is not UTF-8 text (byte {e.start}); give one German sentence "
                           "per line") from None


def translate_stream(args: TranslateArgs, inp: TextIO | None, out: TextIO | None) -> None:
    """Read German lines from ``inp``, write one English line per input line to ``out``."""
    if args.engine != "torch":
        from ctprune.serve.engines import translate_stream_served

        translate_stream_served(args.engine, args.model, inp, out, beam=args.beam)
        return
    check_beam(args.beam)
    model, tok, _ = load_model_folder(args.model, resolve_device(args.device))
    lines, out = read_source_lines(inp, out)
    for hyp in translate(model, tok, lines, beam=args.beam) if lines else []:
        out.write(hyp + "\n")
