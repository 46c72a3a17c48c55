"""Pruning masks as a parametrization, and weights files that store them as before.

A masked Linear's weight is ``original * mask`` wherever it is read, so the mask holds through
every optimizer step without a caller re-applying it. A masked Linear carries its 0/1 mask as the
``weight_mask`` buffer (what variant files and model folders store). ``enforce_masks``
parametrizes such Linears for training (block tuning and model finetuning) and
``release_masks`` takes the parametrization off again; ``plain_state_dict`` gives the state dict
in the stored form (``weight`` masked, ``bias``, ``weight_mask``) and ``save_weights`` writes it
(the same bytes for the same weights), so files written from a parametrized module hold what was
written before masks were parametrizations.

Here, not in ``ctprune.pruning``: model folders (``checkpoint.py``) write through
``save_weights``, and ``ctprune.pruning`` imports ``ctprune.model``, not the reverse.
"""

from __future__ import annotations

from collections.abc import Iterable

from safetensors.torch import save_file
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
    Parameter stays the same object, so an optimizer made before or after sees the same tensors
    (but ``module.parameters()`` lists a parametrized weight after its bias: an optimizer's
    parameter order is that of the list it was given)."""
    for linear in masked_linears(module):
        if not parametrize.is_parametrized(linear, "weight"):
            parametrize.register_parametrization(linear, "weight", Mask(linear.weight_mask))
    return module


def release_masks(linears: Iterable[nn.Linear]) -> None:
    """Undo ``enforce_masks`` on ``linears``: each weight becomes a plain Parameter again, the same
    object, holding its masked value (``leave_parametrized=True``), and registered where it was
    (before ``bias``), so ``parameters()`` and ``state_dict()`` list it in the order they did
    before ``enforce_masks``. A Linear that is not parametrized is left alone."""
    for linear in linears:
        if not parametrize.is_parametrized(linear, "weight"):
            continue
        parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
        # remove_parametrizations registers ``weight`` anew, after ``bias``: restore nn.Linear's order
        params = linear._parameters
        order = ["weight", *(k for k in params if k != "weight")]
        reordered = {k: params[k] for k in order}
        params.clear()
        params.update(reordered)


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


def save_weights(module: nn.Module, path: str) -> None:
    """Write ``plain_state_dict(module)`` to the safetensors file ``path``, the same file for the
    same weights: a tensor tied under several names (shared embeddings) is stored once, under the
    first of its names in sorted order (the name ``safetensors.torch.save_model`` keeps and
    ``load_model`` expects). Unlike ``save_model``, no metadata lists the other names:
    safetensors writes metadata in a random order, and a model's fingerprint is its file's SHA-256."""
    stored: dict[str, Tensor] = {}
    seen: set[tuple[str, int, int, tuple[int, ...], tuple[int, ...]]] = set()
    for name, tensor in sorted(plain_state_dict(module).items()):
        view = (str(tensor.device), tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and view in seen:
            continue
        seen.add(view)
        stored[name] = tensor.detach().contiguous()
    save_file(stored, path)
