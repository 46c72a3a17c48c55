"""T5 (``T5ForConditionalGeneration``) behind the architecture seam.

Unit names are the model's own module paths: ``encoder.block.I.layer.0.SelfAttention``,
``decoder.block.I.layer.0.SelfAttention``, ``decoder.block.I.layer.1.EncDecAttention``
(attention, by heads; Linears ``q``, ``k``, ``v``, ``o``) and
``encoder.block.I.layer.1.DenseReluDense`` / ``decoder.block.I.layer.2.DenseReluDense`` (FFN,
by hidden neurons; Linears ``wi`` or, gated, ``wi_0`` and ``wi_1``, and ``wo``).

The relative position bias is the one thing T5 shares across layers: layer 0 of each stack owns
``relative_attention_bias`` and returns its ``position_bias`` (1, heads, q, k), which every later
layer adds to its scores, one slice per head. A pruned attention is therefore a
:class:`PrunedT5Attention`: it remembers which heads of the full layer it keeps (``heads``), adds
only their slices, and passes the full bias on, so pruning layer 0's heads shrinks neither the
bias table nor what later layers read; block tuning leaves the table alone (it is the other
layers' input too).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from transformers.models.t5.modeling_t5 import T5Attention, T5DenseActDense, T5DenseGatedActDense

from ctprune.arch import Prunable
from ctprune.arch.hf import HFArchitecture, HFTokenizer, config_int
from ctprune.data.tokenizer import EOS_ID, PAD_ID
from ctprune.pruning.importance import head_scores, neuron_scores
from ctprune.pruning.surgery import head_index, keep_cols, keep_rows

FFN_TYPES = (T5DenseActDense, T5DenseGatedActDense)


class PrunedT5Attention(T5Attention):
    """A T5Attention keeping only heads ``heads`` (indices into the full layer, a buffer) of the
    ``config.num_heads``; q/k/v/o and ``n_heads`` / ``inner_dim`` are those of the kept heads,
    ``relative_attention_bias`` (layer 0) stays whole."""

    def __init__(self, config: Any, has_relative_attention_bias: bool, layer_idx: int | None, is_causal: bool,
                 heads: Tensor) -> None:
        super().__init__(config, has_relative_attention_bias=has_relative_attention_bias, layer_idx=layer_idx,
                         is_causal=is_causal)
        self.register_buffer("heads", heads.clone(), persistent=False)
        self.n_heads, self.inner_dim = len(heads), len(heads) * self.key_value_proj_dim

    def forward(self, hidden_states: Tensor, mask: Tensor | None = None, key_value_states: Tensor | None = None,
                position_bias: Tensor | None = None, cache: Any = None, **kwargs: Any) -> tuple[Any, ...]:
        """As T5Attention; ``position_bias`` (1, num_heads, q, k) in and out covers every head of
        the full layer (made here when absent, as layer 0 makes it), this block uses its own."""
        if position_bias is None:
            q_len = hidden_states.shape[1]
            past = 0 if key_value_states is not None or cache is None else int(cache.get_seq_length(self.layer_idx))
            k_len = key_value_states.shape[1] if key_value_states is not None else past + q_len
            if self.has_relative_attention_bias:
                position_bias = self.compute_bias(q_len, k_len, device=hidden_states.device, past_seen_tokens=past)
            else:
                position_bias = torch.zeros((1, self.config.num_heads, q_len, k_len), device=hidden_states.device,
                                            dtype=hidden_states.dtype)
        own = position_bias if position_bias.shape[1] == self.n_heads else position_bias[:, self.heads]
        out, _, weights = super().forward(hidden_states, mask=mask, key_value_states=key_value_states,
                                          position_bias=own, cache=cache, **kwargs)
        return out, position_bias, weights


class T5Architecture(HFArchitecture):
    name = "t5"
    model_class = "T5ForConditionalGeneration"
    model_type = "t5"
    cross_attention = "EncDecAttention"
    ffn_types = FFN_TYPES
    aliases = ("T5WithLMHeadModel",)  # what early T5 checkpoints (t5-small once) name the same class

    # ---- units ----------------------------------------------------------------------------
    def units(self, model: nn.Module) -> dict[str, Prunable]:
        out: dict[str, Prunable] = {}
        for side in ("encoder", "decoder"):
            for i, block in enumerate(model.get_submodule(side).block):  # type: ignore[union-attr]
                for j, sub in enumerate(block.layer):
                    attr = next((a for a in ("SelfAttention", "EncDecAttention") if hasattr(sub, a)), "DenseReluDense")
                    name, m = f"{side}.block.{i}.layer.{j}.{attr}", getattr(sub, attr)
                    if attr == "DenseReluDense":
                        size, kind, linears = m.wo.in_features, "ffn", [a for a in ("wi", "wi_0", "wi_1", "wo")
                                                                         if hasattr(m, a)]
                    else:
                        size, kind, linears = m.n_heads, "attention", ["q", "k", "v", "o"]
                    params = sum(getattr(m, a).weight.numel() for a in linears)  # not the shared bias table
                    out[name] = Prunable(name, kind, params, size, side)
                    for a in linears:
                        w = getattr(m, a).weight
                        out[f"{name}.{a}"] = Prunable(f"{name}.{a}", "linear", w.numel(), w.numel(), side, name)
        return out

    def output_linear(self, model: nn.Module, name: str) -> nn.Linear:
        block = model.get_submodule(name)
        return block.wo if isinstance(block, FFN_TYPES) else block.o

    def config_params(self, config: dict[str, Any], path: Path, pruned: bool) -> tuple[int, int]:
        d, vocab = config_int(config, "d_model", path), config_int(config, "vocab_size", path)
        kv, heads = config_int(config, "d_kv", path), config_int(config, "num_heads", path)
        encoder = config_int(config, "num_layers", path)
        decoder = config_int({**config, "num_decoder_layers": config.get("num_decoder_layers") or encoder},
                             "num_decoder_layers", path)
        inner = kv if pruned else heads * kv  # kept heads x head size
        ffn = 2 * d * (1 if pruned else config_int(config, "d_ff", path))
        embeddings = vocab * d * (1 if config.get("tie_word_embeddings", True) else 2)
        total = embeddings + encoder * (4 * d * inner + ffn) + decoder * (8 * d * inner + ffn)
        return total, config_int(config, "relative_attention_num_buckets", path)

    def full_size(self, config: Any, unit: Prunable) -> int:
        return config.num_heads if unit.kind == "attention" else config.d_ff

    # ---- cutting and scoring ----------------------------------------------------------------
    def cut(self, block: nn.Module, keep: Tensor) -> nn.Module:
        keep = keep.sort().values
        if isinstance(block, FFN_TYPES):
            return _cut_ffn(block, keep)
        heads = torch.tensor(self.kept_heads(block), device=keep.device)[keep]
        new = PrunedT5Attention(block.config, block.has_relative_attention_bias, block.layer_idx, block.is_causal,
                                heads)
        idx = head_index(keep, block.key_value_proj_dim)
        new.q, new.k, new.v = (keep_rows(p, idx) for p in (block.q, block.k, block.v))
        new.o = keep_cols(block.o, idx)
        if block.has_relative_attention_bias:
            with torch.no_grad():
                new.relative_attention_bias.weight.copy_(block.relative_attention_bias.weight)
        return new.train(block.training)

    def kept_heads(self, block: nn.Module) -> list[int]:
        return block.heads.tolist() if isinstance(block, PrunedT5Attention) else list(range(block.n_heads))

    def scores(self, block: nn.Module, criterion: str) -> Tensor:
        if isinstance(block, FFN_TYPES):
            w_in = [block.wi.weight] if hasattr(block, "wi") else [block.wi_0.weight, block.wi_1.weight]
            return neuron_scores(w_in, block.wo.weight)
        return head_scores(block.q.weight, block.k.weight, block.v.weight, block.o.weight, block.n_heads, criterion)

    def tuning_parameters(self, block: nn.Module) -> list[nn.Parameter]:
        shared = getattr(block, "relative_attention_bias", None)
        skip = {id(p) for p in shared.parameters()} if shared is not None else set()
        return [p for p in block.parameters() if id(p) not in skip]

    # ---- training from scratch ------------------------------------------------------------
    def tokenizer_from_spm(self, spm_proto: bytes) -> HFTokenizer:
        with tempfile.TemporaryDirectory() as tmp:
            hf = t5_tokenizer(spm_proto, Path(tmp))
        return HFTokenizer(hf, pad_id=PAD_ID, bos_id=PAD_ID, eos_id=EOS_ID)  # T5 starts decoding with pad

    def from_scratch(self, sizes: dict[str, Any], tok: Any) -> nn.Module:
        from transformers import T5Config, T5ForConditionalGeneration

        d, heads = sizes["d_model"], sizes["n_heads"]
        cfg = T5Config(vocab_size=tok.vocab_size, d_model=d, num_heads=heads, d_kv=d // heads, d_ff=sizes["d_ff"],
                       num_layers=sizes["n_encoder_layers"], num_decoder_layers=sizes["n_decoder_layers"],
                       feed_forward_proj="relu", dropout_rate=0.1, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id,
                       decoder_start_token_id=tok.bos_id, architectures=[self.model_class])
        return T5ForConditionalGeneration(cfg)

    # ---- running ----------------------------------------------------------------------------
    def max_len(self, model: nn.Module) -> int:
        return 512  # relative positions: no table to outgrow; T5's own tokenizers cut at 512

    def attention_dims(self, block: nn.Module) -> tuple[int, int, int]:
        return block.d_model, block.n_heads, block.key_value_proj_dim

    def ffn_dims(self, block: nn.Module) -> tuple[int, int, int]:
        return block.wo.out_features, block.wo.in_features, 3 if hasattr(block, "wi_0") else 2


def _cut_ffn(ffn: nn.Module, keep: Tensor) -> nn.Module:
    """A new T5 FFN keeping hidden neurons ``keep``: rows of wi (wi_0, wi_1), columns of wo."""
    gated = hasattr(ffn, "wi_0")
    cfg = SimpleNamespace(d_model=ffn.wo.out_features, d_ff=len(keep), dropout_rate=ffn.dropout.p,
                          dense_act_fn="relu")
    new = (T5DenseGatedActDense if gated else T5DenseActDense)(cfg)
    new.act = ffn.act
    for a in ("wi_0", "wi_1") if gated else ("wi",):
        setattr(new, a, keep_rows(getattr(ffn, a), keep))
    new.wo = keep_cols(ffn.wo, keep)
    return new.train(ffn.training)


def t5_tokenizer(spm_proto: bytes, folder: Path) -> Any:
    """A T5Tokenizer over a sentencepiece model (ids as the sentencepiece model numbers its
    pieces, no sentinel tokens), written into ``folder`` and loaded from there."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_proto=spm_proto)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(str(folder))
    return T5Tokenizer.from_pretrained(str(folder), local_files_only=True)
