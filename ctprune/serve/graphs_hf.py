"""MarianMT and T5 (pruned by ctprune or not) as the two exportable graphs of ``graphs.py``.

The graphs take and give what ctprune's own take and give, so one engine runs them all:

- encoder: src ids (B, S) -> src_mask (B, S) bool (src != pad) and, per decoder layer i, the
  cross-attention keys/values ``cross.i.key`` / ``cross.i.value`` (B, Hc_i, S, hd).
- decoder step: one token per row (B, 1), src_mask, per decoder layer the self-attention cache
  ``past.i.key`` / ``past.i.value`` (B, Hs_i, P, hd) and the cross keys/values -> logits (B, V)
  and ``present.i.key`` / ``present.i.value`` (B, Hs_i, P+1, hd).

The layers are written out here from the Hugging Face modules' own Linears, norms and activations
(not through their ``forward``, which works on Hugging Face cache objects), so each layer's head
count is whatever its projections hold. Attention follows Hugging Face's eager attention:
scores = q k^T x scaling (+ T5's position bias) + mask, softmax, x v.

- Marian: embeddings x sqrt(d_model) when ``scale_embedding``, plus its sinusoidal table at
  positions 0.. (the step's position is the cache length); post-LayerNorm layers; logits
  ``lm_head(h) + final_logits_bias`` (``lm_head`` is tied to the embedding where the config ties it).
- T5: no position table; each stack's relative position bias (1, H, q, k) is computed once in the
  graph from layer 0's bucket table, as ``T5Attention.compute_bias`` does (the step's query at the
  cache length), and every self-attention adds only the slices of the heads it keeps
  (``PrunedT5Attention.heads``, indices into the full layer). Pre-RMSNorm layers, a final norm
  per stack, decoder output x d_model^-0.5 when ``scale_decoder_outputs`` (tied embeddings).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ctprune.errors import CtpruneError
from ctprune.serve.graphs import Graphs


def _split(x: Tensor, head_dim: int) -> Tensor:
    """(B, T, H*hd) -> (B, H, T, hd)."""
    b, t, _ = x.shape
    return x.view(b, t, -1, head_dim).transpose(1, 2)


def _attend(q: Tensor, k: Tensor, v: Tensor, scaling: float, *biases: Tensor) -> Tensor:
    """q (B, H, T, hd), k / v (B, H, S, hd), biases broadcast to (B, H, T, S) -> (B, T, H*hd)."""
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    for bias in biases:
        scores = scores + bias
    out = torch.matmul(scores.softmax(-1), v)  # (B, H, T, hd)
    b, h, t, hd = out.shape
    return out.transpose(1, 2).reshape(b, t, h * hd)


def _key_mask(src_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """src_mask (B, S) bool -> additive (B, 1, 1, S): 0 on real tokens, the dtype's minimum on
    padding (what Hugging Face's eager masks add)."""
    zero = torch.zeros(src_mask.shape, dtype=dtype, device=src_mask.device)
    return zero.masked_fill(~src_mask, torch.finfo(dtype).min)[:, None, None, :]


def _position_layer(heads: list[int]) -> int:
    """The first decoder layer whose self-attention has heads: its cache length is the step's position."""
    if not any(heads):
        raise CtpruneError("export needs at least one decoder self-attention block with heads "
                           "(the step graph reads the position from its cache)")
    return next(i for i, h in enumerate(heads) if h)


# ---- MarianMT -------------------------------------------------------------------------------

def marian_heads(model: nn.Module) -> tuple[int, list[int], list[int]]:
    """(head_dim, per decoder layer self-attention heads, cross-attention heads)."""
    layers = model.model.decoder.layers
    hd = layers[0].self_attn.head_dim
    return (hd, [x.self_attn.q_proj.out_features // hd for x in layers],
            [x.encoder_attn.q_proj.out_features // hd for x in layers])


class MarianEncoderGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.pad_id = int(model.config.pad_token_id)

    def forward(self, src: Tensor) -> tuple[Tensor, ...]:
        m = self.model.model
        enc = m.encoder
        src_mask = src != self.pad_id  # (B, S)
        x = enc.embed_tokens(src) * enc.embed_scale + enc.embed_positions.weight[:src.shape[1]]  # (B, S, d)
        mask = _key_mask(src_mask, x.dtype)
        for layer in enc.layers:
            a = layer.self_attn
            h = _attend(_split(a.q_proj(x), a.head_dim), _split(a.k_proj(x), a.head_dim),
                        _split(a.v_proj(x), a.head_dim), a.scaling, mask)
            x = layer.self_attn_layer_norm(x + a.out_proj(h))
            x = layer.final_layer_norm(x + layer.fc2(layer.activation_fn(layer.fc1(x))))
        out = [src_mask]
        for layer in m.decoder.layers:
            c = layer.encoder_attn
            out += [_split(c.k_proj(x), c.head_dim), _split(c.v_proj(x), c.head_dim)]  # (B, Hc, S, hd)
        return tuple(out)


class MarianDecoderStepGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.position_layer = _position_layer(marian_heads(model)[1])

    def forward(self, input_ids: Tensor, src_mask: Tensor, past: list[Tensor],
                cross: list[Tensor]) -> tuple[Tensor, ...]:
        """input_ids (B, 1); src_mask (B, S) bool; past [k0, v0, ...] (B, Hs_i, P, hd); cross [k0, v0, ...]
        (B, Hc_i, S, hd) -> (logits (B, V), present k0, v0, ... (B, Hs_i, P+1, hd))."""
        mt = self.model
        dec = mt.model.decoder
        offset = past[2 * self.position_layer].shape[2]
        x = dec.embed_tokens(input_ids) * dec.embed_scale + dec.embed_positions.weight[offset:offset + 1]  # (B, 1, d)
        mask = _key_mask(src_mask, x.dtype)
        present: list[Tensor] = []
        for i, layer in enumerate(dec.layers):
            a = layer.self_attn
            k = torch.cat([past[2 * i], _split(a.k_proj(x), a.head_dim)], 2)  # (B, Hs, P+1, hd)
            v = torch.cat([past[2 * i + 1], _split(a.v_proj(x), a.head_dim)], 2)
            h = _attend(_split(a.q_proj(x), a.head_dim), k, v, a.scaling)  # the cache holds only earlier tokens
            x = layer.self_attn_layer_norm(x + a.out_proj(h))
            c = layer.encoder_attn
            h = _attend(_split(c.q_proj(x), c.head_dim), cross[2 * i], cross[2 * i + 1], c.scaling, mask)
            x = layer.encoder_attn_layer_norm(x + c.out_proj(h))
            x = layer.final_layer_norm(x + layer.fc2(layer.activation_fn(layer.fc1(x))))
            present += [k, v]
        logits = mt.lm_head(x[:, -1]) + mt.final_logits_bias[0]  # (B, V)
        return (logits, *present)


# ---- T5 -------------------------------------------------------------------------------------

def t5_heads(model: nn.Module) -> tuple[int, list[int], list[int]]:
    """(head_dim, per decoder layer self-attention heads, cross-attention heads)."""
    hd = int(model.config.d_kv)
    blocks = model.decoder.block
    return (hd, [b.layer[0].SelfAttention.q.out_features // hd for b in blocks],
            [b.layer[1].EncDecAttention.q.out_features // hd for b in blocks])


def kept_heads(stack: nn.Module) -> list[list[int] | None]:
    """Per block of a T5 stack, the heads its self-attention keeps (indices into the full layer:
    ``PrunedT5Attention.heads``), or None for an unpruned one. Read once, as Python lists, so that
    the graph slices the bias with constants."""
    attns = [block.layer[0].SelfAttention for block in stack.block]
    return [a.heads.tolist() if hasattr(a, "heads") else None for a in attns]


def _t5_self_attention(sub: nn.Module, x: Tensor, bias: Tensor, kept: list[int] | None, mask: Tensor | None = None,
                       past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A T5LayerSelfAttention: (x + attention(norm(x)), keys, values). ``bias`` (1, H_full, q, k):
    the stack's, of which the heads ``kept`` are added; ``past`` keys/values go first."""
    a = sub.SelfAttention
    hd = a.key_value_proj_dim
    n = sub.layer_norm(x)
    k, v = _split(a.k(n), hd), _split(a.v(n), hd)
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    own = bias if kept is None else bias[:, kept]  # (1, H, q, k)
    biases = (own,) if mask is None else (own, mask)
    return x + a.o(_attend(_split(a.q(n), hd), k, v, a.scaling, *biases)), k, v


def _t5_ffn(sub: nn.Module, x: Tensor) -> Tensor:
    return x + sub.DenseReluDense(sub.layer_norm(x))


class T5EncoderGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.pad_id = int(model.config.pad_token_id)
        self.kept = kept_heads(model.encoder)

    def forward(self, src: Tensor) -> tuple[Tensor, ...]:
        enc, dec = self.model.encoder, self.model.decoder
        src_mask = src != self.pad_id  # (B, S)
        x = enc.embed_tokens(src)  # (B, S, d)
        mask = _key_mask(src_mask, x.dtype)
        s = src.shape[1]
        bias = enc.block[0].layer[0].SelfAttention.compute_bias(s, s, device=src.device)  # (1, H, S, S)
        for block, kept in zip(enc.block, self.kept):
            x = _t5_ffn(block.layer[-1], _t5_self_attention(block.layer[0], x, bias, kept, mask)[0])
        x = enc.final_layer_norm(x)
        out = [src_mask]
        for block in dec.block:
            c = block.layer[1].EncDecAttention
            out += [_split(c.k(x), c.key_value_proj_dim), _split(c.v(x), c.key_value_proj_dim)]
        return tuple(out)


class T5DecoderStepGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.position_layer = _position_layer(t5_heads(model)[1])
        self.kept = kept_heads(model.decoder)

    def forward(self, input_ids: Tensor, src_mask: Tensor, past: list[Tensor],
                cross: list[Tensor]) -> tuple[Tensor, ...]:
        """As ``MarianDecoderStepGraph.forward``."""
        t5 = self.model
        dec = t5.decoder
        offset = past[2 * self.position_layer].shape[2]
        x = dec.embed_tokens(input_ids)  # (B, 1, d)
        mask = _key_mask(src_mask, x.dtype)
        # The new token's bias over the P + 1 keys, every head of the full layer.
        bias = dec.block[0].layer[0].SelfAttention.compute_bias(1, offset + 1, device=x.device,
                                                                past_seen_tokens=offset)  # (1, H, 1, P+1)
        present: list[Tensor] = []
        for i, block in enumerate(dec.block):
            x, k, v = _t5_self_attention(block.layer[0], x, bias, self.kept[i], past=(past[2 * i], past[2 * i + 1]))
            sub = block.layer[1]
            c = sub.EncDecAttention
            n = sub.layer_norm(x)
            x = x + c.o(_attend(_split(c.q(n), c.key_value_proj_dim), cross[2 * i], cross[2 * i + 1], c.scaling, mask))
            x = _t5_ffn(block.layer[-1], x)
            present += [k, v]
        x = dec.final_layer_norm(x)
        if t5.config.scale_decoder_outputs:
            x = x * (t5.model_dim ** -0.5)
        return (t5.lm_head(x[:, -1]), *present)


# ---- both ------------------------------------------------------------------------------------

def hf_ids(arch: Any, model: nn.Module) -> dict[str, Any]:
    """``Graphs.ids`` of a Hugging Face model: its config's ids (the decoder starts with
    ``decoder_start_token_id``), the architecture's position limit, and what its ``generate``
    does that a serving engine must copy."""
    cfg, gen = model.config, model.generation_config
    return {"vocab_size": int(cfg.vocab_size), "max_len": arch.max_len(model), "pad_id": int(cfg.pad_token_id),
            "bos_id": int(cfg.decoder_start_token_id), "eos_id": int(cfg.eos_token_id),
            "forced_eos": gen.forced_eos_token_id is not None,
            "length_penalty": float(1.0 if gen.length_penalty is None else gen.length_penalty)}


def hf_vocab(model: nn.Module) -> int:
    """The ids both embeddings take (Marian's may differ when not shared)."""
    return int(min(model.get_input_embeddings().num_embeddings, model.get_output_embeddings().out_features))


MARIAN = Graphs(MarianEncoderGraph, MarianDecoderStepGraph, marian_heads, hf_ids, hf_vocab)
T5 = Graphs(T5EncoderGraph, T5DecoderStepGraph, t5_heads, hf_ids, hf_vocab)
