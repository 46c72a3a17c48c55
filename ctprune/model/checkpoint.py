"""Model folders: config.json + model.safetensors + tokenizer.model + hparams.json + manifest.json.

Loading rebuilds the model from its config and reads weights from safetensors; nothing is
ever unpickled, so a pruned or composed model reloads with its own per-layer sizes. The
manifest records the size and SHA-256 of the weights, tokenizer and hparams; a file that no
longer matches it (altered, truncated, swapped, half-written) is refused on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from ctprune.data.tokenizer import TOKENIZER_FILE, Tokenizer
from ctprune.errors import CtpruneError, first_line
from ctprune.fileio import atomic_write, file_record, read_json, verify_file, write_json
from ctprune.model.transformer import ModelConfig, Seq2SeqTransformer

CONFIG_FILE, WEIGHTS_FILE, HPARAMS_FILE = "config.json", "model.safetensors", "hparams.json"
MANIFEST_FILE, MODEL_FORMAT = "manifest.json", "ctprune-model/1"


def save_model_folder(folder: Path, model: Seq2SeqTransformer, tok: Tokenizer,
                      hparams: dict[str, Any]) -> None:
    """Write the files, each atomically: tokenizer, hparams, weights, then the manifest of their
    sizes and checksums, and config last; a folder interrupted midway fails its manifest check."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(folder)
    write_json(folder / HPARAMS_FILE, hparams)
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_model(model, str(tmp)))
    write_json(folder / MANIFEST_FILE, {"format": MODEL_FORMAT, "files": {
        f: file_record(folder / f) for f in (WEIGHTS_FILE, TOKENIZER_FILE, HPARAMS_FILE)}})
    write_json(folder / CONFIG_FILE, model.cfg.to_dict())


def is_model_folder(folder: Path) -> bool:
    return all((Path(folder) / f).is_file() for f in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE))


def load_model_folder(folder: str | Path, device: str | torch.device = "cpu"
                      ) -> tuple[Seq2SeqTransformer, Tokenizer, dict[str, Any]]:
    """(model in eval mode, tokenizer, hparams); a path that is not a model folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CtpruneError(f"model folder not found: {folder}")
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE) if not (folder / f).is_file()]
    if missing:
        raise CtpruneError(f"{folder} is not a ctprune model folder (missing {', '.join(missing)})")
    _check_manifest(folder)
    raw = read_json(folder / CONFIG_FILE, "model config")
    if not isinstance(raw, dict):
        raise CtpruneError(f"model config {folder / CONFIG_FILE} must be a JSON object")
    try:
        model = Seq2SeqTransformer(ModelConfig.from_dict(raw))
    except CtpruneError as e:
        raise CtpruneError(f"{folder / CONFIG_FILE}: {e}") from None
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise CtpruneError(f"{folder / CONFIG_FILE}: a field has the wrong type ({e})") from None
    try:
        load_model(model, str(folder / WEIGHTS_FILE), strict=True, device=str(device))
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise CtpruneError(f"weights in {folder / WEIGHTS_FILE} are unreadable or do not fit its config: "
                           f"{first_line(e)}") from None
    hp_path = folder / HPARAMS_FILE
    hparams = read_json(hp_path, "hparams") if hp_path.is_file() else {}
    if not isinstance(hparams, dict):
        raise CtpruneError(f"hparams {hp_path} must be a JSON object")
    return model.to(device).eval(), Tokenizer.load(folder), hparams


def _check_manifest(folder: Path) -> None:
    """Check the recorded files of a model folder; folders written before manifests have none."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return
    manifest = read_json(path, "model manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != MODEL_FORMAT \
            or not isinstance(manifest.get("files"), dict):
        raise CtpruneError(f"model manifest {path} is malformed (no format {MODEL_FORMAT!r} / files)")
    for name, record in manifest["files"].items():
        if name not in (WEIGHTS_FILE, TOKENIZER_FILE, HPARAMS_FILE):
            raise CtpruneError(f"model manifest {path} lists an unexpected file {name!r}")
        verify_file(folder / name, record, name, str(path))
