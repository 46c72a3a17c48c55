"""ctprune's Transformer as two exportable graphs, built from the model's own submodules.

- ``EncoderGraph``: src ids (B, S) -> src_mask (B, S) and, per decoder layer i, the
  cross-attention keys/values ``cross.i.key`` / ``cross.i.value`` (B, Hc_i, S, hd), computed
  once per sentence.
- ``DecoderStepGraph``: one new token per row (B, 1), src_mask, and per decoder layer the
  self-attention cache ``past.i.key`` / ``past.i.value`` (B, Hs_i, P, hd) plus the cross
  keys/values -> logits (B, V) and ``present.i.key`` / ``present.i.value`` (B, Hs_i, P+1, hd).

Each layer's tensors carry its own head count (Hs_i, Hc_i), so a model pruned unevenly exports
as is; only batch and length axes are dynamic. The position of the new token is the cache
length P, read from the shape of the first cache with heads, so the step needs no position input.

A family's graphs are a :class:`Graphs` (``NATIVE`` here, ``MARIAN`` and ``T5`` in ``graphs_hf.py``),
named by its registration in ``ctprune.arch`` (``Serving.graphs``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ctprune.errors import CtpruneError
from ctprune.model.transformer import Seq2SeqTransformer


@dataclass(frozen=True)
class Graphs:
    """What export reads of a family's model: its two graph modules, the per-layer head counts,
    the token ids and sizes ``graphs.json`` records, and the vocabulary the probe inputs draw from.

    ``encoder`` / ``step``: model -> encoder graph module / decoder-step graph module.
    ``heads``: model -> (head_dim, per decoder layer self-attention heads, cross-attention heads).
    ``ids``: (architecture, model) -> ``vocab_size``, ``max_len``, ``pad_id``, ``bos_id`` (the
    decoder's start), ``eos_id`` and whatever else the engines must copy (a Hugging Face model:
    ``forced_eos``, ``length_penalty``), in the order ``graphs.json`` lists them.
    ``probe_vocab``: model -> the ids below it feed every embedding (probe inputs of ``--optimize``).
    """

    encoder: Callable[[nn.Module], nn.Module]
    step: Callable[[nn.Module], nn.Module]
    heads: Callable[[nn.Module], tuple[int, list[int], list[int]]]
    ids: Callable[[Any, nn.Module], dict[str, Any]]
    probe_vocab: Callable[[nn.Module], int]


class EncoderGraph(nn.Module):
    def __init__(self, model: Seq2SeqTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor) -> tuple[Tensor, ...]:
        memory, mask = self.model.encode(src)  # (B, S, d), (B, 1, 1, S)
        out = [mask[:, 0, 0, :]]  # (B, S) bool
        for layer in self.model.decoder.layers:
            attn = layer.cross_attn
            out += [attn._split(attn.k_proj(memory)), attn._split(attn.v_proj(memory))]  # (B, Hc, S, hd)
        return tuple(out)


class DecoderStepGraph(nn.Module):
    def __init__(self, model: Seq2SeqTransformer) -> None:
        super().__init__()
        self.model = model
        # The cache length of a layer whose self-attention has heads (a removed block, 0 heads,
        # keeps an empty cache) gives the new token's position.
        heads = model.cfg.decoder_self_heads
        if not any(heads):
            raise CtpruneError("export needs at least one decoder self-attention block with heads "
                               "(the step graph reads the position from its cache)")
        self.position_layer = next(i for i, h in enumerate(heads) if h)

    def forward(self, input_ids: Tensor, src_mask: Tensor, past: list[Tensor],
                cross: list[Tensor]) -> tuple[Tensor, ...]:
        """input_ids (B, 1); src_mask (B, S) bool; past: [k0, v0, k1, v1, ...] (B, Hs_i, P, hd);
        cross: [k0, v0, ...] (B, Hc_i, S, hd) -> (logits (B, V), present k0, v0, k1, v1, ...)."""
        m = self.model
        offset = past[2 * self.position_layer].shape[2]
        y = m._embed(m.tgt_embed, input_ids, offset)  # (B, 1, d)
        mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        present: list[Tensor] = []
        for i, layer in enumerate(m.decoder.layers):
            cache = {"self": {"k": past[2 * i], "v": past[2 * i + 1]},
                     "cross": {"k": cross[2 * i], "v": cross[2 * i + 1]}}
            # The layer appends this step's keys/values to cache["self"]; memory is unused
            # because cache["cross"] already holds the cross keys/values.
            y = layer(y, None, mask, cache)
            present += [cache["self"]["k"], cache["self"]["v"]]
        logits = m.generator(m.decoder.norm(y)[:, -1])  # (B, V)
        return (logits, *present)


def native_heads(model: nn.Module) -> tuple[int, list[int], list[int]]:
    """(head_dim, per decoder layer self-attention heads, cross-attention heads)."""
    cfg = model.cfg
    return cfg.head_dim, list(cfg.decoder_self_heads), list(cfg.decoder_cross_heads)


def native_ids(arch: Any, model: nn.Module) -> dict[str, Any]:
    """``Graphs.ids`` of ctprune's Transformer: its config's."""
    cfg = model.cfg
    return {"vocab_size": cfg.vocab_size, "max_len": cfg.max_len, "pad_id": cfg.pad_id,
            "bos_id": cfg.bos_id, "eos_id": cfg.eos_id}


def native_vocab(model: nn.Module) -> int:
    return int(model.cfg.vocab_size)


NATIVE = Graphs(EncoderGraph, DecoderStepGraph, native_heads, native_ids, native_vocab)
