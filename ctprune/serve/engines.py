"""Translate and evaluate through a serving folder, whichever engine wrote it: ONNX Runtime
(``ort.OrtSeq2Seq``) or CTranslate2 (``ct2.Ct2Seq2Seq``). Both take ctprune's padded source ids
and return ctprune's token-id lists, so batching, detokenization and the report are shared."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol, TextIO

from torch import Tensor

from ctprune.errors import CtpruneError
from ctprune.model.decode import check_beam

ENGINES = ("onnxruntime", "ctranslate2")


class ServedModel(Protocol):
    tokenizer: Any
    max_len: int
    pad_id: int
    eos_id: int
    threads: int

    @property
    def precision(self) -> str: ...

    def generate(self, src: Tensor, beam: int = 1, steps: int | None = None) -> list[list[int]]: ...


def load_engine(engine: str, folder: Path, threads: int | None = None) -> ServedModel:
    """The serving folder ``folder`` opened with ``engine`` (one of ``ENGINES``)."""
    if engine == "onnxruntime":
        from ctprune.serve.ort import OrtSeq2Seq

        return OrtSeq2Seq(folder, threads)
    if engine == "ctranslate2":
        from ctprune.serve.ct2 import Ct2Seq2Seq

        return Ct2Seq2Seq(folder, threads)
    raise CtpruneError(f"--engine must be torch or one of {', '.join(ENGINES)}, got {engine!r}")


def translate_served(eng: ServedModel, sentences: list[str], beam: int = 1, batch_size: int = 128) -> list[str]:
    """Raw source sentences -> detokenized translations, batched by source length as
    ``decode.translate`` batches them (so a batch has the same padding and step limit)."""
    from ctprune.data.batching import pad

    check_beam(beam)
    tok = eng.tokenizer
    ids = [s[:eng.max_len - 1] + [eng.eos_id] for s in tok.encode(sentences)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[list[int]] = [[] for _ in ids]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        src = pad([ids[i] for i in chunk], eng.pad_id)
        for i, h in zip(chunk, eng.generate(src, beam)):
            out[i] = h
    return tok.decode(out)


def translate_stream_served(engine: str, folder: Path, inp: TextIO | None, out: TextIO | None,
                            beam: int = 1) -> None:
    """``ctprune translate --engine ENGINE``: German lines on ``inp`` -> English on ``out``."""
    from ctprune.stages.evaluate import read_source_lines

    check_beam(beam)
    eng = load_engine(engine, folder)
    lines, out = read_source_lines(inp, out)
    for hyp in translate_served(eng, lines, beam=beam) if lines else []:
        out.write(hyp + "\n")


def evaluate_served(engine: str, folder: Path, corpus: str = "multi30k", split: str = "test_2016_flickr",
                    data_dir: str | None = None, beam: int = 1, output: Path | None = None,
                    quiet: bool = False) -> dict[str, Any]:
    """``ctprune evaluate --engine ENGINE``: the report of ``stages.evaluate.evaluate``, written as
    ``SPLIT.ENGINE-PRECISION.DECODER.{en,json}`` into ``output`` (default FOLDER/eval)."""
    from ctprune.data.corpus import load_split
    from ctprune.stages.evaluate import eval_output, write_report

    check_beam(beam)
    out = eval_output(folder, output, data_dir, "serving folder")
    data = load_split(corpus, split, data_dir)
    eng = load_engine(engine, folder)
    t0 = time.perf_counter()
    hyps = translate_served(eng, data.src, beam=beam)
    return write_report(out, {"model": str(folder), "corpus": corpus, "split": split}, hyps, data.tgt, beam,
                        time.perf_counter() - t0, {"device": "cpu", "threads": eng.threads},
                        engine=f"{engine}-{eng.precision}", quiet=quiet)
