"""EK-FAC refit of the Fisher diagonal in the KFE (docs/method.md §5)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from tp_eigendamage import collect_kfac
from tp_eigendamage import KFEError, fit_eigen_correction, kfe_blocks, to_kfe


def kfe_model(model, data):
    stats = collect_kfac(model, data, fisher_type="empirical", progress=False)
    to_kfe(model, stats, include_classifier=True)
    return stats


@pytest.mark.parametrize("layer,x", [
    (nn.Linear(6, 4), torch.randn(1, 6)),
    (nn.Conv2d(3, 4, 3), torch.randn(1, 3, 3, 3)),  # one output location, K = 9 kernel offsets
], ids=["linear", "conv-one-location"])
def test_refit_equals_kfac_eigenvalues_where_kfac_is_exact(layer, x):
    """One example and one output location: K-FAC is exact, so the refit is λ_S,i λ_A,j."""
    torch.manual_seed(0)
    model = nn.Sequential(layer, nn.Flatten()).eval()
    data = [(x, torch.tensor([2]))]
    stats = kfe_model(model, data)
    lam_a = torch.linalg.eigvalsh(stats[layer].input_factor.double())
    lam_s = torch.linalg.eigvalsh(stats[layer].grad_factor.double())
    refit = fit_eigen_correction(model, data, fisher_type="empirical", progress=False)["0"]
    expected = torch.outer(lam_s, lam_a)
    assert torch.allclose(refit.double(), expected, atol=1e-5 * expected.max().item())
    assert model[0].eigen_corrected


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.tok = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        t = torch.relu(self.tok(x.flatten(2).transpose(1, 2)))  # (N, T, D) tokens
        return self.fc(t.mean(1))


def brute_force_fisher_diag(model, batches, labels_of):
    """Per core, one example at a time: ``E_n[(1/K) Σ_k (∂ℓ_n/∂W*)²]`` and the quadratic forms
    along removing each input / output direction, ``E_n[(∂ℓ_n/∂W* · W*_{:,j,:})²]`` and
    ``E_n[(∂ℓ_n/∂W* · W*_{i,:,:})²]`` (``∂ℓ_n/∂W*`` restricted to that column / row)."""
    cores = {n: b.core for n, b in kfe_blocks(model)}
    sums = {n: [0.0, 0.0, 0.0] for n in cores}
    count = 0
    for x, y in batches:
        for i in range(x.shape[0]):
            out = model(x[i:i + 1])
            loss = F.cross_entropy(out, labels_of(out, y[i:i + 1]))
            grads = torch.autograd.grad(loss, [c.weight for c in cores.values()])
            for n, g in zip(cores, grads):
                g = g.double().reshape(g.shape[0], g.shape[1], -1)
                w = cores[n].weight.detach().double().reshape(g.shape)
                for slot, value in enumerate((g.pow(2).mean(-1), (g * w).sum((0, 2)).pow(2),
                                              (g * w).sum((1, 2)).pow(2))):
                    sums[n][slot] = sums[n][slot] + value
            count += 1
    return {n: [t / count for t in s] for n, s in sums.items()}


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_refit_equals_brute_force_per_example_gradients(fisher_type):
    torch.manual_seed(0)
    model = Net().eval()
    batches = [(torch.randn(3, 3, 8, 8), torch.randint(0, 5, (3,))) for _ in range(2)]
    kfe_model(model, batches)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=batches[0][0])
    DG.get_pruning_group(model.conv2.core, tp.prune_conv_in_channels, idxs=[1, 4]).prune()
    DG.get_pruning_group(model.conv2.core, tp.prune_conv_out_channels, idxs=[0]).prune()
    model.train()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    # the true Fisher with a deterministic "sampler" so the reference sees the same labels
    kw = dict(fisher_type="true", sample_fn=lambda out: out.argmax(1)) if fisher_type == "true" \
        else dict(fisher_type="empirical")
    refit = fit_eigen_correction(model, batches, progress=False, **kw)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())

    model.eval()
    labels_of = (lambda out, y: out.argmax(1)) if fisher_type == "true" else (lambda out, y: y)
    expected = brute_force_fisher_diag(model, batches, labels_of)
    assert set(refit) == set(expected) == {"conv1", "conv2", "tok", "fc"}
    for n, (F_ref, in_ref, out_ref) in expected.items():
        block = getattr(model, n)
        assert refit[n] is block.fisher_diag and block.fisher_diag.shape == F_ref.shape
        assert torch.allclose(refit[n].double(), F_ref, rtol=1e-4, atol=1e-6 * F_ref.max().item()), n
        for got, ref in ((block.removal_fisher_in, in_ref), (block.removal_fisher_out, out_ref)):
            assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-6 * ref.max().item()), n
    # the pruned block's buffers now describe exactly its surviving directions
    block = model.conv2
    assert block.fisher_diag.shape == (7, 4) and block.eigen_in.shape == (4,)
    assert block.basis_in.shape == (6, 4) and block.basis_out.shape == (8, 7)
    assert [t.tolist() for t in block.surviving_directions()] == [list(range(4)), list(range(7))]


def test_model_without_kfe_blocks_is_rejected():
    model = Net().eval()
    with pytest.raises(KFEError, match="to_kfe"):
        fit_eigen_correction(model, [(torch.randn(2, 3, 8, 8), None)], progress=False)
