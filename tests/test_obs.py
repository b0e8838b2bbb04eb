"""Kron-OBS: joint damage and weight compensation (docs/method.md §8)."""
import dataclasses

import pytest
import torch
import torch.nn as nn

from tp_eigendamage.testing import mean_loss, trained_digits_net
from tp_eigendamage import StaleStatisticsError, collect_kfac
from tp_eigendamage import obs_compensation, obs_damage



def regression_problem(seed=0, n=64, d_in=6, d_out=3):
    """Correlated inputs, a Linear layer at its least-squares optimum, and K-FAC factors that are
    exact for ℓ_n = ½‖W a_n − y_n‖²: A = mean a aᵀ (collected), S = I (∂²ℓ/∂s² = I)."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64)
    a = torch.randn(n, d_in, **kw) @ torch.randn(d_in, d_in, **kw)
    y = a @ torch.randn(d_in, d_out, **kw) + 0.3 * torch.randn(n, d_out, **kw)
    layer = nn.Linear(d_in, d_out, bias=False, dtype=torch.float64)    # float64: gradient 0 at W0
    with torch.no_grad():
        layer.weight.copy_(torch.linalg.lstsq(a, y).solution.T)
    stats = collect_kfac(layer, [(a, y)], fisher_type="empirical", progress=False,
                         loss_fn=lambda out, t: 0.5 * (out - t).pow(2).sum(1))
    f = stats[layer]
    exact = dataclasses.replace(f, grad_sum=f.num_examples * torch.eye(d_out)[None])
    return layer, a, y, exact


def quadratic_loss(W, a, y):
    return 0.5 * (a.double() @ W.double().T - y.double()).pow(2).sum(1).mean().item()


@pytest.mark.parametrize("removed", [[2], [1, 4], [0, 3, 5]])
def test_obs_is_exact_for_a_quadratic_loss(removed):
    layer, a, y, factors = regression_problem()
    W0 = layer.weight.detach().clone()
    predicted = obs_damage(layer, factors, removed, damping=0.0)
    delta = obs_compensation(layer, factors, removed, damping=0.0)
    W1 = layer.weight.detach()
    torch.testing.assert_close(W1, W0 + delta)
    assert torch.all(W1[:, removed] == 0)
    increase = quadratic_loss(W1, a, y) - quadratic_loss(W0, a, y)
    assert increase == pytest.approx(predicted, rel=1e-4)

    keep = [j for j in range(a.shape[1]) if j not in removed]      # brute-force optimum
    best = torch.linalg.lstsq(a[:, keep].double(), y.double()).solution.T
    torch.testing.assert_close(W1[:, keep].double(), best, rtol=1e-4, atol=1e-4)


def test_obs_damping_and_no_apply():
    """γ > 0: the formulas with the damped inverse (A + γ·mean(diag A)·I)⁻¹, written out here."""
    layer, a, y, factors = regression_problem(seed=1)
    W0 = layer.weight.detach().clone().double()
    gamma, P = 0.1, [1, 4]
    A = factors.input_factor.double()
    A_inv = torch.linalg.inv(A + gamma * A.diagonal().mean() * torch.eye(len(A), dtype=A.dtype))
    M = torch.linalg.inv(A_inv[P][:, P])
    expect_damage = 0.5 * torch.trace(W0[:, P].T @ W0[:, P] @ M)          # S = I
    expect_delta = -W0[:, P] @ M @ A_inv[P]
    delta = obs_compensation(layer, factors, P, damping=gamma, apply=False)
    assert torch.equal(layer.weight.detach().double(), W0)                  # apply=False: untouched
    torch.testing.assert_close(delta.double(), expect_delta, rtol=1e-4, atol=1e-6)
    assert obs_damage(layer, factors, P, damping=gamma) == pytest.approx(expect_damage.item(), rel=1e-4)


def test_obs_compensation_lowers_the_measured_loss_increase():
    """Removing a quarter of a trained conv's input channels: the compensated weights lose less
    than plain removal, for every one of several random channel sets."""
    torch.manual_seed(0)
    model, batches = trained_digits_net()
    stats = collect_kfac(model, batches, progress=False)
    base = mean_loss(model, batches)
    conv = model.c3
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        removed = torch.randperm(conv.in_channels, generator=gen)[: conv.in_channels // 4].tolist()
        saved = conv.weight.detach().clone()
        with torch.no_grad():
            conv.weight[:, removed] = 0
        plain = mean_loss(model, batches) - base
        with torch.no_grad():
            conv.weight.copy_(saved)
        obs_compensation(conv, stats[conv], removed)
        compensated = mean_loss(model, batches) - base
        with torch.no_grad():
            conv.weight.copy_(saved)
        assert compensated < 0.8 * plain, (compensated, plain)


def test_obs_bad_arguments():
    layer, a, y, factors = regression_problem()
    with pytest.raises(ValueError, match="removed_in_idxs"):
        obs_damage(layer, factors, [6])
    with pytest.raises(ValueError, match="removed_in_idxs"):
        obs_compensation(layer, factors, [])
    with pytest.raises(TypeError, match="Conv2d or nn.Linear"):
        obs_damage(nn.BatchNorm1d(6), factors, [0])
    with torch.no_grad():
        layer.weight = nn.Parameter(layer.weight[:, :5].clone())
    with pytest.raises(StaleStatisticsError):
        obs_compensation(layer, factors, [0])
