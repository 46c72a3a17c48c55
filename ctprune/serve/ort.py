"""Translate through ONNX Runtime: ctprune's own greedy and beam loops over the two graphs of a
serving folder written by ``export`` (not optimum's ``ORTModelForSeq2SeqLM``, which sizes its
key/value buffers from one head count per stack).

For ctprune's Transformer the loops follow ``ctprune.model.decode`` step for step (same step
limit, same tie-breaking argmax / topk in torch, same GNMT length penalty); for a MarianMT or T5
they follow Hugging Face's ``generate`` as ``arch.generate`` calls it (``hfgen.py``: its logits
processors, its beam search). Either way an fp32 export emits the same token ids as the PyTorch
model it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ctprune.arch import get
from ctprune.errors import CtpruneError, first_line
from ctprune.fileio import read_json
from ctprune.model.decode import beam_best, beam_start, beam_step
from ctprune.serve import hfgen
from ctprune.serve.export import (
    DECODER_FILE,
    ENCODER_FILE,
    EXPORT_FORMAT,
    GRAPHS_FILE,
    MANIFEST_FILE,
    ONNX_CORE,
    TOKENIZER_FILE,
    check_export_manifest,
    exportable,
    is_hf,
    layer_names,
)

# Intra-op threads sleep when idle instead of spinning: ctprune's loops run torch ops (argmax,
# beam bookkeeping) between session runs, and spinning ONNX Runtime threads starve torch's on a
# few cores (benchmarks/results/multi30k-origin/ort-batched.json: batch 32 on 2 threads, spinning
# 350.2 ms, not 255.8 ms; docs/serving.md has the one-sentence and 1-thread figures).
SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}


class OrtSeq2Seq:
    """The two sessions of a serving folder, with the ids and per-layer sizes of ``graphs.json``."""

    def __init__(self, folder: str | Path, threads: int | None = None, session_config: dict[str, str] | None = None,
                 profile: str | None = None) -> None:
        """Load and check a serving folder: its manifest must list every file with the size and
        SHA-256 it has. ``threads``: ONNX Runtime's intra-op threads (default: torch's count).
        ``session_config``: ONNX Runtime session config entries over ``SESSION_CONFIG`` (e.g.
        ``{"session.intra_op.allow_spinning": "1"}``); ``profile``: a file prefix for ONNX
        Runtime's profiler (``end_profiling`` of each session writes its JSON, PREFIX_encoder_* and
        PREFIX_decoder_*)."""
        import onnxruntime as ort

        from ctprune.data.tokenizer import Tokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise CtpruneError(f"serving folder not found: {folder}")
        if not (folder / MANIFEST_FILE).is_file() or not (folder / GRAPHS_FILE).is_file():
            raise CtpruneError(f"{folder} is not an ONNX serving folder (no {MANIFEST_FILE} / {GRAPHS_FILE}); "
                               "write one with: ctprune export MODEL --format onnx -o DIR")
        tok_listed = check_export_manifest(folder, EXPORT_FORMAT, ONNX_CORE, tokenizer_files=True)
        self.info: dict[str, Any] = read_json(folder / GRAPHS_FILE, "graphs description")
        self.folder = folder
        try:
            self.arch = str(self.info.get("architecture", "ctprune"))
            self.n_layers = int(self.info["n_decoder_layers"])
            self.self_heads = [int(h) for h in self.info["decoder_self_heads"]]
            self.head_dim = int(self.info["head_dim"])
            self.max_len, self.pad_id = int(self.info["max_len"]), int(self.info["pad_id"])
            self.bos_id, self.eos_id = int(self.info["bos_id"]), int(self.info["eos_id"])
            tok_files = [str(f) for f in self.info.get("tokenizer_files", [TOKENIZER_FILE])]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CtpruneError(f"{folder / GRAPHS_FILE} lacks or mistypes a field ({e})") from None
        if self.arch not in exportable("onnx") or set(tok_listed) != set(tok_files):
            raise CtpruneError(f"{folder / GRAPHS_FILE} does not match its manifest (architecture {self.arch!r}, "
                               f"tokenizer files {tok_files})")
        # A Hugging Face model decodes as its generate() does (hfgen.py); ctprune's as decode.py.
        hf = is_hf(get(self.arch))
        self.rules = hfgen.GenerationRules.from_json(self.info.get("generation")) if hf else None
        self.neutral = hfgen.GenerationRules.neutral(self.pad_id, self.bos_id, self.eos_id)  # ctprune's: raw argmax
        self.threads = threads or torch.get_num_threads()

        def options(graph: str) -> ort.SessionOptions:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = self.threads, 1
            for key, value in {**SESSION_CONFIG, **(session_config or {})}.items():
                opts.add_session_config_entry(key, value)
            if profile is not None:  # one file per session (ONNX Runtime stamps names to the second)
                opts.enable_profiling, opts.profile_file_prefix = True, f"{profile}_{graph}"
            return opts

        try:
            self.encoder = ort.InferenceSession(str(folder / ENCODER_FILE), options("encoder"),
                                                providers=["CPUExecutionProvider"])
            self.decoder = ort.InferenceSession(str(folder / DECODER_FILE), options("decoder"),
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own error types
            raise CtpruneError(f"ONNX Runtime cannot load {folder}: {first_line(e)}") from None
        self.tokenizer = self._hf_tokenizer() if hf else Tokenizer.load(folder)
        self.cross_names = layer_names("cross", self.n_layers)
        self.past_names = layer_names("past", self.n_layers)

    def _hf_tokenizer(self) -> Any:
        """The Hugging Face tokenizer of the folder, through the architecture's validating loader
        (files present, JSON bounded), with the ids and source prefix of ``graphs.json``."""
        from types import SimpleNamespace

        ids = SimpleNamespace(pad_token_id=self.pad_id, decoder_start_token_id=self.bos_id, eos_token_id=self.eos_id)
        tok = get(self.arch).load_tokenizer(self.folder, SimpleNamespace(config=ids))  # it reads only model.config
        prefix = self.info.get("source_prefix", "")
        if not isinstance(prefix, str):
            raise CtpruneError(f"{self.folder / GRAPHS_FILE}: source_prefix must be a string")
        tok.source_prefix = prefix
        return tok

    @property
    def precision(self) -> str:
        return str(self.info.get("precision", "fp32"))

    def encode(self, src: Tensor, repeat: int = 1) -> tuple[np.ndarray, list[np.ndarray]]:
        """src (B, S) ids -> src_mask (B*repeat, S) bool, cross keys/values [(B*repeat, Hc_i, S, hd)] * 2L
        (each row repeated ``repeat`` times in a row: one per beam)."""
        out = self.encoder.run(None, {"src": src.numpy().astype(np.int64)})
        if repeat > 1:
            out = [np.repeat(x, repeat, 0) for x in out]
        return out[0], out[1:]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, h, 0, self.head_dim), np.float32) for h in self.self_heads for _ in range(2)]

    def step(self, ids: Tensor, mask: np.ndarray, past: list[np.ndarray], cross: list[np.ndarray]
             ) -> tuple[Tensor, list[np.ndarray]]:
        """ids (B, 1) -> logits (B, V) as a tensor, present keys/values [(B, Hs_i, P+1, hd)] * 2L."""
        feeds = {"input_ids": ids.numpy().astype(np.int64), "src_mask": mask,
                 **dict(zip(self.past_names, past)), **dict(zip(self.cross_names, cross))}
        out = self.decoder.run(None, feeds)
        return torch.from_numpy(out[0]), out[1:]

    def reorder(self, past: list[np.ndarray], order: np.ndarray) -> list[np.ndarray]:
        """Each cache's rows in ``order`` (beam search: the beam each new one extends)."""
        return [p[order] for p in past]

    def max_steps(self, src: Tensor) -> int:
        return min(self.max_len - 1, int(src.shape[1] * 1.5) + 10)

    def greedy(self, src: Tensor, steps: int | None = None) -> list[list[int]]:
        """src (B, S) -> B token-id lists (without BOS/EOS), as ``decode.greedy`` (a Hugging Face
        model: as its ``generate``; ``steps``: EOS suppressed before, for timing). One loop,
        ``hfgen.greedy``: ctprune's Transformer takes it with neutral rules (raw argmax), all of
        ``steps`` run whatever is emitted, and a PAD emitted before EOS kept, as ``decode.greedy``."""
        limit = steps or self.max_steps(src)
        if self.rules is not None:
            return hfgen.greedy(self, src, self.rules, limit, steps or 0)
        return hfgen.greedy(self, src, self.neutral, limit, fixed=steps is not None, drop_pad=False)

    def beam_search(self, src: Tensor, beam: int, alpha: float = 0.6) -> list[list[int]]:
        """src (B, S) -> B token-id lists, as ``decode.beam_search`` (GNMT length penalty; a Hugging
        Face model: as its ``generate``, with the length penalty of its generation config)."""
        if self.rules is not None:
            return hfgen.beam_search(self, src, beam, self.rules, self.max_steps(src))
        b, k = src.shape[0], beam
        mask, cross = self.encode(src, k)  # (B*K, S)
        past = self.empty_past(b * k)
        scores, seqs, finished, lengths = beam_start(b, k, self.bos_id)
        for _ in range(self.max_steps(src)):
            logits, past = self.step(seqs[:, -1:], mask, past, cross)
            scores, src_beam, seqs, finished, lengths = beam_step(
                logits, scores, seqs, finished, lengths, self.pad_id, self.eos_id)
            past = self.reorder(past, src_beam.numpy())
            if bool(finished.all()):
                break
        return hfgen.clean(beam_best(scores, seqs, lengths, alpha), self.neutral, drop_pad=False)  # cut at EOS

    def generate(self, src: Tensor, beam: int = 1, steps: int | None = None) -> list[list[int]]:
        """src (B, S) -> B token-id lists, as the source model's architecture generates them."""
        return self.greedy(src, steps) if beam <= 1 else self.beam_search(src, beam)


def translate_onnx(engine: OrtSeq2Seq | str | Path, sentences: list[str], beam: int = 1,
                   batch_size: int = 128) -> list[str]:
    """Raw source sentences -> detokenized translations through ONNX Runtime."""
    from ctprune.serve.engines import translate_served

    eng = engine if isinstance(engine, OrtSeq2Seq) else OrtSeq2Seq(engine)
    return translate_served(eng, sentences, beam, batch_size)
