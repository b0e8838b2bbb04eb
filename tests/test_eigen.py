"""Eigendecompositions of K-FAC factors: both precisions against float64 LAPACK, the
scheduling, and the damages the float32 policy gives against the float64 reference."""
import pytest
import torch
import torch.nn as nn

import tp_eigendamage as ted
from tp_eigendamage.eigen import CLAMP, clamped_eigh, eigendecompose
from tp_eigendamage.testing import trained_digits_net


def psd(n, decades=6, seed=0, batch=()):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(*batch, n, 3 * n, generator=g, dtype=torch.float64)
    X = X * torch.logspace(0, -decades / 2, n, dtype=torch.float64)[:, None]
    return X @ X.transpose(-1, -2) / (3 * n)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_decompositions_reconstruct_the_matrix_and_match_lapack(precision):
    for n, batch in ((5, ()), (64, ()), (33, (3,))):
        M = psd(n, batch=batch)
        lam, Q = clamped_eigh(M, precision)
        ref = torch.linalg.eigvalsh(M)
        lam_max = ref.amax(dim=-1, keepdim=True)
        tol = 1e-12 if precision == "float64" else 1e-5
        assert ((lam - torch.where(ref > CLAMP * lam_max, ref, torch.zeros_like(ref))).abs() <= tol * lam_max).all()
        eye = torch.eye(n, dtype=torch.float64)
        assert (Q.transpose(-1, -2) @ Q - eye).abs().max() < 1e-12      # orthonormal in float64
        assert ((Q * lam.unsqueeze(-2)) @ Q.transpose(-1, -2) - M).norm() / M.norm() < tol * 10


def test_float32_that_cannot_hold_the_matrix_falls_back_to_float64():
    M = psd(16) * 1e40                                     # beyond float32's range
    lam, Q = clamped_eigh(M, "float32")
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(M).clamp_min(0), rtol=1e-9, atol=1e-9 * lam.max().item())


@pytest.mark.parametrize("threads", [1, 2])
def test_scheduled_decompositions_equal_one_by_one_in_input_order(threads):
    matrices = [psd(n, seed=n) for n in (40, 3, 17, 40, 9)] + [psd(6, batch=(2,))]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        scheduled = eigendecompose(matrices)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    for M, (lam, Q) in zip(matrices, scheduled):
        ref_lam, ref_Q = clamped_eigh(M)
        torch.testing.assert_close(lam, ref_lam, rtol=0, atol=1e-12)
        torch.testing.assert_close(Q.abs(), ref_Q.abs(), rtol=0, atol=1e-9)


def _eigen_damages(precision):
    model, batches = trained_digits_net(30, 0)
    stats = ted.collect_kfac(model, batches, fisher_type="empirical", progress=False)
    stats.eigendecompose(list(stats), precision)
    ted.to_kfe(model, stats)
    out = {}
    for name, block in ted.kfe_blocks(model):
        core = block.core.weight.detach().double()
        per_weight = 0.5 * core.square().flatten(2).sum(-1) * block.fisher_diag.double()
        out[name] = torch.cat([per_weight.sum(0), per_weight.sum(1)])
    return model, batches, out


def test_float32_policy_damages_match_the_float64_reference():
    """Stated tolerance: every eigen-direction damage within 1e-4 of the largest damage of its
    layer, and the KFE model's outputs within 1e-5 relative of the unrewritten model."""
    model64, batches, reference = _eigen_damages("float64")
    model32, _, damages = _eigen_damages("float32")
    for name, ref in reference.items():
        assert (damages[name] - ref).abs().max() <= 1e-4 * ref.max()
    original, _ = trained_digits_net(30, 0)
    x = batches[0][0]
    with torch.no_grad():
        y = original(x)
        assert ((model32(x) - y).norm() / y.norm()) < 1e-5


def test_prune_decomposes_each_factor_once_per_round():
    """Counted by torch's profiler (the suite runs on one thread, so eigh runs on this thread)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    data = [(torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,)))]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ted.prune(model, data, data[0][0][:1], target_params=0.6, iterative_steps=2, tolerance=0.1,
                  progress=False)
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::linalg_eigh")
    rewritten = 2                                         # the two convs (the Linear is the head)
    assert calls == 2 * rewritten * 2                     # A and S, per layer, per round
