"""collect_kfac leaves the model exactly as found (also after errors) and rejects bad input."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tp_eigendamage as ted
from tp_eigendamage import KFACError



class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)
        self.frozen = nn.Linear(3, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        h = self.drop(F.relu(self.bn(self.conv(x))))
        return self.frozen(self.fc(h.mean((2, 3))))


def make_model():
    torch.manual_seed(0)
    model = Net()
    model.train()
    model.fc.eval()                       # a mixed-mode tree
    model.frozen.requires_grad_(False)
    model.conv.weight.grad = torch.full_like(model.conv.weight, 0.5)   # an existing .grad
    with torch.no_grad():
        model.bn.running_mean.fill_(0.3)
        model.bn.num_batches_tracked.fill_(7)
    return model


def snapshot(model):
    return {
        "modes": {n: m.training for n, m in model.named_modules()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {n: None if p.grad is None else (p.grad, p.grad.clone())
                  for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                      len(getattr(m, "_backward_pre_hooks", {})))
                  for n, m in model.named_modules()},
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["modes"] == before["modes"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["hooks"] == before["hooks"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    for n, g in before["grads"].items():
        p = dict(model.named_parameters())[n]
        if g is None:
            assert p.grad is None, n
        else:
            assert p.grad is g[0] and torch.equal(p.grad, g[1]), n


def batches(n=2, bs=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(bs, 3, 6, 6, generator=g), torch.randint(0, 3, (bs,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("fisher_type", ["true", "empirical"])
def test_model_state_restored_after_normal_pass(fisher_type):
    model = make_model()
    before = snapshot(model)
    stats = ted.collect_kfac(model, batches(), fisher_type=fisher_type, progress=False)
    assert_unchanged(model, before)
    assert set(stats) == {model.conv, model.fc, model.frozen}   # unused never ran
    # statistics were taken in eval mode: BN used its running stats, dropout was off
    ref = make_model().eval()
    x = torch.cat([b[0] for b in batches()])
    rows = F.relu(ref.bn(ref.conv(x))).mean((2, 3)).detach().double()
    torch.testing.assert_close(stats[model.fc].input_factor.double(), rows.T @ rows / len(rows),
                               rtol=1e-5, atol=1e-7)


class RaisingData:
    def __init__(self, fail_at):
        self.fail_at = fail_at

    def __iter__(self):
        for i, b in enumerate(batches(3)):
            if i == self.fail_at:
                raise RuntimeError("data source broke")
            yield b


def test_model_state_restored_when_data_raises_mid_pass():
    model = make_model()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="data source broke"):
        ted.collect_kfac(model, RaisingData(1), progress=False)
    assert_unchanged(model, before)


def test_model_state_restored_when_loss_fn_raises():
    model = make_model()
    before = snapshot(model)
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        if len(calls) == 2:
            raise ArithmeticError("loss exploded")
        return F.cross_entropy(out, y, reduction="none")

    with pytest.raises(ArithmeticError, match="loss exploded"):
        ted.collect_kfac(model, batches(3), loss_fn=loss_fn, fisher_type="empirical", progress=False)
    assert_unchanged(model, before)


def expect_error(match, model=None, data=None, exc=KFACError, **kw):
    model = model or make_model()
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        ted.collect_kfac(model, batches() if data is None else data, progress=False, **kw)
    assert_unchanged(model, before)


def test_empty_data():
    expect_error("no batches", data=[])


def test_batch_the_model_cannot_consume():
    expect_error(r"could not consume batch 0.*batch_fn=/forward_fn=",
                 data=[(torch.randn(2, 5, 6, 6), torch.zeros(2, dtype=torch.long))])


def test_model_without_conv_or_linear():
    expect_error("no nn.Conv2d or nn.Linear", model=nn.Sequential(nn.ReLU(), nn.Flatten()))


def test_module_in_modules_that_never_runs():
    model = make_model()
    expect_error(r"never ran in forward: \['unused'\]", model=model, modules=[model.fc, model.unused])


def test_modules_outside_the_model_or_unsupported():
    model = make_model()
    expect_error("not a submodule", model=model, modules=[nn.Linear(2, 2)])
    expect_error("only nn.Conv2d and nn.Linear", model=model, modules=[model.bn])
    expect_error("modules= is empty", model=model, modules=[])


def test_non_finite_activation_names_the_layer():
    model = make_model()
    data = batches()
    data[1][0][0, 0, 0, 0] = float("nan")
    expect_error(r"non-finite input activations at layer 'conv' in batch 1", model=model, data=data)


def test_non_finite_gradient_names_the_layer():
    model = make_model()

    def loss_fn(out, y):      # finite losses (~1e30), but g gᵀ ~ 1e60 overflows float32
        return F.cross_entropy(out, y, reduction="none") * 1e30

    expect_error(r"non-finite output gradients at layer '(frozen|fc|conv)' in batch 0", model=model,
                 loss_fn=loss_fn, fisher_type="empirical")


def test_huge_but_finite_sums_are_not_reported():
    """The NaN/Inf check adds each running sum up in float32; entries near float32's maximum
    make that total overflow although every entry is finite: no error, and the factor matches
    a float64 reference."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.full((8, 4), 6e18)               # Σ x xᵀ entries 2.9e38 < 3.4e38
    stats = ted.collect_kfac(model, [(x, torch.zeros(8, dtype=torch.long))], progress=False,
                             fisher_type="empirical")
    reference = x.double().T @ x.double() / 8
    assert torch.isfinite(stats[model].input_factor).all()
    assert torch.allclose(stats[model].input_factor.double(), reference, rtol=1e-5)
    assert float(stats[model].input_factor.sum()) == float("inf")   # the float32 total overflows


def test_outputs_that_are_not_logits_with_true_fisher():
    model = nn.Sequential(nn.Flatten(), nn.Linear(108, 1))
    expect_error(r"shape \(4, 1\).*sample_fn=.*loss_fn=", model=model, exc=ValueError)


def test_loss_fn_returning_the_batch_mean():
    expect_error(r"one loss per example, shape \(N,\), got \(\).*reduction='none'",
                 loss_fn=lambda out, y: F.cross_entropy(out, y), fisher_type="empirical")


def test_loss_fn_returning_wrong_length():
    expect_error(r"one loss per example", fisher_type="empirical",
                 loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none")[:1])


def test_empirical_fisher_without_targets():
    expect_error("needs targets", data=[torch.randn(2, 3, 6, 6)], fisher_type="empirical")


@pytest.mark.parametrize("kw, match", [
    ({"fisher_type": "exact"}, "fisher_type='exact'; choose one of"),
    ({"factor_mode": "kron"}, "factor_mode='kron'; choose one of"),
    ({"num_batches": 0}, "num_batches=0; pass a positive integer"),
    ({"num_batches": 1.5}, "num_batches=1.5; pass a positive integer"),
    ({"fisher_type": "empirical", "sample_fn": ted.sample_gaussian}, "sample_fn= only applies"),
])
def test_bad_arguments(kw, match):
    expect_error(match, **kw)


def test_num_batches_limits_the_pass():
    model = make_model()
    data = batches(3)
    one = ted.collect_kfac(model, data, num_batches=1, fisher_type="empirical", progress=False)
    ref = ted.collect_kfac(model, data[:1], fisher_type="empirical", progress=False)
    assert one.num_examples == 4
    torch.testing.assert_close(one[model.fc].grad_factor, ref[model.fc].grad_factor)


def test_stale_statistics_after_shape_change():
    model = make_model()
    stats = ted.collect_kfac(model, batches(), progress=False)
    model.fc.weight = nn.Parameter(torch.randn(2, 4))
    with pytest.raises(ted.StaleStatisticsError, match="collect_kfac again"):
        stats[model.fc]
    with pytest.raises(KeyError, match="not covered by collect_kfac"):
        stats[model.unused]
