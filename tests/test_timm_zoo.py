"""``prune()`` on a CI-sized cross-section of the timm zoo (benchmarks/timm_sweep.py runs the
full list): random init, two batches of four images, ``target_params=0.6``.

One model per family: plain ResNet, grouped + SE ResNeXt, RegNet (grouped + SE), ConvNeXt
(LayerNorm, layer scale), EfficientNet/MobileNet (depthwise, SE, hard-swish), DenseNet
(concatenation), ViT (attention heads). Where a family's smallest model is slow, the same
architecture is built shallower through timm's own constructor arguments.
"""
import pytest
import timm
import torch

import tp_eigendamage as ted

pytestmark = pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")

ZOO = [  # (timm name, constructor kwargs, input size, method)
    ("resnet18", {}, 32, "eigendamage"),
    ("resnet18", {}, 32, "kron_obd"),
    ("seresnext26d_32x4d", {"layers": (1, 1, 1, 1)}, 32, "kron_obd"),
    ("regnety_002", {}, 32, "eigendamage"),
    ("convnext_atto", {}, 32, "kron_obd"),
    ("mobilenetv3_small_100", {}, 32, "eigendamage"),
    ("densenet121", {"block_config": (2, 2, 2, 2)}, 32, "kron_obd"),
    ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, 32, "eigendamage"),
    ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, 32, "kron_obd"),
]


@pytest.mark.parametrize("name,kwargs,size,method", ZOO,
                         ids=[f"{n}-{m}" for n, _, _, m in ZOO])
def test_prune_timm_model_to_sixty_percent_of_its_parameters(name, kwargs, size, method):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, size, size, generator=g), torch.randint(0, 10, (4,), generator=g))
            for _ in range(2)]
    x = torch.randn(2, 3, size, size, generator=g)
    params0 = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        shape = model(x).shape
    ted.prune(model, data, x, method=method, target_params=0.6, progress=False)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / params0 / 0.6 - 1) <= 0.02, params / params0
    with torch.no_grad():
        out = model(x)
    assert out.shape == shape
    assert torch.isfinite(out).all()
