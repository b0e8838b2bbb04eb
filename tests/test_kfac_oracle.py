"""curvlinops' KFAC as an independent oracle for factor_mode='patch'.

curvlinops (``KFACLinearOperator``, ``kfac_approx='expand'``, empirical Fisher) with a
``CrossEntropyLoss(reduction='mean')`` stores

* input covariance  ``Σ_{n,t} a aᵀ / (N_data · T)``  — our ``A`` (mean over sample rows);
* gradient covariance of the MEAN loss rescaled by ``(N_batch)² / N_data``, i.e.
  ``Σ_n Σ_t g gᵀ / N_data`` with ``g = ∂ℓ_n/∂s`` — our ``S``.

So with ``reduction='mean'`` the scale constant between the two libraries is 1 for both
factors; with ``reduction='sum'`` curvlinops' gradient covariance is ``N_data · S``.
"""
import pytest
import torch
import torch.nn as nn

import tp_eigendamage as ted


curvlinops = pytest.importorskip("curvlinops")


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.Tanh(),
        nn.Flatten(), nn.Linear(5 * 4 * 4, 3))


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))


def curvlinops_factors(model, data, reduction, separate):
    params = [p for p in model.parameters() if p.requires_grad]
    op = curvlinops.KFACLinearOperator(
        model, nn.CrossEntropyLoss(reduction=reduction), params, data,
        fisher_type="empirical", kfac_approx="expand", separate_weight_and_bias=separate,
        check_deterministic=False)
    op.compute_kronecker_factors()
    return op._input_covariances, op._gradient_covariances


@pytest.mark.parametrize("make, shape", [(small_cnn, (3, 8, 8)), (mlp, (6,))], ids=["cnn", "mlp"])
def test_patch_factors_match_curvlinops(make, shape):
    torch.manual_seed(0)
    model = make()
    data = [(torch.randn(4, *shape), torch.randint(0, 3, (4,))) for _ in range(3)]
    N = sum(len(y) for _, y in data)
    ours = ted.collect_kfac(model, data, fisher_type="empirical", factor_mode="patch", progress=False)
    names = ours.names()
    a_mean, g_mean = curvlinops_factors(model, data, "mean", separate=True)
    _, g_sum = curvlinops_factors(model, data, "sum", separate=True)
    a_hom, _ = curvlinops_factors(model, data, "mean", separate=False)
    assert set(g_mean) == set(names)
    for name, module in names.items():
        f = ours[module]
        torch.testing.assert_close(f.input_factor, a_mean[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(f.grad_factor, g_mean[name], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(N * f.grad_factor, g_sum[name], rtol=1e-4, atol=1e-7)
        # [W | b] as one matrix: curvlinops appends the 1 when bias is not separate
        expected = f.homogeneous_input_factor() if f.has_bias else f.input_factor
        torch.testing.assert_close(expected, a_hom[name], rtol=1e-4, atol=1e-6)
