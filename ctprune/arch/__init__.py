"""The architecture seam: what a stage needs to know about one model family, in one place.

Stages never ask what class a model is. They ask ``detect(folder)`` or ``arch_of(model)`` for an
:class:`Architecture` and call it: load / save a model folder, fingerprint it, list its prunable
units (name, kind, size), take a unit out as a block and put a block back, cut heads or neurons,
score them, compute logits, translate, count FLOPs. ctprune's own Transformer is one
implementation (``native.py``); MarianMT (``marian.py``) and T5 (``t5.py``) are others, sharing the
Hugging Face plumbing of ``hf.py``. A fourth architecture is one new module and one
``register`` call (``tests/test_arch_family.py`` registers a test-only family).

Every implementation is imported lazily, so that ``transformers`` is loaded only for a Hugging
Face model, and this module imports no torch: ``ctprune.spec`` (torch-free) takes the families'
names from the registry.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctprune.errors import CtpruneError
from ctprune.fileio import brief, read_json, shorten

if TYPE_CHECKING:  # annotations only: the registry stays importable without torch
    import torch
    from torch import Tensor, nn

KINDS = ("attention", "ffn", "linear")
SIZE_UNITS = {"attention": "heads", "ffn": "neurons", "linear": "weights"}


@dataclass(frozen=True)
class Prunable:
    """One prunable unit of a model: an attention block (heads), an FFN block (neurons) or a
    Linear inside them (weights, unstructured). ``side`` says which positions it runs on (its
    block loss is averaged over the real tokens of that side); ``parent`` is, for a Linear, the
    block that contains it (a configuration may prune one or the other, not both)."""

    name: str
    kind: str
    params: int
    size: int  # heads (attention), hidden width (ffn), weights (linear)
    side: str = "encoder"
    parent: str | None = None

    @property
    def unit(self) -> str:
        return SIZE_UNITS[self.kind]


class Architecture(ABC):
    """One model family. Methods take the model (an ``nn.Module`` of this family) explicitly and
    keep no state, so one instance serves every model of the family."""

    name: str  # as written into hparams and error messages
    model_class: str  # the class users know it by
    required_files: tuple[str, ...]  # what a complete model folder holds

    # ---- model folders -------------------------------------------------------------------
    @abstractmethod
    def claims(self, folder: Path, config: dict[str, Any]) -> bool:
        """Whether ``folder`` (its parsed ``config.json``) is a model folder of this family."""

    @abstractmethod
    def load(self, folder: Path, device: str | torch.device = "cpu", tokenizer: bool = True
             ) -> tuple[nn.Module, Any, dict[str, Any]]:
        """(model in eval mode, tokenizer or None, hparams). ``tokenizer=True``: a folder without
        one is an error (the command reads or writes text); else a missing one is None."""

    @abstractmethod
    def save(self, folder: Path, model: nn.Module, tok: Any, hparams: dict[str, Any]) -> None:
        """Write ``model`` (pruned or not) so that ``load`` rebuilds it with its own sizes."""

    @abstractmethod
    def fingerprint(self, folder: Path) -> str:
        """16 hex digits of the folder's architecture and weights."""

    # ---- prunable units -----------------------------------------------------------------
    @abstractmethod
    def units(self, model: nn.Module) -> dict[str, Prunable]:
        """Every prunable unit of ``model`` by name, in model order."""

    def block(self, model: nn.Module, name: str) -> nn.Module:
        """The module that computes unit ``name``: what a block variant replaces."""
        return model.get_submodule(name)

    def set_block(self, model: nn.Module, name: str, block: nn.Module) -> None:
        """Put ``block`` in place of unit ``name`` (and update whatever records the sizes)."""
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, block)

    def io_modules(self, model: nn.Module, name: str) -> tuple[nn.Module, nn.Module]:
        """(module whose call receives the unit's input, module whose call returns its output);
        ``block(*args, **kwargs)`` of the first's call reproduces the second's output."""
        b = self.block(model, name)
        return b, b

    @abstractmethod
    def cut(self, block: nn.Module, keep: Tensor) -> nn.Module:
        """A new attention / FFN block keeping heads / neurons ``keep`` (sorted indices into the
        block as it is), sizes updated; the input block is not changed."""

    @abstractmethod
    def scores(self, block: nn.Module, criterion: str) -> Tensor:
        """One importance value per head or neuron of an attention / FFN block (higher = keep)."""

    @abstractmethod
    def output_linear(self, model: nn.Module, name: str) -> nn.Linear:
        """The Linear that maps attention / FFN unit ``name``'s heads or neurons back to d_model
        (its input is what the ``activation`` criterion measures)."""

    def tuning_parameters(self, block: nn.Module) -> list[nn.Parameter]:
        """The parameters block tuning trains (all of them unless the family shares one)."""
        return list(block.parameters())

    # ---- running --------------------------------------------------------------------------
    @abstractmethod
    def max_len(self, model: nn.Module) -> int:
        """Longest token sequence (either side) the model takes."""

    @abstractmethod
    def logits(self, model: nn.Module, src: Tensor, tgt_in: Tensor) -> Tensor:
        """src (B, S), tgt_in (B, T) token ids, padded with the model's pad id -> (B, T, V)."""

    def traced_logits(self, model: nn.Module, src: Tensor, tgt_in: Tensor) -> tuple[Tensor, Any]:
        """(``logits``, a trace of the pass from which ``logits_after`` reruns part of it): what
        scoring runs on the origin once per batch. It runs without grad (an implementation
        decorates it with ``torch.no_grad()``: the trace keeps no graph). This default keeps no
        trace."""
        import torch

        with torch.no_grad():
            return self.logits(model, src, tgt_in), None

    def logits_after(self, model: nn.Module, name: str, src: Tensor, tgt_in: Tensor, trace: Any) -> Tensor:
        """``logits`` of ``model`` after unit ``name`` alone changed since ``trace`` was taken
        (scoring's "replace one block"), recomputing only what depends on that unit where the
        trace allows. This default reruns the whole model."""
        return self.logits(model, src, tgt_in)

    @abstractmethod
    def generate(self, model: nn.Module, src: Tensor, beam: int = 1, steps: int | None = None) -> list[list[int]]:
        """src (B, S) token ids (ending with EOS, padded) -> B hypotheses as token ids without
        start or end token; greedy for ``beam`` 1, else beam search. With ``steps`` (greedy),
        exactly that many decoding steps run whatever the model emits (for like-for-like
        speed measurements)."""

    @abstractmethod
    def forward_flops(self, model: nn.Module, src_len: int, tgt_len: int) -> int:
        """Analytic FLOPs of one forward pass over one sentence pair."""

    def train_step_flops(self, model: nn.Module, batch_size: int, src_len: int, tgt_len: int) -> int:
        """Forward + backward FLOPs of one end-to-end training step on a padded batch."""
        from ctprune.model.flops import BACKWARD_FACTOR  # ctprune.model imports torch

        return (1 + BACKWARD_FACTOR) * batch_size * self.forward_flops(model, src_len, tgt_len)

    @abstractmethod
    def block_flops(self, model: nn.Module, name: str, block: nn.Module, src_len: int, tgt_len: int) -> int:
        """Forward FLOPs of ``block`` standing for unit ``name`` over one sentence pair."""

    @abstractmethod
    def tokenizer_from_spm(self, spm_proto: bytes) -> Any:
        """This family's tokenizer over a sentencepiece model that ``ctprune train`` trained
        (pieces 0-3: pad, unk, bos, eos)."""

    @abstractmethod
    def from_scratch(self, sizes: dict[str, Any], tok: Any) -> nn.Module:
        """A new, randomly initialised model for ``ctprune train``: ``sizes`` as a preset gives
        them (d_model, n_heads, d_ff, n_encoder_layers, n_decoder_layers), the vocabulary and
        special ids of ``tok``."""


@dataclass(frozen=True)
class Serving:
    """How ``ctprune export`` and the serving engines (``ctprune.serve``) handle a family. Plain
    strings, so that the registry imports nothing of onnx, onnxruntime or ctranslate2."""

    graphs: str  # "module:attribute" of its ONNX graph builder (a ``ctprune.serve.graphs.Graphs``)
    optimizer_type: str  # ``model_type`` of ONNX Runtime's transformer optimizer for its graphs
    ct2: str | None = None  # "module:attribute" of its ``ctprune.serve.ct2.Ct2Family``; None: ONNX only

    @property
    def formats(self) -> tuple[str, ...]:
        """The export formats it supports: "onnx", and "ctranslate2" where it has a ``ct2``."""
        return ("onnx", "ctranslate2") if self.ct2 else ("onnx",)


@dataclass(frozen=True)
class Family:
    """One registered model family: where its :class:`Architecture` lives (imported on first
    use), how its folders say they are of it (a Hugging Face config's ``model_type``; None for a
    ctprune folder, which has none), the class names of its loaded models (for ``arch_of``) and,
    if it can be exported for serving, how (:class:`Serving`; None: ``ctprune export`` refuses it)."""

    module: str
    cls: str
    label: str  # how messages name it
    model_type: str | None
    model_classes: tuple[str, ...]
    serving: Serving | None = None


def family(name: str) -> Family:
    """The registration of family ``name``."""
    if name not in _REGISTRY:
        raise CtpruneError(f"unknown architecture {brief(name)}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


_REGISTRY: dict[str, Family] = {}
_loaded: dict[str, Architecture] = {}


def register(name: str, registration: Family) -> None:
    """Make family ``name`` known to ``get``, ``detect`` and ``arch_of``: the one registration a
    new family needs (besides its module)."""
    if name in _REGISTRY and _REGISTRY[name] != registration:
        raise CtpruneError(f"architecture {brief(name)} is registered already")
    _REGISTRY[name] = registration
    _loaded.pop(name, None)


def names() -> tuple[str, ...]:
    """The registered families' names (``[origin] arch`` and ``--arch`` choose from them)."""
    return tuple(_REGISTRY)


def supported() -> str:
    """The registered families, in words, for error messages."""
    return ", ".join(f.label for f in _REGISTRY.values())


register("ctprune", Family("ctprune.arch.native", "NativeArchitecture", "ctprune's own Transformer",
                           None, ("Seq2SeqTransformer",),
                           Serving("ctprune.serve.graphs:NATIVE", "bart", "ctprune.serve.ct2:NATIVE")))
register("marian", Family("ctprune.arch.marian", "MarianArchitecture", "MarianMTModel (model_type marian)",
                          "marian", ("MarianMTModel",),
                          Serving("ctprune.serve.graphs_hf:MARIAN", "bart", "ctprune.serve.ct2:MARIAN")))
register("t5", Family("ctprune.arch.t5", "T5Architecture", "T5ForConditionalGeneration (model_type t5)",
                      "t5", ("T5ForConditionalGeneration",),
                      Serving("ctprune.serve.graphs_hf:T5", "t5", "ctprune.serve.ct2:T5")))
# Keys of a Hugging Face config that ctprune's own config.json never has.
_HF_MARKS = ("architectures", "transformers_version", "encoder_layers", "num_layers", "d_kv",
             "encoder_attention_heads", "num_heads", "is_encoder_decoder")


def _family_of_class(cls: str) -> str | None:
    return next((name for name, f in _REGISTRY.items() if cls in f.model_classes), None)


def get(name: str) -> Architecture:
    """The architecture registered as ``name`` (ctprune, marian, t5)."""
    registration = family(name)
    if name not in _loaded:
        try:
            _loaded[name] = getattr(importlib.import_module(registration.module), registration.cls)()
        except ImportError as e:
            raise CtpruneError(f"the {name} architecture needs {e.name or 'a package'}; install ctprune's "
                               "Hugging Face extra: pip install -e \".[hf]\"") from None
    return _loaded[name]


def detect(folder: str | Path) -> Architecture:
    """The architecture of model folder ``folder``, from its ``config.json``: a Hugging Face
    folder names its ``model_type``; a ctprune folder has none. Anything else is refused in one
    line naming what is supported."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CtpruneError(f"model folder not found: {folder}")
    path = folder / "config.json"
    if not path.is_file():
        if (folder / "model.safetensors").is_file() or (folder / "tokenizer.model").is_file():
            return get("ctprune")  # a damaged ctprune folder: its own loader says what is missing
        raise CtpruneError(f"{folder} is not a ctprune model folder nor a supported Hugging Face model "
                           f"(no config.json); supported: {supported()}")
    config = read_json(path, "model config")  # bounded in size and depth, duplicate keys refused
    if not isinstance(config, dict):
        raise CtpruneError(f"model config {path} must be a JSON object")
    model_type = config.get("model_type")
    archs = config.get("architectures")
    archs = [archs] if isinstance(archs, str) else [a for a in archs if isinstance(a, str)] \
        if isinstance(archs, list) else []
    named = ", ".join(shorten(a, 60) for a in archs[:3])  # for messages: cut, never a 10 MB echo
    # The family the config's architectures name, if a supported one (MarianMTModel -> marian).
    named_family = next((f for a in archs if (f := _family_of_class(a)) and _REGISTRY[f].model_type), None)
    named_type = _REGISTRY[named_family].model_type if named_family else None
    if model_type is None:
        if named_family is not None or any(k in config for k in _HF_MARKS):
            hint = f"; for {named} it is \"model_type\": \"{named_type}\"" if named_family else ""
            raise CtpruneError(f"{path} looks like a Hugging Face config but has no model_type, which names the "
                               f"model family{hint}; supported: {supported()}")
        for name, f in _REGISTRY.items():  # the families whose folders have no model_type
            if f.model_type is None and get(name).claims(folder, config):
                return get(name)
        raise CtpruneError(f"{folder} is not a ctprune model folder nor a supported Hugging Face model "
                           f"({path.name} has neither ctprune's fields nor a model_type); supported: {supported()}")
    if not isinstance(model_type, str):
        raise CtpruneError(f"{path}: model_type must be a string, got {brief(model_type)}; supported: {supported()}")
    name = next((n for n, f in _REGISTRY.items() if f.model_type == model_type), None)
    if named_family is not None and named_family != name:
        raise CtpruneError(f"{path}: model_type {brief(model_type)} contradicts its architectures ({named}, "
                           f"model_type \"{named_type}\"); correct one of them; "
                           f"supported: {supported()}")
    if name is None:
        raise CtpruneError(f"{folder} holds a Hugging Face {named or 'model'} (model_type {brief(model_type)}), "
                           f"which ctprune does not support; supported: {supported()}")
    arch = get(name)
    if not arch.claims(folder, config):
        raise CtpruneError(f"{folder} holds a Hugging Face {named or brief(model_type)} model; "
                           f"ctprune supports {arch.model_class} for model_type {brief(model_type)}")
    return arch


def arch_of(model: nn.Module) -> Architecture:
    """The architecture of a loaded model: the family that registered its class (or, for a
    subclass of none of them, of its nearest base class)."""
    for k in type(model).__mro__:
        if (name := _family_of_class(k.__name__)) is not None:
            return get(name)
    raise CtpruneError(f"a {type(model).__name__} is not a model ctprune can prune; supported: {supported()}")
