"""MarianMT (``MarianMTModel``) behind the architecture seam.

Unit names are the model's own module paths: ``model.encoder.layers.I.self_attn``,
``model.decoder.layers.I.self_attn``, ``model.decoder.layers.I.encoder_attn`` (attention, by
heads; their ``q_proj``/``k_proj``/``v_proj``/``out_proj`` are Linears), and
``model.encoder|decoder.layers.I.ffn`` (FFN, by hidden neurons). Marian keeps ``fc1`` and ``fc2``
on the layer itself, not in an FFN module, so ``...ffn`` names no module of the model: as a block
it is a :class:`MarianFFN` holding the layer's ``fc1`` / ``fc2`` (put back onto the layer by
``set_block``); the Linears are ``...layers.I.fc1`` and ``...layers.I.fc2``.

Cutting heads keeps q/k/v rows (weights and biases) and ``out_proj`` columns; ``num_heads`` is
set to the heads kept. The forward pass reads only ``head_dim`` and ``scaling`` (unchanged) and
reshapes with -1, so nothing else changes; ``embed_dim`` stays the model width, which it is.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ctprune.arch import Prunable
from ctprune.arch.hf import HFArchitecture, HFTokenizer, config_int, quiet_transformers
from ctprune.data.tokenizer import EOS_ID, PAD_ID
from ctprune.pruning.importance import head_scores, neuron_scores
from ctprune.pruning.surgery import head_index, keep_cols, keep_rows


class MarianFFN(nn.Module):
    """A Marian layer's FFN as one block: ``fc2(dropout(act(fc1(x))))``, as the layer computes it."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear, act: nn.Module, dropout: float) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act, self.dropout = fc1, fc2, act, dropout

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, d) -> (B, T, d)."""
        h = nn.functional.dropout(self.act(self.fc1(x)), p=self.dropout, training=self.training)
        return self.fc2(h)


class MarianArchitecture(HFArchitecture):
    name = "marian"
    model_class = "MarianMTModel"
    model_type = "marian"
    cross_attention = "encoder_attn"
    ffn_types = (MarianFFN,)

    # ---- units ----------------------------------------------------------------------------
    def units(self, model: nn.Module) -> dict[str, Prunable]:
        out: dict[str, Prunable] = {}
        for side in ("encoder", "decoder"):
            for i, layer in enumerate(model.get_submodule(f"model.{side}").layers):  # type: ignore[union-attr]
                base = f"model.{side}.layers.{i}"
                for attr in ("self_attn", "encoder_attn") if side == "decoder" else ("self_attn",):
                    attn = getattr(layer, attr)
                    name = f"{base}.{attr}"
                    out[name] = Prunable(name, "attention", _params(attn), attn.num_heads, side)
                    for lin in ("q_proj", "k_proj", "v_proj", "out_proj"):
                        w = getattr(attn, lin).weight
                        out[f"{name}.{lin}"] = Prunable(f"{name}.{lin}", "linear", _params(getattr(attn, lin)),
                                                        w.numel(), side, name)
                out[f"{base}.ffn"] = Prunable(f"{base}.ffn", "ffn", _params(layer.fc1) + _params(layer.fc2),
                                              layer.fc1.out_features, side)
                for lin in ("fc1", "fc2"):
                    m = getattr(layer, lin)
                    out[f"{base}.{lin}"] = Prunable(f"{base}.{lin}", "linear", _params(m), m.weight.numel(), side,
                                                    f"{base}.ffn")
        return out

    def block(self, model: nn.Module, name: str) -> nn.Module:
        if name.endswith(".ffn"):
            layer = model.get_submodule(name[:-len(".ffn")])
            return MarianFFN(layer.fc1, layer.fc2, layer.activation_fn, layer.activation_dropout).train(layer.training)
        return model.get_submodule(name)

    def set_block(self, model: nn.Module, name: str, block: nn.Module) -> None:
        if name.endswith(".ffn"):
            layer = model.get_submodule(name[:-len(".ffn")])
            layer.fc1, layer.fc2 = block.fc1, block.fc2
        else:
            super().set_block(model, name, block)

    def io_modules(self, model: nn.Module, name: str) -> tuple[nn.Module, nn.Module]:
        if name.endswith(".ffn"):
            layer = model.get_submodule(name[:-len(".ffn")])
            return layer.fc1, layer.fc2
        return super().io_modules(model, name)

    def output_linear(self, model: nn.Module, name: str) -> nn.Linear:
        if name.endswith(".ffn"):
            return model.get_submodule(name[:-len(".ffn")]).fc2
        return model.get_submodule(name).out_proj

    def config_params(self, config: dict[str, Any], path: Path, pruned: bool) -> tuple[int, int]:
        d, vocab = config_int(config, "d_model", path), config_int(config, "vocab_size", path)
        total = vocab * d  # one embedding shared by encoder, decoder and output
        for side, attentions in (("encoder", 1), ("decoder", 2)):
            layers = config_int(config, f"{side}_layers", path)
            heads = config_int(config, f"{side}_attention_heads", path)
            width = 1 if pruned else config_int(config, f"{side}_ffn_dim", path)
            inner = max(1, d // heads) if pruned else d  # kept heads x head size
            total += layers * (4 * attentions * d * inner + 2 * d * width)
        return total, config_int(config, "max_position_embeddings", path)

    def full_size(self, config: Any, unit: Prunable) -> int:
        if unit.kind == "attention":
            return config.encoder_attention_heads if unit.side == "encoder" else config.decoder_attention_heads
        return config.encoder_ffn_dim if unit.side == "encoder" else config.decoder_ffn_dim

    # ---- cutting and scoring ----------------------------------------------------------------
    def cut(self, block: nn.Module, keep: Tensor) -> nn.Module:
        keep = keep.sort().values
        if isinstance(block, MarianFFN):
            new = MarianFFN(keep_rows(block.fc1, keep), keep_cols(block.fc2, keep), block.act, block.dropout)
            return new.train(block.training)
        from transformers.models.marian.modeling_marian import MarianAttention

        idx = head_index(keep, block.head_dim)
        # built with the full head count so that HF derives the block's own head_dim and scaling
        # (a block pruned before has fewer heads than embed_dim // head_dim)
        new = MarianAttention(block.embed_dim, block.embed_dim // block.head_dim, dropout=block.dropout,
                              is_decoder=block.is_decoder,
                              bias=block.q_proj.bias is not None, is_causal=block.is_causal, config=block.config,
                              layer_idx=block.layer_idx)
        new.q_proj, new.k_proj, new.v_proj = (keep_rows(p, idx) for p in (block.q_proj, block.k_proj, block.v_proj))
        new.out_proj = keep_cols(block.out_proj, idx)
        new.num_heads = len(keep)
        new.kept_heads = [self.kept_heads(block)[i] for i in keep.tolist()]
        return new.train(block.training)

    def kept_heads(self, block: nn.Module) -> list[int]:
        return list(getattr(block, "kept_heads", range(block.num_heads)))

    def scores(self, block: nn.Module, criterion: str) -> Tensor:
        if isinstance(block, MarianFFN):
            return neuron_scores([block.fc1.weight], block.fc2.weight)
        return head_scores(block.q_proj.weight, block.k_proj.weight, block.v_proj.weight, block.out_proj.weight,
                           block.num_heads, criterion)

    # ---- training from scratch ------------------------------------------------------------
    def tokenizer_from_spm(self, spm_proto: bytes) -> HFTokenizer:
        with tempfile.TemporaryDirectory() as tmp:
            hf = marian_tokenizer(spm_proto, Path(tmp))
        return HFTokenizer(hf, pad_id=PAD_ID, bos_id=PAD_ID, eos_id=EOS_ID)  # Marian starts decoding with pad

    def from_scratch(self, sizes: dict[str, Any], tok: Any) -> nn.Module:
        from transformers import MarianMTModel

        return MarianMTModel(marian_config(tok.vocab_size, pad_id=tok.pad_id, eos_id=tok.eos_id, **sizes))

    # ---- running ----------------------------------------------------------------------------
    def max_len(self, model: nn.Module) -> int:
        return int(model.config.max_position_embeddings)  # type: ignore[union-attr]

    def attention_dims(self, block: nn.Module) -> tuple[int, int, int]:
        return block.q_proj.in_features, block.num_heads, block.head_dim

    def ffn_dims(self, block: nn.Module) -> tuple[int, int, int]:
        return block.fc1.in_features, block.fc1.out_features, 2


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def marian_config(vocab_size: int, d_model: int, n_heads: int, d_ff: int, n_encoder_layers: int,
                  n_decoder_layers: int, dropout: float = 0.1, max_len: int = 256, pad_id: int = 0,
                  eos_id: int = 3) -> Any:
    """A MarianConfig of the given sizes for a model trained from scratch on a ctprune
    sentencepiece vocabulary (pad 0, end 3; the decoder starts with pad, as Marian's do)."""
    from transformers import MarianConfig

    return MarianConfig(vocab_size=vocab_size, decoder_vocab_size=vocab_size, d_model=d_model,
                        encoder_layers=n_encoder_layers, decoder_layers=n_decoder_layers,
                        encoder_attention_heads=n_heads, decoder_attention_heads=n_heads,
                        encoder_ffn_dim=d_ff, decoder_ffn_dim=d_ff, dropout=dropout, attention_dropout=dropout,
                        activation_function="relu", max_position_embeddings=max_len, scale_embedding=True,
                        pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=pad_id,
                        forced_eos_token_id=eos_id, bos_token_id=pad_id,
                        share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
                        architectures=["MarianMTModel"])


def marian_tokenizer(spm_proto: bytes, folder: Path) -> Any:
    """A MarianTokenizer over one joint sentencepiece model (source.spm = target.spm, ids as the
    sentencepiece model numbers its pieces), written into ``folder`` and loaded from there."""
    import sentencepiece as spm
    from transformers import MarianTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_proto=spm_proto)
    for f in ("source.spm", "target.spm"):
        (folder / f).write_bytes(spm_proto)
    (folder / "vocab.json").write_text(json.dumps({sp.id_to_piece(i): i for i in range(sp.get_piece_size())},
                                                  ensure_ascii=False), encoding="utf-8")
    with quiet_transformers():
        tok = MarianTokenizer(source_spm=str(folder / "source.spm"), target_spm=str(folder / "target.spm"),
                              vocab=str(folder / "vocab.json"))
    tok.save_pretrained(str(folder))
    return tok

