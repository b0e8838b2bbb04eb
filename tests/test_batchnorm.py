"""recalibrate_batchnorm and prune(recalibrate_bn=...) against statistics computed here."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import tp_eigendamage as ted
from tp_eigendamage import InvalidArgumentError, PruneArgumentError


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm2d(5, momentum=0.3)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.drop(self.conv(x)))).mean((2, 3)))


def batches(n=3, bs=6, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, size, size, generator=g) * 2 + 1, torch.randint(0, 3, (bs,), generator=g))
            for _ in range(n)]


def reference_stats(conv, data):
    """Average over batches of the per-batch mean and unbiased variance of the conv's output
    (what the BatchNorm reads with dropout off)."""
    means, variances = [], []
    with torch.no_grad():
        for x, _ in data:
            out = conv(x).transpose(0, 1).reshape(conv.out_channels, -1)
            means.append(out.mean(1))
            variances.append(out.var(1, unbiased=True))
    return torch.stack(means).mean(0), torch.stack(variances).mean(0)


def test_running_statistics_are_the_average_over_the_batches():
    torch.manual_seed(0)
    model = ConvBN()
    model.train()
    model.head.eval()                                  # a mixed-mode tree
    data = batches()
    assert ted.recalibrate_batchnorm(model, data) == 1
    mean, var = reference_stats(model.conv, data)
    torch.testing.assert_close(model.bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn.running_var, var, rtol=1e-5, atol=1e-6)   # dropout was off
    assert int(model.bn.num_batches_tracked) == len(data)
    assert model.bn.momentum == 0.3
    assert model.training and model.bn.training and model.drop.training and not model.head.training


def test_num_batches_reads_only_that_many():
    torch.manual_seed(0)
    model = ConvBN().eval()
    data = batches(n=4)
    ted.recalibrate_batchnorm(model, data, num_batches=2)
    mean, _ = reference_stats(model.conv, data[:2])
    torch.testing.assert_close(model.bn.running_mean, mean, rtol=1e-5, atol=1e-6)


def test_errors_leave_the_statistics_as_they_were():
    torch.manual_seed(0)
    model = ConvBN().eval()
    ted.recalibrate_batchnorm(model, batches())
    before = {k: v.clone() for k, v in model.bn.state_dict().items()}
    with pytest.raises(InvalidArgumentError, match="no batches"):
        ted.recalibrate_batchnorm(model, [])
    bad = batches(n=2) + [(torch.randn(2, 4, 6, 6), None)]          # wrong channel count in batch 2
    with pytest.raises(RuntimeError):
        ted.recalibrate_batchnorm(model, bad)
    for k, v in model.bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.bn.momentum == 0.3 and not model.training
    with pytest.raises(InvalidArgumentError, match="single tensor"):
        ted.recalibrate_batchnorm(model, torch.randn(2, 3, 6, 6))


def test_a_model_without_batchnorm_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert ted.recalibrate_batchnorm(model, None) == 0


def _stem_reference(model, data):
    """Running mean / var of timm resnet18's ``bn1``, which reads ``conv1`` of the raw input."""
    return reference_stats(model.conv1, data)


def test_prune_recalibrates_every_round_by_default():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=3).eval()
    data = [(x.repeat(1, 1, 3, 3), y) for x, y in batches(n=2, bs=4, size=8)]   # 24 px
    original = {k: v.clone() for k, v in model.state_dict().items()}
    kept, _ = ted.prune(model, data, data[0][0][:1], target_flops=0.6, method="kron_obd", progress=False)
    mean, var = _stem_reference(kept, data)
    torch.testing.assert_close(kept.bn1.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kept.bn1.running_var, var, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(original["bn1.running_mean"][: mean.numel()], mean)
    assert not kept.training


def test_prune_without_recalibration_keeps_the_statistics_of_kept_channels():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=3).eval()
    data = [(x.repeat(1, 1, 3, 3), y) for x, y in batches(n=2, bs=4, size=8)]
    bn_stats = {n: (m.running_mean.clone(), m.running_var.clone())
                for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    kept, _ = ted.prune(model, data, data[0][0][:1], target_flops=0.6, method="kron_obd",
                        recalibrate_bn=False, progress=False)
    for name, m in kept.named_modules():
        if isinstance(m, nn.BatchNorm2d) and name in bn_stats:
            mean, var = bn_stats[name]
            # every kept value is one of the original values (sliced, not re-estimated)
            assert torch.isin(m.running_mean, mean).all() and torch.isin(m.running_var, var).all(), name


def test_prune_with_a_used_up_iterator_warns():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=3).eval()
    data = [(x.repeat(1, 1, 3, 3), y) for x, y in batches(n=2, bs=4, size=8)]
    with pytest.warns(UserWarning, match="one-shot iterator.*recalibrate_bn=False"):
        ted.prune(model, iter(data), data[0][0][:1], target_flops=0.6, method="kron_obd", progress=False)


def test_prune_rejects_a_non_boolean_flag():
    model = ConvBN()
    with pytest.raises(PruneArgumentError, match="recalibrate_bn='yes'"):
        ted.prune(model, batches(), batches()[0][0][:1], target_params=0.5, recalibrate_bn="yes")


def test_prune_without_data_skips_the_recalibration():
    """Criteria without statistics take data=None; the BatchNorm statistics then stay."""
    torch.manual_seed(0)
    model = ConvBN().eval()
    ted.recalibrate_batchnorm(model, batches())
    before = model.bn.running_mean.clone()
    ted.prune(model, None, batches()[0][0][:1], pruning_ratio=0.4, method="magnitude",
              ignored_layers=[model.head], progress=False)
    assert model.bn.running_mean.numel() < before.numel()
    assert torch.isin(model.bn.running_mean, before).all()


def test_prune_with_one_example_batches_warns_and_keeps_the_statistics():
    """Train-mode BatchNorm cannot average one value per channel: prune() still succeeds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    before = model[1].running_var.clone()
    data = [(torch.randn(1, 6), torch.tensor([1])) for _ in range(3)]
    with pytest.warns(UserWarning, match="not re-estimated.*at least 2 examples"):
        ted.prune(model, data, data[0][0], pruning_ratio=0.4, method="kron_obd", progress=False)
    assert model[1].running_var.numel() < before.numel()
    assert torch.isin(model[1].running_var, before).all()
