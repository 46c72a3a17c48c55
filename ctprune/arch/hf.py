"""What MarianMT and T5 share behind the architecture seam: model folders, tokenizers, logits,
generation and FLOPs of a Hugging Face encoder-decoder whose layers may have been pruned.

A Hugging Face config holds one head count and one FFN width for all layers, so a non-uniformly
pruned model cannot go through ``from_pretrained``. ctprune saves it as the (unchanged) HF
``config.json``, the per-layer sizes in ``ctprune_layers.json``, and ``model.safetensors``;
:func:`load_pruned` rebuilds the same HF class from the config, cuts each listed unit to its size
(``Architecture.cut`` on the fresh model: the same code that pruned it), and loads the weights.
No pickle is read or written: a folder with only ``pytorch_model.bin`` is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model
from torch import Tensor, nn

from ctprune.arch import Architecture, Prunable
from ctprune.errors import CtpruneError, first_line
from ctprune.fileio import atomic_write, brief, read_json, write_json, write_text
from ctprune.model.checkpoint import (
    MAX_POSITIONS,
    check_finite,
    check_manifest,
    check_weights_hold,
    write_manifest,
)
from ctprune.model.flops import attention_flops, ffn_flops
from ctprune.model.weights import save_weights
from ctprune.progress import bars_on

CONFIG_FILE, WEIGHTS_FILE, LAYERS_FILE = "config.json", "model.safetensors", "ctprune_layers.json"
HPARAMS_FILE, GENERATION_FILE = "hparams.json", "generation_config.json"
LAYERS_FORMAT, MANIFEST_FORMAT = "ctprune-hf-layers/1", "ctprune-hf-model/1"
# Files that mark a folder as holding a tokenizer (one of them is enough for AutoTokenizer).
TOKENIZER_MARKS = ("tokenizer.json", "tokenizer_config.json", "source.spm", "spiece.model")
MARIAN_TOKENIZER_FILES = ("source.spm", "target.spm", "vocab.json")  # what MarianTokenizer reads
# The JSON files of a tokenizer folder, read by ctprune first (bounded, duplicate keys refused). A
# large vocabulary's tokenizer.json runs to tens of MB, more than other metadata.
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                  "added_tokens.json")
MAX_TOKENIZER_JSON_BYTES = 256 * 2**20
# The files a manifest covers (config.json and generation_config.json: an edited eos_token_id
# changes every translation).
MANIFEST_FILES = (WEIGHTS_FILE, LAYERS_FILE, HPARAMS_FILE, GENERATION_FILE, CONFIG_FILE)
# Dropout probabilities a Marian or T5 config.json may set.
DROPOUT_FIELDS = ("dropout", "attention_dropout", "activation_dropout", "dropout_rate", "classifier_dropout")
# Token ids that config.json and generation_config.json may set; each must be an id of the vocabulary.
TOKEN_ID_FIELDS = ("pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id",
                   "forced_bos_token_id", "forced_eos_token_id")


def config_int(config: dict[str, Any], key: str, path: Path, default: Any = None) -> int:
    """A positive integer field of a Hugging Face ``config.json`` (``default`` when absent)."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CtpruneError(f"{path}: {key} must be a positive integer, got {brief(value)}")
    return value


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' info and warnings (load reports, generation flags, Marian's advice to install
    sacremoses, which ctprune does not use) off inside the block; its progress bars ("Loading
    weights") too unless stderr is a terminal, as ctprune's own (``ctprune.progress``)."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    if not bars_on():
        logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
            yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


class HFTokenizer:
    """A Hugging Face tokenizer as ctprune's stages use one: plain ids without special tokens
    (the batcher adds the end and start tokens), the model's own pad / decoder-start / end ids,
    and source and target encodings apart (Marian has one sentencepiece model per side).
    ``source_prefix`` goes before every source sentence: T5's task prefix, e.g. "translate German
    to English: " (the model folder's hparams.json ``source_prefix``; none by default)."""

    def __init__(self, hf: Any, pad_id: int, bos_id: int, eos_id: int, source_prefix: str = "") -> None:
        self.hf, self.pad_id, self.bos_id, self.eos_id = hf, pad_id, bos_id, eos_id
        self.source_prefix = source_prefix

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, texts: list[str]) -> list[list[int]]:
        texts = [self.source_prefix + t for t in texts] if self.source_prefix else texts
        return self.hf(texts, add_special_tokens=False)["input_ids"] if texts else []

    def encode_target(self, texts: list[str]) -> list[list[int]]:
        return self.hf(text_target=texts, add_special_tokens=False)["input_ids"] if texts else []

    def decode(self, ids: list[list[int]]) -> list[str]:
        return self.hf.batch_decode(ids, skip_special_tokens=True)

    def save(self, folder: Path) -> None:
        """The tokenizer's files into ``folder``, each replaced atomically."""
        with tempfile.TemporaryDirectory(dir=folder, prefix=".tokenizer.") as tmp:
            self.hf.save_pretrained(tmp)
            for f in Path(tmp).iterdir():
                os.replace(f, Path(folder) / f.name)


class HFArchitecture(Architecture):
    """Shared Hugging Face plumbing; a family names its class and how its units are laid out."""

    required_files = (CONFIG_FILE, WEIGHTS_FILE)
    model_type: str  # config.json's
    cross_attention: str  # attribute name of a decoder layer's attention over the encoder output
    ffn_types: tuple[type, ...]  # the classes of the family's FFN blocks
    aliases: tuple[str, ...] = ()  # older names of model_class in checkpoints' config.json

    def model_cls(self) -> type:
        """The Hugging Face class (``model_class`` names it in ``transformers``)."""
        import transformers

        return getattr(transformers, self.model_class)

    # ---- what each family defines ---------------------------------------------------------
    def full_size(self, config: Any, unit: Prunable) -> int:
        """Heads / FFN width of ``unit`` in an unpruned model of ``config``."""
        raise NotImplementedError

    def kept_heads(self, block: nn.Module) -> list[int]:
        """Indices, in the unpruned layer, of the heads an attention block keeps."""
        raise NotImplementedError

    def attention_dims(self, block: nn.Module) -> tuple[int, int, int]:
        """(d_model, heads, head_dim) of an attention block."""
        raise NotImplementedError

    def ffn_dims(self, block: nn.Module) -> tuple[int, int, int]:
        """(d_model, width, number of d_model x width matrices) of an FFN block."""
        raise NotImplementedError

    def config_params(self, config: dict[str, Any], path: Path, pruned: bool) -> tuple[int, int]:
        """(a lower bound of the parameters of a model of ``config``, its position table length).
        ``pruned``: units may keep as little as one head / one neuron, so count that."""
        raise NotImplementedError

    def is_cross(self, name: str) -> bool:
        """Whether attention unit ``name`` attends to the encoder's output."""
        return name.endswith("." + self.cross_attention)

    # ---- folders --------------------------------------------------------------------------
    def claims(self, folder: Path, config: dict[str, Any]) -> bool:
        archs = config.get("architectures")
        archs = [archs] if isinstance(archs, str) else archs if isinstance(archs, list) else []
        return config.get("model_type") == self.model_type and (
            not archs or any(a in (self.model_class, *self.aliases) for a in archs))

    def load(self, folder: Path, device: str | torch.device = "cpu", tokenizer: bool = True
             ) -> tuple[nn.Module, Any, dict[str, Any]]:
        folder = Path(folder)
        if not (folder / WEIGHTS_FILE).is_file():
            if (folder / "pytorch_model.bin").is_file():
                raise CtpruneError(f"{folder} holds only pytorch_model.bin (a pickle); ctprune reads safetensors "
                                   f"only: save it once with save_pretrained(..., safe_serialization=True)")
            if (folder / f"{WEIGHTS_FILE}.index.json").is_file():
                raise CtpruneError(f"{folder} holds sharded weights; ctprune reads one {WEIGHTS_FILE}")
            raise CtpruneError(f"{folder} has no {WEIGHTS_FILE}")
        check_manifest(folder, MANIFEST_FORMAT, MANIFEST_FILES)
        layers = self._read_layers(folder)
        self._check_config(folder, pruned=layers is not None)
        with quiet_transformers():
            try:
                model = load_pruned(self, folder) if layers is not None else self._load_whole(folder)
            except CtpruneError:
                raise
            except Exception as e:  # transformers and safetensors raise many types for a bad folder
                raise CtpruneError(f"{folder}: cannot load the {self.model_class}: {first_line(e)}") from None
        check_finite(model, folder / WEIGHTS_FILE)
        hp_path = folder / HPARAMS_FILE
        hparams = read_json(hp_path, "hparams") if hp_path.is_file() else {}
        if not isinstance(hparams, dict):
            raise CtpruneError(f"hparams {hp_path} must be a JSON object")
        prefix = hparams.get("source_prefix", "")
        if not isinstance(prefix, str):
            raise CtpruneError(f"hparams {hp_path}: source_prefix must be a string, e.g. \"translate German to "
                               f"English: \" (T5's task prefix)")
        tok = self.load_tokenizer(folder, model, required=tokenizer)
        if tok is not None:
            tok.source_prefix = prefix
        return model.to(device).eval(), tok, hparams

    def _check_config(self, folder: Path, pruned: bool) -> None:
        """config.json's sizes, before anything is built: positions bounded, and a model the
        weights file can hold (``encoder_layers: 100000`` would otherwise build for minutes)."""
        path = folder / CONFIG_FILE
        config = read_json(path, "model config")
        if not isinstance(config, dict):
            raise CtpruneError(f"model config {path} must be a JSON object")
        defaults = self.model_cls().config_class().to_dict()  # what transformers fills in for absent keys
        params, positions = self.config_params({**defaults, **config}, path, pruned)
        if positions > MAX_POSITIONS:
            raise CtpruneError(f"{path}: a position table of {positions} entries; at most {MAX_POSITIONS}")
        check_weights_hold(folder, params, f"a {self.model_class}")
        for key in DROPOUT_FIELDS:  # NaN or 2 would fail only in the first training step
            value = config.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value < 1):
                raise CtpruneError(f"{path}: {key} must be a probability in [0, 1), got {brief(value)}")
        vocab = config_int({**defaults, **config}, "vocab_size", path)
        check_token_ids(path, config, vocab)
        if (folder / GENERATION_FILE).is_file():  # bounded read before transformers parses it
            check_token_ids(folder / GENERATION_FILE, read_json(folder / GENERATION_FILE, "generation config"), vocab)

    def _load_whole(self, folder: Path) -> nn.Module:
        """An unpruned folder through ``from_pretrained``, strictly: every tensor of the config
        present in the weights with its shape, and none besides (transformers would fill missing
        ones with random values and skip foreign ones, silently)."""
        model, info = self.model_cls().from_pretrained(str(folder), dtype=torch.float32, local_files_only=True,
                                                       output_loading_info=True)
        problems = {"missing": sorted(info.get("missing_keys") or []),
                    "unexpected": sorted(info.get("unexpected_keys") or []),
                    "of another shape": sorted(str(k[0]) if isinstance(k, tuple) else str(k)
                                               for k in info.get("mismatched_keys") or [])}
        found = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in problems.items() if keys]
        if found:
            raise CtpruneError(f"weights in {folder / WEIGHTS_FILE} do not fit its {CONFIG_FILE} "
                               f"({self.model_class}): tensors {'; '.join(found)}")
        return model

    def load_tokenizer(self, folder: Path, model: nn.Module, required: bool = True) -> HFTokenizer | None:
        if not any((folder / f).is_file() for f in TOKENIZER_MARKS):
            if required:
                raise CtpruneError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_MARKS)}); this "
                                   "command reads or writes text, so it needs the model's own tokenizer there")
            return None
        missing = [f for f in MARIAN_TOKENIZER_FILES if not (folder / f).is_file()]
        if self.model_type == "marian" and missing:  # else transformers fails on a None path
            raise CtpruneError(f"{folder}: a MarianMT tokenizer needs {', '.join(MARIAN_TOKENIZER_FILES)}; "
                               f"{', '.join(missing)} missing")
        for name in TOKENIZER_JSON:  # bounded, duplicate keys refused, before transformers parses them
            if (folder / name).is_file():
                read_json(folder / name, "tokenizer file", limit=MAX_TOKENIZER_JSON_BYTES)
        from transformers import AutoTokenizer

        with quiet_transformers():
            try:
                hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            except Exception as e:  # a broken or partial tokenizer fails in many ways
                raise CtpruneError(f"{folder}: cannot load the tokenizer: {first_line(e)}") from None
        cfg = model.config  # type: ignore[union-attr]
        return HFTokenizer(hf, cfg.pad_token_id, cfg.decoder_start_token_id, cfg.eos_token_id)

    def save(self, folder: Path, model: nn.Module, tok: Any, hparams: dict[str, Any]) -> None:
        """Tokenizer, hparams, weights, per-layer sizes, generation config, then the manifest of
        their sizes and checksums, and config.json last (each written atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if tok is not None:
            tok.save(folder)
            if tok.source_prefix:  # the model reads its sources with it: every derived folder keeps it
                hparams = {**hparams, "source_prefix": tok.source_prefix}
        write_json(folder / HPARAMS_FILE, hparams)
        atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_weights(model, str(tmp)))  # masked weights as stored
        write_json(folder / LAYERS_FILE, self.layers(model))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            write_text(folder / GENERATION_FILE, gen.to_json_string())
        else:
            (folder / GENERATION_FILE).unlink(missing_ok=True)  # a stale one would fail the manifest
        files = (WEIGHTS_FILE, LAYERS_FILE, HPARAMS_FILE) + ((GENERATION_FILE,) if gen is not None else ())
        config = model.config.to_json_string(use_diff=True)  # type: ignore[union-attr]
        write_manifest(folder, MANIFEST_FORMAT, files, {CONFIG_FILE: config})
        write_text(folder / CONFIG_FILE, config)

    def fingerprint(self, folder: Path) -> str:
        h = hashlib.sha256()
        for f in (CONFIG_FILE, LAYERS_FILE, WEIGHTS_FILE):
            if (Path(folder) / f).is_file():
                h.update((Path(folder) / f).read_bytes())
        return h.hexdigest()[:16]

    def layers(self, model: nn.Module) -> dict[str, Any]:
        """The per-layer sizes that differ from the config: kept heads per attention unit,
        width per FFN unit, and the masked Linears."""
        attention, ffn = {}, {}
        for name, u in self.units(model).items():
            if u.kind == "attention" and u.size < self.full_size(model.config, u):  # type: ignore[union-attr]
                attention[name] = self.kept_heads(self.block(model, name))
            elif u.kind == "ffn" and u.size < self.full_size(model.config, u):  # type: ignore[union-attr]
                ffn[name] = u.size
        masked = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and hasattr(m, "weight_mask"))
        return {"format": LAYERS_FORMAT, "model_type": self.model_type, "attention": attention, "ffn": ffn,
                "sparse_linears": masked}

    def _read_layers(self, folder: Path) -> dict[str, Any] | None:
        path = folder / LAYERS_FILE
        if not path.is_file():
            return None
        layers = read_json(path, "per-layer sizes")
        if not (isinstance(layers, dict) and layers.get("format") == LAYERS_FORMAT):
            raise CtpruneError(f"{path} is not a ctprune per-layer sizes file (format {brief(LAYERS_FORMAT)} with "
                               "attention, ffn and sparse_linears)")
        for key, kind in (("attention", dict), ("ffn", dict), ("sparse_linears", list)):
            if not isinstance(layers.get(key), kind):
                what = "an object {unit name: sizes}" if kind is dict else "a list of Linear names"
                raise CtpruneError(f"{path}: {key} must be {what}, got {brief(layers.get(key))}")
        linears = layers["sparse_linears"]
        if not all(isinstance(n, str) for n in linears) or len(set(linears)) != len(linears):
            raise CtpruneError(f"{path}: sparse_linears must be a list of distinct Linear names (strings), got "
                               f"{brief(linears)}")
        if layers.get("model_type", self.model_type) != self.model_type:
            raise CtpruneError(f"{path} was written for model_type {brief(layers['model_type'])}, but its "
                               f"config.json is model_type {self.model_type!r}; they do not belong together")
        return layers

    # ---- units ----------------------------------------------------------------------------
    def _unit(self, name: str, kind: str, module: nn.Module, size: int, side: str,
              parent: str | None = None, params: int | None = None) -> Prunable:
        return Prunable(name, kind, params if params is not None else sum(p.numel() for p in module.parameters()),
                        size, side, parent)

    def side(self, name: str) -> str:
        return "decoder" if "decoder." in name else "encoder"

    # ---- running --------------------------------------------------------------------------
    def logits(self, model: nn.Module, src: Tensor, tgt_in: Tensor) -> Tensor:
        pad = model.config.pad_token_id  # type: ignore[union-attr]
        return model(input_ids=src, attention_mask=src.ne(pad), decoder_input_ids=tgt_in, use_cache=False).logits

    @torch.no_grad()
    def generate(self, model: nn.Module, src: Tensor, beam: int = 1, steps: int | None = None) -> list[list[int]]:
        cfg = model.config  # type: ignore[union-attr]
        limit = steps or min(self.max_len(model) - 1, int(src.shape[1] * 1.5) + 10)
        with quiet_transformers():
            out = model.generate(input_ids=src, attention_mask=src.ne(cfg.pad_token_id),  # type: ignore[operator]
                                 num_beams=beam, do_sample=False, max_new_tokens=limit, max_length=None,
                                 min_new_tokens=steps)
        hyps = []
        for row in out[:, 1:].tolist():  # without the decoder start token
            if cfg.eos_token_id in row:
                row = row[:row.index(cfg.eos_token_id)]
            hyps.append([t for t in row if t != cfg.pad_token_id])
        return hyps

    def forward_flops(self, model: nn.Module, src_len: int, tgt_len: int) -> int:
        f = sum(self.block_flops(model, n, self.block(model, n), src_len, tgt_len)
                for n, u in self.units(model).items() if u.kind != "linear")
        head = model.get_output_embeddings()  # type: ignore[operator]
        return f + 2 * tgt_len * head.in_features * head.out_features

    def block_flops(self, model: nn.Module, name: str, block: nn.Module, src_len: int, tgt_len: int) -> int:
        decoder = self.side(name) == "decoder"
        q_len = tgt_len if decoder else src_len
        if isinstance(block, nn.Linear):
            on_memory = self.is_cross(name.rpartition(".")[0]) and name.rpartition(".")[2] in ("k", "v", "k_proj",
                                                                                                 "v_proj")
            return 2 * (src_len if on_memory else q_len) * block.in_features * block.out_features
        if not isinstance(block, self.ffn_types):
            causal = decoder and not self.is_cross(name)
            return attention_flops(*self.attention_dims(block), q_len, tgt_len if causal else src_len, causal)
        d, width, matrices = self.ffn_dims(block)
        return ffn_flops(d, width, q_len) * matrices // 2



def load_pruned(arch: HFArchitecture, folder: Path) -> nn.Module:
    """The model of a folder ctprune saved: the HF class built from ``config.json``, each unit of
    ``ctprune_layers.json`` cut to its size, masks registered, then the safetensors weights (every
    tensor present and of its shape). Plain-Python use::

        from ctprune.model.checkpoint import load_model_folder
        model, tok, hparams = load_model_folder("composed")  # a MarianMTModel / T5ForConditionalGeneration
    """
    folder = Path(folder)
    layers = arch._read_layers(folder)
    if layers is None:
        raise CtpruneError(f"{folder} has no {LAYERS_FILE}: it is not a folder of a pruned model")
    cls = arch.model_cls()
    config = cls.config_class.from_pretrained(str(folder), local_files_only=True)
    # Built on the meta device (no memory), cut to the listed sizes, counted against the weights
    # file, and only then given memory: a config whose full-size model is huge (on pruned units or
    # unpruned ones) is refused before anything is allocated, and never built at full size.
    with torch.device("meta"):  # T5's kept-head indices stay on the CPU: made from CPU indices
        model = cls(config)
        units = arch.units(model)
        for name, kept in layers["attention"].items():
            full = arch.full_size(config, _check_unit(units, name, "attention", folder))
            if not (isinstance(kept, list) and kept and all(_is_int(h) and 0 <= h < full for h in kept)
                    and len(set(kept)) == len(kept)):
                raise CtpruneError(f"{folder / LAYERS_FILE}: {brief(name)} keeps heads {brief(kept)}; "
                                   f"expected distinct head indices in 0..{full - 1}")
            arch.set_block(model, name, arch.cut(arch.block(model, name), torch.tensor(kept, device="cpu")))
        for name, width in layers["ffn"].items():
            full = arch.full_size(config, _check_unit(units, name, "ffn", folder))
            if not (_is_int(width) and 1 <= width <= full):
                raise CtpruneError(f"{folder / LAYERS_FILE}: {brief(name)} has width {brief(width)}; "
                                   f"expected an integer in 1..{full}")
            arch.set_block(model, name, arch.cut(arch.block(model, name), torch.arange(width)))
        for name in layers["sparse_linears"]:
            _check_unit(units, name, "linear", folder)
            linear = model.get_submodule(name)
            linear.register_buffer("weight_mask", torch.ones_like(linear.weight))
    check_weights_hold(folder, sum(p.numel() for p in model.parameters()), f"a pruned {arch.model_class}")
    # Buffers the cut made on the CPU (T5's kept-head indices) are kept; every other tensor is
    # filled from the weights file below (strict: each one present, of its shape).
    made = {n: b.clone() for n, b in model.named_buffers() if b.device.type != "meta"}
    model.to_empty(device="cpu")
    for n, b in made.items():
        owner, _, attr = n.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = b
    model.tie_weights()
    try:
        load_model(model, str(folder / WEIGHTS_FILE), strict=True)
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise CtpruneError(f"weights in {folder / WEIGHTS_FILE} are unreadable or do not fit "
                           f"{LAYERS_FILE}: {first_line(e)}") from None
    if (folder / GENERATION_FILE).is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    return model


def check_token_ids(path: Path, config: Any, vocab: int) -> None:
    """Refuse special token ids of a config.json or generation_config.json outside the vocabulary
    (``vocab`` ids): building, generating or stopping would fail on them, or wait for a token
    that never comes."""
    if not isinstance(config, dict):
        raise CtpruneError(f"{path} must be a JSON object")
    for field in TOKEN_ID_FIELDS:
        value = config.get(field)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(_is_int(i) and 0 <= i < vocab for i in ids):
            raise CtpruneError(f"{path}: {field} {brief(value)} is not a token id of this model (0..{vocab - 1})")


def _check_unit(units: dict[str, Prunable], name: str, kind: str, folder: Path) -> Prunable:
    if name not in units or units[name].kind != kind:
        raise CtpruneError(f"{folder / LAYERS_FILE} names {brief(name)}, which is no {kind} module of this model")
    return units[name]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)

