"""One DP-SGD step of the device's own DP path (``client.dp.private_training``), checked exactly.

A linear model ``f(x) = w·x`` with loss ``mean_i f(x_i)`` has the per-sample gradient
``x_i``: the clipped sum and the noise the step adds can be predicted to the last digit.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.dp import DPSGDSettings, plan_dp_sgd, private_training


def _make_run(x: torch.Tensor, *, batch_size: int, sigma: float, clip: float, seed: int = 0):
    model = nn.Linear(x.shape[1], 1, bias=False)
    nn.init.zeros_(model.weight)
    plan = plan_dp_sgd(len(x), batch_size=batch_size, local_epochs=1)
    settings = DPSGDSettings(plan=plan, noise_multiplier=sigma, max_grad_norm=clip)
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return model, plan, private_training(model, optimizer, loader, settings=settings, seed=seed)


def _one_step(wrapped: nn.Module, optimizer, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """(the batch, the privatised gradient) of the first non-empty Poisson batch."""
    for xb, _ in loader:
        if len(xb) == 0:
            continue
        optimizer.zero_grad(set_to_none=True)
        wrapped(xb).mean().backward()
        assert optimizer.pre_step()
        return xb, optimizer.original_optimizer.param_groups[0]["params"][0].grad.detach().clone()
    raise AssertionError("every Poisson batch was empty")


def test_each_per_sample_gradient_is_clipped_to_the_norm() -> None:
    """Without noise the step is Σ_i clip(x_i, C) / E[B]: large samples count C, small ones as they are."""
    torch.manual_seed(0)
    x = torch.randn(40, 8)
    x[:20] *= 10.0 / x[:20].norm(dim=1, keepdim=True)  # norm 10: clipped to C
    x[20:] *= 0.3 / x[20:].norm(dim=1, keepdim=True)  # norm 0.3: under C, untouched
    clip = 1.0
    _, plan, ctx = _make_run(x, batch_size=10, sigma=0.0, clip=clip)
    with ctx as (wrapped, optimizer, loader):
        xb, grad = _one_step(wrapped, optimizer, loader)
    factor = torch.clamp(clip / xb.norm(dim=1, keepdim=True), max=1.0)  # (B, 1)
    expected = (xb * factor).sum(0, keepdim=True) / plan.expected_batch_size  # (1, d)
    assert torch.allclose(grad, expected, atol=1e-6)
    assert not torch.allclose(grad, xb.sum(0, keepdim=True) / plan.expected_batch_size, atol=1e-3)


@pytest.mark.parametrize(("sigma", "clip"), [(2.0, 0.5), (0.7, 3.0)])
def test_noise_has_standard_deviation_sigma_c_over_expected_batch(sigma: float, clip: float) -> None:
    """With zero per-sample gradients the step is pure noise of std σ·C/E[B] per coordinate."""
    d = 20_000
    x = torch.zeros(30, d)
    _, plan, ctx = _make_run(x, batch_size=10, sigma=sigma, clip=clip, seed=3)
    with ctx as (wrapped, optimizer, loader):
        _, grad = _one_step(wrapped, optimizer, loader)
    expected = sigma * clip / plan.expected_batch_size
    # The sample std of 20,000 draws is within 3% of the truth with overwhelming probability.
    assert float(grad.std()) == pytest.approx(expected, rel=0.03)
    assert abs(float(grad.mean())) < 4 * expected / math.sqrt(d)


def test_sampling_rate_is_the_accounted_one() -> None:
    """Poisson batches have mean size q·n with q = 1/ceil(n/B), the q the ledger records."""
    n, batch = 50, 8
    plan = plan_dp_sgd(n, batch_size=batch, local_epochs=1)
    assert plan.sample_rate == pytest.approx(1 / math.ceil(n / batch))
    x = torch.zeros(n, 2)
    sizes = []
    for seed in range(60):
        _, _, ctx = _make_run(x, batch_size=batch, sigma=1.0, clip=1.0, seed=seed)
        with ctx as (_, _, loader):
            sizes.extend(len(xb) for xb, _ in loader)
    mean = sum(sizes) / len(sizes)
    # 60 × 7 batches of Binomial(50, 1/7): the mean is within 0.5 of 50/7 ≈ 7.14 (> 4 std errors).
    assert mean == pytest.approx(n * plan.sample_rate, abs=0.5)
