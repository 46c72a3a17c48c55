"""Pruning masks as a parametrization: a masked Linear's weight is ``original * mask`` wherever it
is read, so the mask holds through every optimizer step without a caller re-applying it.

A masked Linear carries its 0/1 mask as the ``weight_mask`` buffer (what variant files and model
folders store). ``enforce_masks`` parametrizes such Linears for training; ``plain_state_dict``
gives the state dict in the stored form (``weight`` masked, ``bias``, ``weight_mask``), so files
written from a parametrized module are the files written before masks were parametrizations.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils import parametrize


class Mask(nn.Module):
    """The parametrization ``weight -> weight * mask``: the gradient of a removed weight is 0, and
    its value reads as 0 whatever an optimizer did to the stored original."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        # not persistent: the Linear's own ``weight_mask`` buffer is the stored copy
        self.register_buffer("mask", mask.detach().clone(), persistent=False)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask


def masked_linears(module: nn.Module) -> list[nn.Linear]:
    """The Linears of ``module`` (itself included) that carry a ``weight_mask``."""
    return [m for m in module.modules() if isinstance(m, nn.Linear) and hasattr(m, "weight_mask")]


def enforce_masks(module: nn.Module) -> nn.Module:
    """Parametrize every masked Linear of ``module`` in place (once) and return it. The weight
    Parameter stays the same object, so an optimizer made before or after sees the same tensors."""
    for linear in masked_linears(module):
        if not parametrize.is_parametrized(linear, "weight"):
            parametrize.register_parametrization(linear, "weight", Mask(linear.weight_mask))
    return module


def plain_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` with every parametrized tensor under its own name at its computed
    value (a masked weight as ``weight``), as if no parametrization were registered."""
    state = module.state_dict()
    for prefix, sub in module.named_modules():
        if not parametrize.is_parametrized(sub):
            continue
        dot = f"{prefix}." if prefix else ""
        for name in sub.parametrizations:  # type: ignore[union-attr]
            inner = f"{dot}parametrizations.{name}."
            state = {k: v for k, v in state.items() if not k.startswith(inner)}
            state[f"{dot}{name}"] = getattr(sub, name)
    return state
