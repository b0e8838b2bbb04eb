"""timm models (random init, tiny inputs) run through collect_kfac: every Conv2d / Linear gets
finite, symmetric, positive semi-definite factors of the right size."""
import pytest
import torch
import torch.nn as nn

import tp_eigendamage as ted


timm = pytest.importorskip("timm")


def check_psd(M, name):
    M = M.double()
    assert torch.isfinite(M).all(), name
    torch.testing.assert_close(M, M.transpose(-1, -2), rtol=1e-5, atol=1e-6 * M.abs().max())
    lam = torch.linalg.eigvalsh(M)
    assert (lam >= -1e-5 * lam.amax(-1, keepdim=True).clamp_min(1e-30)).all(), name


@pytest.mark.parametrize("name, kwargs, size", [
    ("resnet18", {}, 32),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}, 32),
], ids=["resnet18", "vit_tiny"])
def test_timm_model_factors_for_every_layer(name, kwargs, size):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
    for m in model.modules():     # timm zero-inits the last BN of each residual branch: undo
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    data = [torch.randn(2, 3, size, size)]
    stats = ted.collect_kfac(model, data, progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(stats.names()) == set(layers)
    for n, m in layers.items():
        f = stats[m]
        G = getattr(m, "groups", 1)
        d_in = (m.in_channels if isinstance(m, nn.Conv2d) else m.in_features) // G
        d_out = (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features) // G
        assert f.input_blocks.shape == (G, d_in, d_in), n
        assert f.grad_blocks.shape == (G, d_out, d_out), n
        check_psd(f.input_blocks, n)
        check_psd(f.grad_blocks, n)
        assert f.grad_factor.abs().max() > 0, n            # gradients reached every layer
    assert stats.num_examples == 2
