"""Model folders: config.json + model.safetensors + tokenizer.model + hparams.json.

Loading rebuilds the model from its config and reads weights from safetensors; nothing is
ever unpickled, so a pruned or composed model reloads with its own per-layer sizes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from ctprune.data.tokenizer import TOKENIZER_FILE, Tokenizer
from ctprune.errors import CtpruneError
from ctprune.fileio import atomic_write, read_json, write_json
from ctprune.model.transformer import ModelConfig, Seq2SeqTransformer

CONFIG_FILE, WEIGHTS_FILE, HPARAMS_FILE = "config.json", "model.safetensors", "hparams.json"


def save_model_folder(folder: Path, model: Seq2SeqTransformer, tok: Tokenizer,
                      hparams: dict[str, Any]) -> None:
    """Write the four files; the weights file goes last-but-one and config last, each atomically,
    so a folder with a config always has matching weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(folder)
    write_json(folder / HPARAMS_FILE, hparams)
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_model(model, str(tmp)))
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
    cfg = ModelConfig.from_dict(read_json(folder / CONFIG_FILE, "model config"))
    model = Seq2SeqTransformer(cfg)
    try:
        load_model(model, str(folder / WEIGHTS_FILE), strict=True, device=str(device))
    except (RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0]
        raise CtpruneError(f"weights in {folder / WEIGHTS_FILE} do not fit its config: {first}") from None
    hp_path = folder / HPARAMS_FILE
    hparams = json.loads(hp_path.read_text()) if hp_path.is_file() else {}
    return model.to(device).eval(), Tokenizer.load(folder), hparams
