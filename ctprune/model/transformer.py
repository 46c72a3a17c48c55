"""The encoder-decoder Transformer, written so that heads and FFN neurons can be cut out.

The architecture is the original one (``torch.nn.Transformer``, post-LayerNorm, with a final
LayerNorm on encoder and decoder, scaled embeddings, sinusoidal positions, a ``generator``
output Linear), but every attention block has its own q/k/v/out projections whose inner width
is ``heads x head_dim`` and every layer's head count and FFN width live in ``ModelConfig``.
A pruned model is therefore rebuilt from its config alone.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctprune.errors import CtpruneError
from ctprune.fileio import brief
from ctprune.model.ops import Dropout, attention, autocast_input

PRESETS: dict[str, dict[str, Any]] = {
    # The original architecture: 3+3 layers, d_model 512, 8 heads, FFN 512.
    "seed": dict(d_model=512, n_heads=8, d_ff=512, n_encoder_layers=3, n_decoder_layers=3),
    # For tests and the demo: seconds per epoch on the synthetic corpus.
    "tiny": dict(d_model=64, n_heads=4, d_ff=128, n_encoder_layers=2, n_decoder_layers=2),
}


@dataclass
class ModelConfig:
    """Every hyperparameter of the architecture, including per-layer head counts and widths.

    ``encoder_heads[i]`` etc. default to ``n_heads`` / ``d_ff`` for every layer; pruning
    lowers them.
    """

    vocab_size: int
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 512
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    dropout: float = 0.1
    max_len: int = 256
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3
    tie_embeddings: bool = True
    init_std: float = 0.02  # std of the normal init of every Linear and embedding (as HF's init_std)
    encoder_heads: list[int] = field(default_factory=list)
    encoder_ffn: list[int] = field(default_factory=list)
    decoder_self_heads: list[int] = field(default_factory=list)
    decoder_cross_heads: list[int] = field(default_factory=list)
    decoder_ffn: list[int] = field(default_factory=list)
    # Linears pruned unstructured: each carries a ``weight_mask`` buffer, enforced in training.
    sparse_linears: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_encoder_layers",
                     "n_decoder_layers", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CtpruneError(f"model config: {name} must be a positive integer, got {brief(value)}")
        if self.d_model % self.n_heads:
            raise CtpruneError(
                f"model config: d_model {self.d_model} must be divisible by n_heads {self.n_heads}")
        if not (isinstance(self.init_std, (int, float)) and 0.0 < self.init_std <= 1.0):
            raise CtpruneError(f"model config: init_std must be in (0, 1], got {brief(self.init_std)}")
        if not 0.0 <= self.dropout < 1.0:
            raise CtpruneError(f"model config: dropout must be in [0, 1), got {brief(self.dropout)}")
        per_layer = {
            "encoder_heads": (self.n_encoder_layers, self.n_heads),
            "encoder_ffn": (self.n_encoder_layers, self.d_ff),
            "decoder_self_heads": (self.n_decoder_layers, self.n_heads),
            "decoder_cross_heads": (self.n_decoder_layers, self.n_heads),
            "decoder_ffn": (self.n_decoder_layers, self.d_ff),
        }
        for name, (n_layers, full) in per_layer.items():
            sizes = getattr(self, name) or [full] * n_layers
            # 0: the block removed altogether (its forward returns zeros; the residual and norm remain)
            if len(sizes) != n_layers or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= full
                                             for s in sizes):
                raise CtpruneError(
                    f"model config: {name} must list {n_layers} integers in [0, {full}], got {brief(sizes)}")
            setattr(self, name, list(sizes))
        linears = self.sparse_linears
        if not isinstance(linears, list) or not all(isinstance(n, str) for n in linears) \
                or len(set(linears)) != len(linears):
            raise CtpruneError(f"model config: sparse_linears must be a list of distinct Linear names, got "
                               f"{brief(linears)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CtpruneError(f"model config: unknown field(s) {unknown}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, vocab_size: int, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise CtpruneError(f"unknown preset {brief(name)}; choose one of {', '.join(PRESETS)}")
        return cls(vocab_size=vocab_size, **{**PRESETS[name], **overrides})


KVCache = dict[str, Tensor]


class Attention(nn.Module):
    """Multi-head attention with separate projections; inner width ``n_heads * head_dim``."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = n_heads, head_dim, dropout
        inner = n_heads * head_dim
        self.q_proj = nn.Linear(d_model, inner)
        self.k_proj = nn.Linear(d_model, inner)
        self.v_proj = nn.Linear(d_model, inner)
        self.out_proj = nn.Linear(inner, d_model)

    def _split(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape  # (B, T, nh*hs) -> (B, nh, T, hs)
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, kv: Tensor, mask: Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None, static_kv: bool = False) -> Tensor:
        """x: (B, T, d) queries; kv: (B, S, d) keys/values source; mask: (B, 1, 1|T, S) bool,
        True = attend. ``cache`` holds keys/values between decoding steps: appended to for
        self-attention, computed once for cross-attention (``static_kv``)."""
        if self.n_heads == 0:  # the block removed: its residual branch adds nothing
            return x.new_zeros(x.shape[0], x.shape[1], self.out_proj.out_features)
        q = self._split(self.q_proj(x))
        if cache is not None and static_kv and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = self._split(self.k_proj(kv)), self._split(self.v_proj(kv))
            if cache is not None:
                if not static_kv and "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        y = attention(q, k, v, mask, causal and cache is None, self.dropout, self.training)
        y = y.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.n_heads * self.head_dim)
        return self.out_proj(y)  # (B, T, d)


class FeedForward(nn.Module):
    """linear1 -> ReLU -> dropout -> linear2; the hidden width is what FFN pruning cuts."""

    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.linear1.out_features == 0:  # the block removed: its residual branch adds nothing
            return x.new_zeros(x.shape)
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, heads: int, d_ff: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg.d_model, heads, cfg.head_dim, cfg.dropout)
        self.ffn = FeedForward(cfg.d_model, d_ff, cfg.dropout)
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: Tensor, src_mask: Tensor) -> Tensor:
        h = autocast_input(x)  # cast once for q, k and v
        x = self.norm1(x + self.drop(self.self_attn(h, h, src_mask)))
        return self.norm2(x + self.drop(self.ffn(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, self_heads: int, cross_heads: int, d_ff: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg.d_model, self_heads, cfg.head_dim, cfg.dropout)
        self.cross_attn = Attention(cfg.d_model, cross_heads, cfg.head_dim, cfg.dropout)
        self.ffn = FeedForward(cfg.d_model, d_ff, cfg.dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.drop = Dropout(cfg.dropout)

    def forward(self, y: Tensor, memory: Tensor, src_mask: Tensor,
                cache: dict[str, KVCache] | None = None) -> Tensor:
        self_cache = cross_cache = None
        if cache is not None:
            self_cache, cross_cache = cache.setdefault("self", {}), cache.setdefault("cross", {})
        h = autocast_input(y)  # cast once for q, k and v
        y = self.norm1(y + self.drop(self.self_attn(h, h, causal=True, cache=self_cache)))
        y = self.norm2(y + self.drop(self.cross_attn(y, memory, src_mask, cache=cross_cache,
                                                     static_kv=True)))
        return self.norm3(y + self.drop(self.ffn(y)))


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg, h, f)
                                    for h, f in zip(cfg.encoder_heads, cfg.encoder_ffn))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: Tensor, src_mask: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, src_mask)
        return self.norm(x)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, s, c, f)
            for s, c, f in zip(cfg.decoder_self_heads, cfg.decoder_cross_heads, cfg.decoder_ffn))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, y: Tensor, memory: Tensor, src_mask: Tensor,
                cache: list[dict[str, KVCache]] | None = None) -> Tensor:
        memory = autocast_input(memory)  # cast once for every layer's cross-attention
        for i, layer in enumerate(self.layers):
            y = layer(y, memory, src_mask, None if cache is None else cache[i])
        return self.norm(y)


def sinusoidal_positions(max_len: int, d_model: int) -> Tensor:
    """(max_len, d_model) table of the original Transformer's positional encoding."""
    pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


class Seq2SeqTransformer(nn.Module):
    """src (B, S) token ids, tgt_in (B, T) token ids -> logits (B, T, vocab)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.src_embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.tgt_embed = (self.src_embed if cfg.tie_embeddings
                          else nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id))
        self.register_buffer("pos", sinusoidal_positions(cfg.max_len, cfg.d_model), persistent=False)
        self.drop = Dropout(cfg.dropout)
        with warnings.catch_warnings():  # a removed block's empty Linears: torch warns their init is a no-op
            warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)
            self.encoder = Encoder(cfg)
            self.decoder = Decoder(cfg)
        self.generator = nn.Linear(cfg.d_model, cfg.vocab_size)
        self._init_weights()
        if cfg.tie_embeddings:
            self.generator.weight = self.src_embed.weight
        for name in cfg.sparse_linears:
            linear = self.get_submodule(name)
            linear.register_buffer("weight_mask", torch.ones_like(linear.weight))

    def _init_weights(self) -> None:
        """normal(0, ``init_std``) for every Linear and the embeddings, zero biases, a zero
        padding row: Hugging Face's BART/Marian initialisation. The Xavier-uniform init of
        ``torch.nn.Transformer`` (embeddings at std d^-0.5) trained 12 BLEU behind a MarianMT of
        the same sizes after the first Multi30k epoch and 4 behind after eight; with this init the
        first-epoch gap is 1 BLEU (benchmarks/origin_ablation.py, issue 22)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.numel():
                nn.init.normal_(module.weight, std=self.cfg.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.src_embed.weight[self.cfg.pad_id].zero_()
            self.tgt_embed.weight[self.cfg.pad_id].zero_()

    def _embed(self, emb: nn.Embedding, ids: Tensor, offset: int = 0) -> Tensor:
        if offset + ids.shape[1] > self.cfg.max_len:
            raise CtpruneError(f"sequence of {offset + ids.shape[1]} tokens exceeds max_len "
                               f"{self.cfg.max_len}")
        x = emb(ids) * math.sqrt(self.cfg.d_model)
        return self.drop(x + self.pos[offset:offset + ids.shape[1]])

    def src_mask(self, src: Tensor) -> Tensor:
        return (src != self.cfg.pad_id)[:, None, None, :]  # (B, 1, 1, S)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) -> memory (B, S, d), src_mask (B, 1, 1, S)."""
        mask = self.src_mask(src)
        return self.encoder(self._embed(self.src_embed, src), mask), mask

    def decode(self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor,
               cache: list[dict[str, KVCache]] | None = None, offset: int = 0) -> Tensor:
        """tgt_in (B, T) -> hidden (B, T, d); with ``cache``, tgt_in holds only new tokens."""
        return self.decoder(self._embed(self.tgt_embed, tgt_in, offset), memory, src_mask, cache)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        memory, mask = self.encode(src)
        return self.generator(self.decode(tgt_in, memory, mask))

    def new_cache(self) -> list[dict[str, KVCache]]:
        return [{} for _ in self.decoder.layers]
