"""Masks as a parametrization (``ctprune.model.weights``): taken off again as they were put on,
and ``fit`` leaves the caller's model as it came."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from ctprune.arch import arch_of
from ctprune.model.weights import enforce_masks, masked_linears, release_masks
from ctprune.pruning.surgery import l1_mask, mask_linear

NAME = "encoder.layers.0.ffn.linear1"


def _masked(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    arch = arch_of(model)
    linear = arch.block(model, NAME)
    arch.set_block(model, NAME, mask_linear(linear, l1_mask(linear.weight, 0.3)))
    return model


def test_release_restores_the_parameters_in_their_order_with_masked_values(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = _masked(tiny_model)
    before = list(model.named_parameters())
    keys = list(model.state_dict())
    enforce_masks(model)
    linear = masked_linears(model)[0]
    assert [id(p) for p in model.parameters()] != [id(p) for _, p in before]  # parametrized: weight after bias
    with torch.no_grad():
        linear.parametrizations.weight.original.add_(1.0)  # what an optimizer may do to the original
    release_masks(masked_linears(model))
    assert not parametrize.is_parametrized(linear)
    after = list(model.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in before] and all(a is b for (_, a), (_, b) in zip(after, before))
    assert list(model.state_dict()) == keys
    assert bool((linear.weight[linear.weight_mask == 0] == 0).all())  # the masked value kept


def test_fit_leaves_the_model_unparametrized(model_folder: Path, tmp_path: Path) -> None:
    from ctprune.data.corpus import Parallel, load_split
    from ctprune.model.checkpoint import load_model_folder
    from ctprune.training.loop import Recipe, fit

    model, tok, _ = load_model_folder(model_folder)
    model = _masked(model)
    names = [n for n, _ in model.named_parameters()]
    objects = list(model.parameters())
    train, val = load_split("synthetic", "train"), load_split("synthetic", "val")
    train, val = Parallel(train.src[:16], train.tgt[:16]), Parallel(val.src[:2], val.tgt[:2])
    fit(model, tok, train, val, Recipe(epochs=1, lr=3e-3, warmup_steps=1, max_tokens=256), tmp_path / "ft",
        {"stage": "test"})
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert [n for n, _ in model.named_parameters()] == names
    assert all(a is b for a, b in zip(model.parameters(), objects))
    linear = masked_linears(model)[0]
    assert bool((linear.weight[linear.weight_mask == 0] == 0).all())
    saved, _, _ = load_model_folder(tmp_path / "ft")
    assert f"{NAME}.weight_mask" in saved.state_dict()
