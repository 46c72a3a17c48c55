"""Analytic FLOP and parameter counts of a (possibly pruned) model and of its blocks.

FLOPs are 2 per multiply-add, dense (masks do not count: dense kernels compute the zeros too).
Training costs are counted the usual way: a backward pass costs twice its forward pass.
"""

from __future__ import annotations

from torch import nn

from ctprune.model.transformer import Attention, FeedForward, ModelConfig, Seq2SeqTransformer

BACKWARD_FACTOR = 2  # a backward pass costs about twice the forward pass (grads of inputs and weights)


def attention_flops(d: int, heads: int, head_dim: int, q_len: int, kv_len: int, causal: bool = False) -> int:
    """One attention block over one sentence: q/out projections on the queries, k/v projections
    on the keys, the score and value products (the causal half of them in a decoder's
    self-attention: what decoding computes, and what a causal kernel needs; the explicit CPU
    training path computes the full square, so training FLOPs are slightly undercounted there,
    on both sides of a comparison)."""
    inner = heads * head_dim
    products = 2 * q_len * kv_len * inner // (2 if causal else 1)
    return 2 * (q_len * 2 * d * inner + kv_len * 2 * d * inner + products)


def ffn_flops(d: int, width: int, tokens: int) -> int:
    return 2 * tokens * 2 * d * width


def forward_flops(cfg: ModelConfig, src_len: int, tgt_len: int) -> int:
    """FLOPs of one forward pass over one sentence pair: every block and the generator."""
    d, hd = cfg.d_model, cfg.head_dim
    f = 0
    for h, ff in zip(cfg.encoder_heads, cfg.encoder_ffn):
        f += attention_flops(d, h, hd, src_len, src_len) + ffn_flops(d, ff, src_len)
    for hs, hc, ff in zip(cfg.decoder_self_heads, cfg.decoder_cross_heads, cfg.decoder_ffn):
        f += attention_flops(d, hs, hd, tgt_len, tgt_len, causal=True)
        f += attention_flops(d, hc, hd, tgt_len, src_len) + ffn_flops(d, ff, tgt_len)
    return f + 2 * tgt_len * d * cfg.vocab_size


def module_flops(name: str, module: nn.Module, src_len: int, tgt_len: int) -> int:
    """Forward FLOPs of prunable module ``name`` (an attention block, an FFN, or a Linear inside
    them) over one sentence pair, at the module's own (possibly pruned) size."""
    side, _, _, *rest = name.split(".")  # "encoder|decoder", "layers", I, then the path inside
    q_len = src_len if side == "encoder" else tgt_len
    if isinstance(module, Attention):
        causal = side == "decoder" and rest[0] == "self_attn"
        kv_len = tgt_len if causal else src_len
        d = module.q_proj.in_features
        return attention_flops(d, module.n_heads, module.head_dim, q_len, kv_len, causal)
    if isinstance(module, FeedForward):
        return ffn_flops(module.linear1.in_features, module.linear1.out_features, q_len)
    if isinstance(module, nn.Linear):
        on_memory = rest[0] == "cross_attn" and rest[-1] in ("k_proj", "v_proj")
        return 2 * (src_len if on_memory else q_len) * module.in_features * module.out_features
    raise TypeError(f"{name} is not a prunable module")


def batch_forward_flops(cfg: ModelConfig, batch_size: int, src_len: int, tgt_len: int) -> int:
    """Forward FLOPs of a padded batch (B, S) -> (B, T): what the kernels really compute."""
    return batch_size * forward_flops(cfg, src_len, tgt_len)


def train_step_flops(cfg: ModelConfig, batch_size: int, src_len: int, tgt_len: int) -> int:
    """Forward + backward FLOPs of one end-to-end training step on a padded batch."""
    return (1 + BACKWARD_FACTOR) * batch_forward_flops(cfg, batch_size, src_len, tgt_len)


def parameter_counts(model: Seq2SeqTransformer) -> tuple[int, int]:
    """(parameters, non-zero parameters); tied weights counted once."""
    seen: set[int] = set()
    total = nonzero = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        nonzero += int((p != 0).sum())
    return total, nonzero
