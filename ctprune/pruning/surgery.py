"""Cutting: small pure functions ``(module, kept indices) -> new module`` with updated sizes.

Scoring (which heads or neurons matter) lives in ``importance.py``; these functions only cut.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ctprune.arch import Architecture
from ctprune.model.transformer import Attention, FeedForward, Seq2SeqTransformer


def n_keep(ratio: float, n: int) -> int:
    """round(ratio x n), halves rounded up, at least 1; 0 for ratio 0 (the block removed)."""
    if ratio == 0:
        return 0
    return max(1, min(n, math.floor(ratio * n + 0.5)))


@contextmanager
def _quiet_empty_init() -> Iterator[None]:
    """Building a removed block's empty Linears: torch warns that their init is a no-op."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)
        yield


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    with _quiet_empty_init():
        return nn.Linear(in_features, out_features, bias=bias)


def keep_rows(linear: nn.Linear, idx: Tensor) -> nn.Linear:
    """A new Linear with only output rows ``idx`` (weights and bias)."""
    new = _linear(linear.in_features, len(idx), bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[idx])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[idx])
    return new


def keep_cols(linear: nn.Linear, idx: Tensor) -> nn.Linear:
    """A new Linear with only input columns ``idx`` (the bias is kept whole)."""
    new = _linear(len(idx), linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, idx])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def head_index(keep: Tensor, head_dim: int) -> Tensor:
    """Rows (of q/k/v) or columns (of the output projection) of heads ``keep``: (len(keep) * hd,)."""
    return (keep[:, None] * head_dim + torch.arange(head_dim, device=keep.device)).flatten()


def cut_heads(attn: Attention, keep: Tensor) -> Attention:
    """A new Attention with only the heads ``keep`` (sorted 1-D indices); q/k/v rows and
    out_proj columns of the other heads are removed."""
    keep = keep.sort().values
    hd = attn.head_dim
    idx = head_index(keep, hd)
    with _quiet_empty_init():
        new = Attention(attn.q_proj.in_features, len(keep), hd, attn.dropout)
    new.q_proj, new.k_proj, new.v_proj = (keep_rows(p, idx) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    new.out_proj = keep_cols(attn.out_proj, idx)
    _clear_if_empty(new.out_proj)
    return new.train(attn.training)


def cut_neurons(ffn: FeedForward, keep: Tensor) -> FeedForward:
    """A new FeedForward keeping hidden neurons ``keep``: rows of linear1, columns of linear2."""
    keep = keep.sort().values
    with _quiet_empty_init():
        new = FeedForward(ffn.linear1.in_features, len(keep), ffn.dropout.p)
    new.linear1, new.linear2 = keep_rows(ffn.linear1, keep), keep_cols(ffn.linear2, keep)
    _clear_if_empty(new.linear2)
    return new.train(ffn.training)


def _clear_if_empty(out: nn.Linear) -> None:
    """Zero the output bias of a block that keeps no head or neuron: such a block returns zeros
    (its forward skips the bias), so the bias is no parameter of it (non-zero count 0)."""
    if out.in_features == 0 and out.bias is not None:
        with torch.no_grad():
            out.bias.zero_()


def l1_mask(weight: Tensor, ratio: float) -> Tensor:
    """Keep exactly round(ratio x numel) weights of largest magnitude: a 0/1 mask like ``weight``."""
    k = n_keep(ratio, weight.numel())
    mask = torch.zeros(weight.numel(), dtype=weight.dtype)
    mask[weight.detach().abs().flatten().topk(k).indices] = 1
    return mask.view_as(weight)


def mask_linear(linear: nn.Linear, mask: Tensor) -> nn.Linear:
    """A copy of ``linear`` with a ``weight_mask`` buffer and the masked weights zeroed."""
    new = copy.deepcopy(linear)
    new.register_buffer("weight_mask", mask.to(new.weight.dtype).clone())
    with torch.no_grad():
        new.weight.mul_(new.weight_mask)
    return new


def replace_module(model: Seq2SeqTransformer, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name`` and update the model's config (per-layer sizes, masked Linears)
    in the same step, so the model can be saved and rebuilt from config + weights."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)
    enc, dec = model.encoder.layers, model.decoder.layers
    model.cfg = dataclasses.replace(
        model.cfg,
        encoder_heads=[layer.self_attn.n_heads for layer in enc],
        encoder_ffn=[layer.ffn.linear1.out_features for layer in enc],
        decoder_self_heads=[layer.self_attn.n_heads for layer in dec],
        decoder_cross_heads=[layer.cross_attn.n_heads for layer in dec],
        decoder_ffn=[layer.ffn.linear1.out_features for layer in dec],
        sparse_linears=sorted(n for n, m in model.named_modules()
                              if isinstance(m, nn.Linear) and hasattr(m, "weight_mask")))


@contextmanager
def swapped(arch: Architecture, model: nn.Module, name: str, new: nn.Module) -> Iterator[nn.Module]:
    """``model`` (of architecture ``arch``) with ``new`` at unit ``name`` (sizes updated) inside
    the block, restored after it: "replace one block" without copying the model."""
    old = arch.block(model, name)
    arch.set_block(model, name, new)
    try:
        yield model
    finally:
        arch.set_block(model, name, old)
