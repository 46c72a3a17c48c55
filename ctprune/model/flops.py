"""Analytic FLOP and parameter counts of a (possibly pruned) model."""

from __future__ import annotations

from ctprune.model.transformer import ModelConfig, Seq2SeqTransformer


def forward_flops(cfg: ModelConfig, src_len: int, tgt_len: int) -> int:
    """FLOPs (2 per multiply-add) of one forward pass over one sentence pair: every Linear,
    the attention score and value products, and the generator. Dense: masks do not count."""
    d, hd = cfg.d_model, cfg.head_dim
    f = 0
    for h, ff in zip(cfg.encoder_heads, cfg.encoder_ffn):
        f += src_len * (4 * d * h * hd + 2 * d * ff) + 2 * src_len * src_len * h * hd
    for hs, hc, ff in zip(cfg.decoder_self_heads, cfg.decoder_cross_heads, cfg.decoder_ffn):
        f += tgt_len * (4 * d * hs * hd + 2 * d * hc * hd + 2 * d * ff) + src_len * 2 * d * hc * hd
        f += 2 * tgt_len * tgt_len * hs * hd // 2 + 2 * tgt_len * src_len * hc * hd
    f += tgt_len * d * cfg.vocab_size
    return 2 * f


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
