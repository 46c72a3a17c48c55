"""The fast training ops compute what the PyTorch ops they replace compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ctprune.model.ops import attention, cross_entropy, dropout


def test_dropout_drops_p_and_rescales_the_rest() -> None:
    torch.manual_seed(0)
    x = torch.randn(1000, 1001)  # odd size: the mask is cut from whole 64-bit words
    y = dropout(x, 0.1)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002
    torch.testing.assert_close(y[kept], x[kept] / 0.9)


def test_dropout_is_seeded_and_off_in_eval() -> None:
    x = torch.randn(64, 64)
    torch.manual_seed(3)
    a = dropout(x, 0.3)
    torch.manual_seed(3)
    assert torch.equal(a, dropout(x, 0.3))
    assert not torch.equal(a, dropout(x, 0.3))  # the generator moved on
    assert dropout(x, 0.3, training=False) is x


def test_dropout_gradient_is_the_scaled_mask() -> None:
    x = torch.randn(32, 48, requires_grad=True)
    y = dropout(x, 0.5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() * 2.0)


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_attention_equals_sdpa(causal: bool) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 7, 16) for _ in range(3))
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., 5:] = False
    # p = 1e-9 rounds to a drop probability of 0: the explicit path without dropping anything.
    explicit = attention(q, k, v, mask, causal, dropout_p=1e-9, training=True)
    reference = attention(q, k, v, mask, causal, dropout_p=0.1, training=False)
    torch.testing.assert_close(explicit, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_value_and_gradient_match_pytorch(dtype: torch.dtype, smoothing: float) -> None:
    torch.manual_seed(0)
    logits = (3 * torch.randn(77, 50)).to(dtype)  # 77 rows: the last chunk is partial
    target = torch.randint(1, 50, (77,))
    target[::5] = 0  # ignored rows
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.clone().requires_grad_()
    ours = cross_entropy(ours_in, target, 0, smoothing)
    ref = F.cross_entropy(ref_in.float(), target, ignore_index=0, label_smoothing=smoothing)
    (2 * ours).backward()
    (2 * ref).backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert ours_in.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(ours_in.grad.float(), ref_in.grad.float(), atol=tol, rtol=0.02)
    assert ours_in.grad[::5].abs().max() == 0  # ignored rows get no gradient

