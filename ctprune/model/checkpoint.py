"""Model folders: config.json + model.safetensors + tokenizer.model + hparams.json + manifest.json.

Loading rebuilds the model from its config and reads weights from safetensors; nothing is
ever unpickled, so a pruned or composed model reloads with its own per-layer sizes. The
manifest records the size and SHA-256 of the weights, tokenizer and hparams; a file that no
longer matches it (altered, truncated, swapped, half-written) is refused on load.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model

from ctprune.arch import arch_of, detect
from ctprune.data.tokenizer import TOKENIZER_FILE, Tokenizer
from ctprune.errors import CtpruneError, first_line
from ctprune.fileio import atomic_write, brief, file_record, read_json, shorten, verify_file, write_json, write_text
from ctprune.model.transformer import ModelConfig, Seq2SeqTransformer
from ctprune.model.weights import save_weights

CONFIG_FILE, WEIGHTS_FILE, HPARAMS_FILE = "config.json", "model.safetensors", "hparams.json"
MANIFEST_FILE, MODEL_FORMAT = "manifest.json", "ctprune-model/1"
# Position tables are built whole (positions x d_model) and are not in the weights file, so their
# length is bounded on its own; translation models use 256 to 2048.
MAX_POSITIONS = 1 << 16
# What a weights file may store (safetensors dtype names); loading casts them to float32.
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def check_weights_hold(folder: Path, params: int, what: str) -> None:
    """Refuse a config whose model has at least ``params`` parameters when the weights file stores
    fewer (``encoder_layers: 100000``, a huge d_model): checked on the file's header, before the
    model is built. An unreadable header is refused as such."""
    weights = Path(folder) / WEIGHTS_FILE
    try:
        with safe_open(str(weights), "pt") as f:
            stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise CtpruneError(f"weights in {weights} are unreadable: {first_line(e)}") from None
    other = sorted((k, d) for k, d in dtypes.items() if d not in FLOAT_DTYPES)
    if other:  # loading would cast them to float silently (int64 weights are no model's)
        raise CtpruneError(f"weights in {weights} hold {len(other)} tensors that are not floating point (e.g. "
                           f"{brief(other[0][0])}: {other[0][1]}); expected {', '.join(FLOAT_DTYPES)}")
    if params > stored:
        raise CtpruneError(f"{Path(folder) / CONFIG_FILE} describes {what} of at least {params:,} parameters, but "
                           f"{weights} stores {stored:,}; its sizes do not match the weights")


def _native_params(cfg: ModelConfig) -> int:
    """Parameters of the matrices of a model of ``cfg`` (biases and norms left out: a lower bound)."""
    d, hd = cfg.d_model, cfg.head_dim
    encoder = sum(4 * d * h * hd + 2 * d * f for h, f in zip(cfg.encoder_heads, cfg.encoder_ffn))
    decoder = sum(4 * d * (hs + hc) * hd + 2 * d * f
                  for hs, hc, f in zip(cfg.decoder_self_heads, cfg.decoder_cross_heads, cfg.decoder_ffn))
    return cfg.vocab_size * d * (1 if cfg.tie_embeddings else 3) + encoder + decoder


def _check_raw_sizes(folder: Path, raw: dict[str, Any]) -> None:
    """Before ``ModelConfig`` builds its per-layer lists: every layer holds at least a LayerNorm
    (2 d_model parameters) and the embedding vocab_size x d_model."""
    ints = {k: raw.get(k) for k in ("vocab_size", "d_model", "n_encoder_layers", "n_decoder_layers", "max_len")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ints.values()):
        return  # missing or mistyped: ModelConfig names the field
    if ints["max_len"] > MAX_POSITIONS:
        raise CtpruneError(f"{folder / CONFIG_FILE}: max_len must be at most {MAX_POSITIONS}, got {ints['max_len']}")
    layers = ints["n_encoder_layers"] + ints["n_decoder_layers"]
    check_weights_hold(folder, ints["d_model"] * (ints["vocab_size"] + 2 * layers), "a model")


def save_model_folder(folder: Path, model: torch.nn.Module, tok: Any, hparams: dict[str, Any]) -> None:
    """Write ``model`` as a model folder of its architecture (see ``ctprune.arch``)."""
    arch_of(model).save(Path(folder), model, tok, hparams)


def load_model_folder(folder: str | Path, device: str | torch.device = "cpu", tokenizer: bool = True
                      ) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, hparams) of a model folder of any supported architecture;
    ``tokenizer=False``: a Hugging Face folder without a tokenizer loads with None."""
    folder = Path(folder)
    return detect(folder).load(folder, device, tokenizer)


def is_model_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a complete model folder (ctprune's or a Hugging Face one)."""
    try:
        arch = detect(folder)
    except CtpruneError:
        return False
    return all((Path(folder) / f).is_file() for f in arch.required_files)


def save_native_folder(folder: Path, model: Seq2SeqTransformer, tok: Tokenizer,
                       hparams: dict[str, Any]) -> None:
    """Write the files, each atomically: tokenizer, hparams, weights, then the manifest of their
    sizes and checksums, and config last; a folder interrupted midway fails its manifest check."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(folder)
    write_json(folder / HPARAMS_FILE, hparams)
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_weights(model, str(tmp)))  # masked weights as stored
    config = json.dumps(model.cfg.to_dict(), indent=2) + "\n"
    write_manifest(folder, MODEL_FORMAT, (WEIGHTS_FILE, TOKENIZER_FILE, HPARAMS_FILE), {CONFIG_FILE: config})
    write_text(folder / CONFIG_FILE, config)


def load_native_folder(folder: str | Path, device: str | torch.device = "cpu"
                       ) -> tuple[Seq2SeqTransformer, Tokenizer, dict[str, Any]]:
    """(model in eval mode, tokenizer, hparams); a path that is not a model folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CtpruneError(f"model folder not found: {folder}")
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE) if not (folder / f).is_file()]
    if missing:
        raise CtpruneError(f"{folder} is not a ctprune model folder (missing {', '.join(missing)})")
    check_manifest(folder)
    raw = read_json(folder / CONFIG_FILE, "model config")
    if not isinstance(raw, dict):
        raise CtpruneError(f"model config {folder / CONFIG_FILE} must be a JSON object")
    _check_raw_sizes(folder, raw)
    try:
        cfg = ModelConfig.from_dict(raw)
        params = _native_params(cfg)
    except CtpruneError as e:
        raise CtpruneError(f"{folder / CONFIG_FILE}: {e}") from None
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise CtpruneError(f"{folder / CONFIG_FILE}: a field has the wrong type or names no module of the model "
                           f"({shorten(first_line(e), 200)})") from None
    check_weights_hold(folder, params, "a model")
    try:
        model = Seq2SeqTransformer(cfg)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise CtpruneError(f"{folder / CONFIG_FILE}: a field has the wrong type or names no module of the model "
                           f"({shorten(first_line(e), 200)})") from None
    try:
        load_model(model, str(folder / WEIGHTS_FILE), strict=True, device=str(device))
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise CtpruneError(f"weights in {folder / WEIGHTS_FILE} are unreadable or do not fit its config: "
                           f"{first_line(e)}") from None
    check_finite(model, folder / WEIGHTS_FILE)
    hp_path = folder / HPARAMS_FILE
    hparams = read_json(hp_path, "hparams") if hp_path.is_file() else {}
    if not isinstance(hparams, dict):
        raise CtpruneError(f"hparams {hp_path} must be a JSON object")
    tok = Tokenizer.load(folder)
    if tok.vocab_size > cfg.vocab_size:  # its ids past the model's would fail in the embedding
        raise CtpruneError(f"tokenizer {folder / TOKENIZER_FILE} has {tok.vocab_size} pieces, but the model's "
                           f"vocab_size is {cfg.vocab_size}: they do not belong together")
    return model.to(device).eval(), tok, hparams


def check_finite(model: torch.nn.Module, weights: Path) -> None:
    """Refuse weights holding NaN or infinity (a diverged or damaged checkpoint): every output of
    the model would be garbage, silently."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CtpruneError(f"weights in {weights} hold NaN or infinite values (tensor {name}); the "
                               "checkpoint is damaged or its training diverged")


def write_manifest(folder: Path, fmt: str, files: tuple[str, ...], pending: dict[str, str] | None = None) -> None:
    """Record the size and SHA-256 of ``files`` of a model folder in its manifest, and of the
    ``pending`` texts (``{name: text}``) that are written after it (config.json, last: the mark of
    a complete folder)."""
    records = {f: file_record(folder / f) for f in files}
    for name, text in (pending or {}).items():
        data = text.encode("utf-8")
        records[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_json(folder / MANIFEST_FILE, {"format": fmt, "files": records})


def check_manifest(folder: Path, fmt: str = MODEL_FORMAT,
                   files: tuple[str, ...] = (WEIGHTS_FILE, TOKENIZER_FILE, HPARAMS_FILE, CONFIG_FILE)) -> None:
    """Check the recorded files of a model folder; folders written before manifests (or by
    another tool) have none."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return
    manifest = read_json(path, "model manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != fmt \
            or not isinstance(manifest.get("files"), dict):
        raise CtpruneError(f"model manifest {path} is malformed (no format {brief(fmt)} / files)")
    for name, record in manifest["files"].items():
        if name not in files:
            raise CtpruneError(f"model manifest {path} lists an unexpected file {brief(name)}")
        verify_file(folder / name, record, name, str(path))
