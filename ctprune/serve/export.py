"""Stage `export`: a model folder -> a serving folder for ONNX Runtime or CTranslate2.

``--format onnx`` (ctprune's Transformer, MarianMT or T5): the serving folder holds
``encoder.onnx`` and ``decoder_step.onnx`` (see ``graphs.py`` and ``graphs_hf.py``: each layer's
key/value tensors carry that layer's own head count), the model's tokenizer files
(``tokenizer.model``; MarianMT's ``source.spm`` / ``target.spm`` / ``vocab.json``, T5's
``tokenizer.json`` with transformers 5: what ``save_pretrained`` writes) and ``config.json``, ``graphs.json`` (every
graph's inputs and outputs with dtypes and shapes, the special token ids, the tokenizer's files,
for a Hugging Face model its per-layer sizes and generation rules, the precision, versions and
the source model's fingerprint) and ``manifest.json`` (size and SHA-256 of every other file). The folder is
written beside the output under a temporary name and renamed into place, so it is whole or
absent.

Graphs come from ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript; the
TorchScript exporter is deprecated since torch 2.9). ``quantize="int8"``: ONNX Runtime's
dynamic quantization, int8 weights per output channel, activations quantized at run time.
``optimize=True``: ONNX Runtime's transformer optimizer on both graphs before any quantization
(``optimize_graphs``), each fused graph checked against the unfused one and kept only if it
gives the same outputs.

``--format ctranslate2`` (ctprune's Transformer, MarianMT, T5): CTranslate2's ``model.bin``,
``config.json`` and ``shared_vocabulary.json`` (heads zero-padded per stack: see ``ct2.py``),
the tokenizer (a Hugging Face one in ``tokenizer/``), ``spec.json`` (what ``graphs.json`` is for
ONNX, plus the padding) and ``manifest.json``, written the same way. ``quantize="int8"``: int8
weights per output row, run with CTranslate2's ``int8`` compute type.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ctprune.errors import CtpruneError, first_line
from ctprune.fileio import check_existing, check_output, read_json, write_json, write_text

if TYPE_CHECKING:
    from ctprune.arch import Architecture, Serving
    from ctprune.serve.graphs import Graphs
    from ctprune.serve.hfgen import GenerationRules

FORMATS = ("onnx", "ctranslate2")
QUANTIZE = ("none", "int8")
EXPORT_FORMAT = "ctprune-onnx/1"
ENCODER_FILE, DECODER_FILE = "encoder.onnx", "decoder_step.onnx"
GRAPHS_FILE, MANIFEST_FILE, CONFIG_FILE, TOKENIZER_FILE = (
    "graphs.json", "manifest.json", "config.json", "tokenizer.model")
ONNX_CORE = (ENCODER_FILE, DECODER_FILE, CONFIG_FILE, GRAPHS_FILE)  # + the tokenizer's files
OPSET = 20  # what torch 2.13's exporter emits by default; ONNX Runtime >= 1.17 runs it
# The fused ops that get_fused_operator_statistics counts, and the FusionOptions switch of each:
# a fused graph that changes the outputs is tried again without the fusions it used.
FUSION_SWITCHES = {"Attention": "enable_attention", "MultiHeadAttention": "enable_attention",
                   "LayerNormalization": "enable_layer_norm", "SkipLayerNormalization": "enable_skip_layer_norm",
                   "SimplifiedLayerNormalization": "enable_layer_norm",
                   "SkipSimplifiedLayerNormalization": "enable_skip_layer_norm",
                   "EmbedLayerNormalization": "enable_embed_layer_norm", "Gelu": "enable_gelu",
                   "FastGelu": "enable_gelu_approximation", "BiasGelu": "enable_bias_gelu",
                   "GemmFastGelu": "enable_gemm_fast_gelu", "RotaryEmbedding": "enable_rotary_embeddings"}
OPTIMIZE_TOLERANCE = 1e-4  # max |fused - unfused| over the probes, relative to max(1, max |unfused|)


@dataclass(frozen=True)
class ExportArgs:
    """model: a ctprune model folder; output: the serving folder to write."""

    model: Path
    output: Path
    format: str = "onnx"
    quantize: str = "none"
    optimize: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise CtpruneError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.quantize not in QUANTIZE:
            raise CtpruneError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.optimize and self.format != "onnx":
            raise CtpruneError(f"--optimize applies to --format onnx only (ONNX Runtime's graph fusions), "
                               f"not --format {self.format}")


def is_export_folder(folder: Path) -> bool:
    """Whether ``folder`` is a serving folder written by ``export`` (so it may be replaced)."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return False
    try:
        manifest = read_json(path, "export manifest")
    except CtpruneError:
        return False
    from ctprune.serve.ct2 import CT2_FORMAT

    return isinstance(manifest, dict) and manifest.get("format") in (EXPORT_FORMAT, CT2_FORMAT)


def check_export_manifest(folder: Path, fmt: str, files: tuple[str, ...], tokenizer_files: bool = False
                          ) -> tuple[str, ...]:
    """Refuse a serving folder whose manifest does not list exactly ``files`` (with
    ``tokenizer_files``: ``files`` and any more, the tokenizer's, which the caller matches against
    its description), each with the size and SHA-256 it has. Return the further files listed."""
    from ctprune.model.checkpoint import check_manifest

    manifest = read_json(folder / MANIFEST_FILE, "export manifest")
    listed = tuple(manifest.get("files", {})) if isinstance(manifest, dict) else ()
    extra = tuple(f for f in listed if f not in files)
    if not set(files) <= set(listed) or (extra and not tokenizer_files):
        also = " and the tokenizer's files" if tokenizer_files else ""
        raise CtpruneError(f"export manifest {folder / MANIFEST_FILE} must list {', '.join(files)}{also}; "
                           f"it lists {', '.join(sorted(listed)) or 'nothing'}")
    bad = [f for f in extra if not isinstance(f, str) or Path(f).is_absolute() or ".." in Path(f).parts]
    if bad:
        raise CtpruneError(f"export manifest {folder / MANIFEST_FILE} lists a file outside its folder: {bad[0]!r}")
    check_manifest(folder, fmt, listed)
    return extra


def layer_names(prefix: str, n_layers: int) -> list[str]:
    """``[prefix.0.key, prefix.0.value, prefix.1.key, ...]``: the flat order graphs use."""
    return [f"{prefix}.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter reports progress with print(), warnings and log records; a CLI command
    should print only its own summary."""
    loggers = [logging.getLogger("torch.onnx"), logging.getLogger()]  # quantize_dynamic logs to root
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as devnull, \
                contextlib.redirect_stdout(devnull):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@dataclass(frozen=True)
class Layout:
    """What the step graph's inputs look like: per decoder layer the self- and cross-attention
    head counts (each layer its own), the head size, the ids and the position limit."""

    vocab_size: int
    pad_id: int
    bos_id: int  # the decoder's start token
    max_len: int
    head_dim: int
    decoder_self_heads: list[int]
    decoder_cross_heads: list[int]

    @property
    def n_decoder_layers(self) -> int:
        return len(self.decoder_self_heads)


def exportable(fmt: str) -> tuple[str, ...]:
    """The registered families that export to ``fmt`` (their ``Serving.formats`` name it)."""
    from ctprune.arch import family, names

    return tuple(n for n in names() if (s := family(n).serving) is not None and fmt in s.formats)


def serving(arch: str) -> Serving:
    """The serving registration of family ``arch``; a family without one is refused."""
    from ctprune.arch import family

    s = family(arch).serving
    if s is None:
        raise CtpruneError(f"the {arch} architecture has no serving registration; ctprune export supports "
                           f"{', '.join(exportable('onnx'))}")
    return s


def graphs_of(arch: str) -> Graphs:
    """Family ``arch``'s ONNX graph builder, imported from where its registration names it."""
    import importlib

    module, _, attr = serving(arch).graphs.partition(":")
    return getattr(importlib.import_module(module), attr)


def layout_of(arch: str, model: torch.nn.Module, max_len: int | None = None) -> Layout:
    """The ``Layout`` of a model of family ``arch`` (its architecture's name), from its registered
    ``Graphs``; ``max_len``: the position limit (default: the one ``Graphs.ids`` gives)."""
    from ctprune.arch import get

    graphs = graphs_of(arch)
    hd, self_heads, cross_heads = graphs.heads(model)
    ids = graphs.ids(get(arch), model)
    return Layout(graphs.probe_vocab(model), int(ids["pad_id"]), int(ids["bos_id"]),
                  int(ids["max_len"] if max_len is None else max_len), hd, self_heads, cross_heads)


def _graph_modules(arch: str, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(encoder graph, decoder-step graph) of ``model``, as modules to export."""
    graphs = graphs_of(arch)
    return graphs.encoder(model), graphs.step(model)


def export_graphs(model: torch.nn.Module, folder: Path, arch: str = "ctprune", max_len: int | None = None
                  ) -> dict[str, Any]:
    """Write ``encoder.onnx`` and ``decoder_step.onnx`` of ``model`` (``arch``: its registered
    family's name, ctprune, marian or t5; ``max_len``: its position limit, by default the one its
    ``Graphs.ids`` gives) into ``folder``; return their description (names, dtypes, shapes) for
    ``graphs.json``."""
    from torch.export import Dim

    lay = layout_of(arch, model, max_len)
    n_dec, hd = lay.n_decoder_layers, lay.head_dim
    model = model.float().eval()
    encoder, step = _graph_modules(arch, model)
    # Example sizes >= 2 so that no axis is specialised to 0 or 1; the graphs run any size.
    b, s, p = 2, 5, 3
    batch = Dim("batch")
    src_len = Dim("src_len", max=lay.max_len)
    past_len = Dim("past_len", max=lay.max_len - 1)
    src = torch.full((b, s), 4, dtype=torch.long)
    cross_names, past_names = layer_names("cross", n_dec), layer_names("past", n_dec)
    present_names = layer_names("present", n_dec)
    ids = torch.full((b, 1), lay.bos_id, dtype=torch.long)
    mask = torch.ones(b, s, dtype=torch.bool)
    past = [torch.zeros(b, h, p, hd) for h in lay.decoder_self_heads for _ in range(2)]
    cross = [torch.zeros(b, h, s, hd) for h in lay.decoder_cross_heads for _ in range(2)]
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(
                encoder, (src,), str(folder / ENCODER_FILE), dynamo=True,
                external_data=False, opset_version=OPSET, verbose=False,
                input_names=["src"], output_names=["src_mask", *cross_names],
                dynamic_shapes=({0: batch, 1: src_len},))
            torch.onnx.export(
                step, (ids, mask, past, cross), str(folder / DECODER_FILE),
                dynamo=True, external_data=False, opset_version=OPSET, verbose=False,
                input_names=["input_ids", "src_mask", *past_names, *cross_names],
                output_names=["logits", *present_names],
                dynamic_shapes=({0: batch}, {0: batch, 1: src_len},
                                [{0: batch, 2: past_len}] * len(past), [{0: batch, 2: src_len}] * len(cross)))
    except Exception as e:  # the exporter raises many types; the user needs the first line
        raise CtpruneError(f"ONNX export failed: {first_line(e)}") from None
    return {"encoder": describe(folder / ENCODER_FILE), "decoder_step": describe(folder / DECODER_FILE)}


def describe(path: Path) -> dict[str, Any]:
    """Inputs and outputs of an ONNX graph: name, element type, shape (ints or axis names)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def values(vs: Any) -> list[dict[str, Any]]:
        out = []
        for v in vs:
            t = v.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": shape})
        return out

    return {"file": path.name, "inputs": values(graph.input), "outputs": values(graph.output)}


def quantize_int8(folder: Path) -> None:
    """Replace both graphs of ``folder`` by their dynamically quantized int8 versions."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in (ENCODER_FILE, DECODER_FILE):
        fp32 = folder / f"fp32.{name}"
        os.replace(folder / name, fp32)
        try:
            with _quiet_exporter():
                quantize_dynamic(fp32, folder / name, per_channel=True, weight_type=QuantType.QInt8)
        except Exception as e:
            raise CtpruneError(f"int8 quantization of {name} failed: {first_line(e)}") from None
        fp32.unlink()


def export(args: ExportArgs, quiet: bool = False) -> dict[str, Any]:
    """Export ``args.model`` into the serving folder ``args.output``; return its description
    (``graphs.json`` for ONNX, ``spec.json`` for CTranslate2)."""
    from ctprune.arch import detect
    from ctprune.model.checkpoint import load_model_folder, write_manifest

    model_dir, out = Path(args.model), Path(args.output)
    check_output(out, {"model folder": model_dir})
    check_existing(out, is_export_folder, "an export folder")
    if not model_dir.is_dir():
        raise CtpruneError(f"model folder not found: {model_dir}")
    arch = detect(model_dir)
    if arch.name not in exportable(args.format):
        raise CtpruneError(f"{model_dir} is a {arch.model_class} folder; --format {args.format} supports "
                           f"the architectures {', '.join(exportable(args.format))}")
    _import_engine(args.format)
    model, tok, _ = load_model_folder(model_dir, "cpu")
    rules = None
    if is_hf(arch):  # refused here, before anything is written
        from ctprune.serve.hfgen import GenerationRules

        rules = GenerationRules.of(model)
        if args.format == "ctranslate2" and rules.min_length > 1:
            raise CtpruneError(f"the model's generation config sets min_length={rules.min_length}, which ctprune's "
                               "CTranslate2 decoding does not reproduce; export refused")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # mkdtemp would make it 0700
    tmp.mkdir()
    precision = args.quantize if args.quantize != "none" else "fp32"
    say = (lambda line: None) if quiet else print
    head = {"architecture": arch.name, "precision": precision,
            "source": {"model": str(model_dir), "fingerprint": arch.fingerprint(model_dir)},
            **graphs_of(arch.name).ids(arch, model)}
    try:
        if args.format == "onnx":
            info = _write_onnx(arch, model, tok, tmp, args, head, say, rules)
            fmt, files, describe_file = EXPORT_FORMAT, (*ONNX_CORE, *info["tokenizer_files"]), GRAPHS_FILE
        else:
            from ctprune.serve.ct2 import CT2_FORMAT, SPEC_FILE, write_ct2

            info, files = write_ct2(arch.name, model, tok, tmp, args.quantize, head, rules)
            fmt, describe_file = CT2_FORMAT, SPEC_FILE
        write_json(tmp / describe_file, info)
        write_manifest(tmp, fmt, files)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        big = (ENCODER_FILE, DECODER_FILE) if args.format == "onnx" else ("model.bin",)
        sizes = ", ".join(f"{f} {(out / f).stat().st_size / 1e6:.1f} MB" for f in big)
        kept = [g for g, r in (info.get("optimization") or {}).get("graphs", {}).items() if r["kept"]]
        optimized = f", optimized: {' and '.join(kept)}" if kept else ""
        print(f"exported {model_dir} -> {out} ({args.format}, {precision}{optimized}; {sizes})")
    return info


def is_hf(arch: Architecture) -> bool:
    """Whether ``arch`` is a Hugging Face family (an ``HFArchitecture``): its export records the
    generation rules of its ``generate`` and writes its own config and tokenizer files; any other
    family is exported as ctprune's Transformer is (``model.cfg``, a ctprune ``Tokenizer``,
    ``ctprune.model.decode``'s decoding)."""
    from ctprune.arch.hf import HFArchitecture

    return isinstance(arch, HFArchitecture)


def _import_engine(fmt: str) -> None:
    """Refuse, before anything is written, a format whose packages are not installed."""
    needs = {"onnx": ("onnx", "onnxruntime"), "ctranslate2": ("ctranslate2",)}[fmt]
    for name in needs:
        try:
            __import__(name)
        except ImportError:
            raise CtpruneError(f"--format {fmt} needs the package {name}: pip install -e '.[serve]'") from None


def _write_onnx(arch: Architecture, model: torch.nn.Module, tok: Any, folder: Path, args: ExportArgs,
                head: dict[str, Any], say: Any = print, rules: GenerationRules | None = None) -> dict[str, Any]:
    """The two ONNX graphs (optimized, then quantized, as ``args`` asks), the tokenizer's files and
    ``config.json`` into ``folder``; return ``graphs.json``. ``rules``: a Hugging Face model's
    ``GenerationRules``."""
    import onnx
    import onnxruntime

    lay = layout_of(arch.name, model, head["max_len"])
    graphs = export_graphs(model, folder, arch.name, head["max_len"])
    optimization = optimize_graphs(folder, lay, say, serving(arch.name).optimizer_type) if args.optimize else None
    if args.quantize == "int8":
        quantize_int8(folder)
    if args.optimize or args.quantize == "int8":
        graphs = {k: describe(folder / v["file"]) for k, v in graphs.items()}
    before = {p.name for p in folder.iterdir()}
    tok.save(folder)
    tokenizer_files = sorted(p.name for p in folder.iterdir() if p.name not in before)
    extra: dict[str, Any] = {}
    if not is_hf(arch):  # ctprune's own config (any family that is not a Hugging Face one)
        write_json(folder / CONFIG_FILE, model.cfg.to_dict())
    else:  # Hugging Face's config (AutoTokenizer reads it too); the per-layer sizes in graphs.json
        from ctprune.arch.hf import HFArchitecture

        assert isinstance(arch, HFArchitecture) and rules is not None
        write_text(folder / CONFIG_FILE, model.config.to_json_string(use_diff=True))
        extra = {"layers": arch.layers(model), "generation": rules.to_json(),
                 "source_prefix": getattr(tok, "source_prefix", "")}
    return {"format": EXPORT_FORMAT, **head, "n_decoder_layers": lay.n_decoder_layers,
            "decoder_self_heads": lay.decoder_self_heads, "decoder_cross_heads": lay.decoder_cross_heads,
            "head_dim": lay.head_dim, "tokenizer_files": tokenizer_files, **extra, "opset": OPSET,
            "optimization": optimization,
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "graphs": graphs}


def _replace_dir(new: Path, out: Path) -> None:
    """Put the finished folder ``new`` at ``out``; an old export there is removed after the swap."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent)) / "old"
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


def _probe_feeds(cfg: Layout, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Inputs on which a fused graph must reproduce the unfused one: per graph, two feeds of
    different batch / length sizes, padded source rows (so a padding mask taken for a causal
    one shows), an empty and a filled self-attention cache, random keys/values of every layer's
    own head count."""
    import numpy as np

    rng = np.random.default_rng(seed)
    hd, n_dec = cfg.head_dim, cfg.n_decoder_layers
    feeds: dict[str, list[dict[str, Any]]] = {"encoder": [], "decoder_step": []}
    for b, s, p, lengths in ((3, 7, 5, (7, 4, 1)), (1, 2, 0, (2,))):
        src = rng.integers(4, cfg.vocab_size, (b, s), dtype=np.int64)
        for row, n in enumerate(lengths):
            src[row, n:] = cfg.pad_id
        mask = src != cfg.pad_id

        def kv(heads: list[int], length: int, b: int = b) -> list[Any]:
            return [rng.standard_normal((b, h, length, hd)).astype(np.float32) for h in heads for _ in range(2)]

        feeds["encoder"].append({"src": src})
        feeds["decoder_step"].append({
            "input_ids": rng.integers(4, cfg.vocab_size, (b, 1), dtype=np.int64), "src_mask": mask,
            **dict(zip(layer_names("past", n_dec), kv(cfg.decoder_self_heads, p))),
            **dict(zip(layer_names("cross", n_dec), kv(cfg.decoder_cross_heads, s)))})
    return feeds


def _max_difference(fused: Path, unfused: Path, feeds: list[dict[str, Any]]) -> float:
    """Largest |fused - unfused| over every output of every feed, relative to max(1, |unfused|);
    inf when an output's shape or dtype differs or the fused graph does not run."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    ref = ort.InferenceSession(str(unfused), opts, providers=["CPUExecutionProvider"])
    try:
        got = ort.InferenceSession(str(fused), opts, providers=["CPUExecutionProvider"])
    except Exception:  # a fused op this build of ONNX Runtime cannot run
        return math.inf
    worst = 0.0
    for feed in feeds:
        try:
            outs = got.run(None, feed)
        except Exception:
            return math.inf
        for a, b in zip(outs, ref.run(None, feed), strict=True):
            if a.shape != b.shape or a.dtype != b.dtype:
                return math.inf
            a, b = a.astype(np.float64), b.astype(np.float64)
            same = (a == b) | (np.isnan(a) & np.isnan(b))  # equal infinities and NaNs at one place agree
            if not np.isfinite(np.where(same, 0.0, a - b)).all():
                return math.inf  # a NaN or infinity one graph has and the other has not (max() skips NaN)
            scale = max(1.0, float(np.abs(np.where(np.isfinite(b), b, 0.0)).max(initial=0.0)))
            worst = max(worst, float(np.abs(np.where(same, 0.0, a - b)).max(initial=0.0)) / scale)
    return worst


def _fuse(path: Path, out: Path, disabled: set[str], model_type: str = "bart") -> dict[str, int]:
    """ONNX Runtime's transformer optimizer on ``path`` into ``out``, the fusions in ``disabled``
    (FusionOptions attribute names) switched off; return its fused-operator counts.

    ``model_type="bart"`` (ctprune's Transformer, MarianMT): the encoder-decoder fusions (attention
    with and without a cache, cross-attention on precomputed keys/values, SkipLayerNormalization
    around post-LN blocks); ``"t5"``: the same for T5's RMS norms (SimplifiedLayerNormalization).
    ``num_heads=0, hidden_size=0``: each attention's head count is read from its own reshape,
    so every layer keeps its own."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(model_type)
    for name in disabled:
        setattr(options, name, False)
    opt = optimize_model(str(path), model_type=model_type, num_heads=0, hidden_size=0,
                         optimization_options=options)
    opt.save_model_to_file(str(out))
    return {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}


def optimize_graphs(folder: Path, cfg: Layout, say: Any = print, model_type: str = "bart") -> dict[str, Any]:
    """Run ONNX Runtime's transformer optimizer on ``encoder.onnx`` and ``decoder_step.onnx`` of
    ``folder`` in place; return, per graph, what was fused (for ``graphs.json``).

    Each fused graph is run beside the unfused one on ``_probe_feeds``; it is kept only if every
    output is within ``OPTIMIZE_TOLERANCE``. Otherwise it is rebuilt without the fusions it
    used, one kind at a time, and the first version that agrees is kept; if none does (or the
    optimizer fails), the unfused graph stays. Each fallback prints one warning line to stderr
    naming the graph, the fusion and the difference."""
    import onnx

    feeds = _probe_feeds(cfg)
    result: dict[str, Any] = {"optimizer": "onnxruntime.transformers.optimizer.optimize_model",
                              "model_type": model_type, "num_heads": 0, "hidden_size": 0,
                              "tolerance": OPTIMIZE_TOLERANCE, "graphs": {}}
    for key, name in (("encoder", ENCODER_FILE), ("decoder_step", DECODER_FILE)):
        path, fused = folder / name, folder / f"fused.{name}"
        before = _op_counts(onnx.load(str(path)))
        disabled: set[str] = set()
        rejected: list[str] = []  # "what the rejected graph fused: its difference"
        record: dict[str, Any] = {"fused": {}, "kept": False, "disabled": [], "max_difference": None,
                                  "operator_statistics": {}, "warning": None}
        try:
            while True:
                with _quiet_exporter():
                    counts = _fuse(path, fused, disabled, model_type)
                made = _new_ops(before, fused)
                difference = _max_difference(fused, path, feeds[key])
                if difference <= OPTIMIZE_TOLERANCE:
                    os.replace(fused, path)
                    record.update(fused=made, kept=True, disabled=sorted(disabled), max_difference=difference,
                                  operator_statistics=counts)
                    break
                rejected.append(f"{_fusion_text(made)}: {difference:.1e}")
                # Rebuild without one more kind of fusion this graph used, the first not yet off.
                switch = next((FUSION_SWITCHES[op] for op in made if FUSION_SWITCHES[op] not in disabled), None)
                if switch is None:
                    break
                disabled.add(switch)
            if rejected:
                outcome = (f"kept it without {', '.join(sorted(disabled))} ({_fusion_text(record['fused'])})"
                           if record["kept"] else "kept the unfused graph")
                record["warning"] = (f"{name}: fused graphs changed the outputs beyond {OPTIMIZE_TOLERANCE:g} "
                                     f"({'; '.join(rejected)}); {outcome}")
        except Exception as e:  # the optimizer's own failures: keep the exported graph
            record["warning"] = f"{name}: ONNX Runtime's optimizer failed ({first_line(e)}); kept the unfused graph"
        fused.unlink(missing_ok=True)
        if record["warning"]:
            print(f"warning: {record['warning']}", file=sys.stderr)
        result["graphs"][key] = record
        say(f"optimized {name}: " + (_fusion_text(record["fused"]) if record["kept"] else "unfused (see warning)"))
    return result


def _op_counts(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _new_ops(before: dict[str, int], fused: Path) -> dict[str, int]:
    """The fused operators the optimizer added: counts of the ``FUSION_SWITCHES`` ops beyond
    those the exporter already wrote (the exporter writes LayerNormalization itself)."""
    import onnx

    after = _op_counts(onnx.load(str(fused)))
    return {op: after[op] - before.get(op, 0) for op in FUSION_SWITCHES if after.get(op, 0) > before.get(op, 0)}


def _fusion_text(made: dict[str, int]) -> str:
    return ", ".join(f"{op} x{n}" for op, n in made.items()) or "no fusions"
