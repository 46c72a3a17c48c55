"""Scoring: one importance value per head or per FFN neuron (higher = keep).

Weight-only criteria need nothing but the module; the data-driven ``activation`` criterion uses
statistics gathered by ``activation_stats`` on a few batches of the origin model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ctprune.arch import Architecture
from ctprune.data.batching import Batch
from ctprune.model.transformer import Attention, FeedForward

HEAD_CRITERIA = ("original", "l1", "activation")


def _per_head(w: Tensor, n_heads: int) -> Tensor:
    """(nh*hs, d) rows of a projection -> (nh, hs*d)."""
    return w.reshape(n_heads, -1)


@torch.no_grad()
def head_scores(q: Tensor, k: Tensor, v: Tensor, out: Tensor, n_heads: int, criterion: str) -> Tensor:
    """One score per head from its projections' weights, (nh*hs, d) rows of q/k/v and
    (d, nh*hs) columns of the output projection, whatever module holds them. (nh,)
    ``original``: the prototype's |sum of the head's q, k and v weights|;
    ``l1``: mean |w| of the head's q/k/v rows plus that of its output columns."""
    if criterion == "original":
        return sum(_per_head(w, n_heads).sum(1) for w in (q, k, v)).abs()
    qkv = sum(_per_head(w, n_heads).abs().mean(1) for w in (q, k, v))
    return qkv + out.t().reshape(n_heads, -1).abs().mean(1)


@torch.no_grad()
def neuron_scores(w_in: list[Tensor], w_out: Tensor) -> Tensor:
    """Product of the L1 norms of a hidden neuron's rows in the input Linear(s) (two when gated)
    and of its column in the output Linear. (d_ff,)"""
    score = w_out.abs().sum(0)
    for w in w_in:
        score = score * w.abs().sum(1)
    return score


def head_original(attn: Attention) -> Tensor:
    """The prototype's criterion: |sum of the head's q, k and v weights|. (nh,)"""
    return head_scores(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.out_proj.weight,
                       attn.n_heads, "original")


def head_l1(attn: Attention) -> Tensor:
    """Mean |w| of the head's q/k/v rows and out_proj columns. (nh,)"""
    return head_scores(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.out_proj.weight,
                       attn.n_heads, "l1")


def neuron_l1(ffn: FeedForward) -> Tensor:
    """|row of linear1|_1 x |column of linear2|_1 per hidden neuron. (d_ff,)"""
    return neuron_scores([ffn.linear1.weight], ffn.linear2.weight)


@torch.no_grad()
def activation_stats(arch: Architecture, model: nn.Module, batches: Iterable[Batch]) -> dict[str, Tensor]:
    """Data-driven scores for every attention block and FFN of ``model`` (any architecture: the
    hooks sit on each unit's output Linear, ``output_linear`` of ``ctprune.arch``):
    attention -> mean L2 norm of each head's contribution to the block output (nh,);
    ffn -> mean |activation| x L2 norm of the neuron's output column (d_ff,)."""
    model.eval()
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def attn_hook(name: str, out: nn.Linear, n_heads: int) -> Callable[..., None]:
        def hook(_m: object, inp: tuple[Tensor, ...]) -> None:
            y = inp[0]  # (B, T, nh*hs), the input of the output projection
            b, t, _ = y.shape
            w = out.weight.t().reshape(n_heads, y.shape[-1] // n_heads, -1)  # (nh, hs, d)
            per_head = torch.einsum("bths,hsd->bthd", y.view(b, t, n_heads, -1), w)
            sums[name] = sums.get(name, 0) + per_head.norm(dim=-1).sum((0, 1))
            counts[name] = counts.get(name, 0) + b * t
        return hook

    def ffn_hook(name: str, out: nn.Linear) -> Callable[..., None]:
        def hook(_m: object, inp: tuple[Tensor, ...]) -> None:
            a = inp[0]  # (B, T, d_ff) activations, the input of the FFN's output Linear
            sums[name] = sums.get(name, 0) + a.abs().sum((0, 1)) * out.weight.norm(dim=0)
            counts[name] = counts.get(name, 0) + a.shape[0] * a.shape[1]
        return hook

    for name, u in arch.units(model).items():
        if u.kind == "linear":
            continue
        out = arch.output_linear(model, name)
        hook = attn_hook(name, out, u.size) if u.kind == "attention" else ffn_hook(name, out)
        hooks.append(out.register_forward_pre_hook(hook))
    try:
        for batch in batches:
            arch.logits(model, batch.src, batch.tgt_in)
    finally:
        for h in hooks:
            h.remove()
    return {name: sums[name] / counts[name] for name in sums}
