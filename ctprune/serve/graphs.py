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
"""

from __future__ import annotations

from torch import Tensor, nn

from ctprune.errors import CtpruneError
from ctprune.model.transformer import Seq2SeqTransformer


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
