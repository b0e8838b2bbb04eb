"""The two network families of benchmarks/paper_protocol.py: the paper's depths, and
``prune()`` removes channels of their coupled groups (residual adds) consistently."""
import os
import sys

import pytest
import torch
import torch.nn as nn

from tp_eigendamage import prune

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import paper_protocol  # noqa: E402


def test_vgg19_has_16_convs_in_5_stages():
    model = paper_protocol.build_model("vgg19", 10, width=0.125)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8] * 2 + [16] * 2 + [32] * 4 + [64] * 8
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert model.features(torch.zeros(1, 3, 32, 32)).shape == (1, 64, 2, 2)


def test_resnet32_has_3_stages_of_5_basic_blocks_with_projection_shortcuts():
    model = paper_protocol.build_model("resnet32", 10, width=0.5)
    blocks = [m for m in model.modules() if isinstance(m, paper_protocol.BasicBlock)]
    assert len(blocks) == 15
    assert [b.conv2.out_channels for b in blocks] == [8] * 5 + [16] * 5 + [32] * 5
    projections = [i for i, b in enumerate(blocks) if not isinstance(b.shortcut, nn.Identity)]
    assert projections == [5, 10]  # the first block of stages 2 and 3 (stride 2, wider)
    # 1 stem + 30 block convs + the classifier: the 32 weighted layers of ResNet-32
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) - len(projections) == 32
    assert model.stages(model.stem(torch.zeros(1, 3, 32, 32))).shape == (1, 32, 8, 8)


@pytest.mark.parametrize("family,width,method", [("vgg19", 0.125, "kron_obd"), ("resnet32", 0.5, "eigendamage")])
def test_prune_reaches_the_target_and_keeps_coupled_channels_consistent(family, width, method):
    torch.manual_seed(0)
    model = paper_protocol.build_model(family, 10, width=width).eval()
    data = [(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))]
    example = data[0][0][:1]
    before = paper_protocol.cost(model, example)
    # local pruning: every group, residual streams included, loses the same share of channels
    prune(model, data, example, method=method, target_params=0.4, ignored_layers=[model.classifier],
          global_pruning=False, progress=False)
    after = paper_protocol.cost(model, example)
    assert after["params"] / before["params"] == pytest.approx(0.4, rel=0.02)
    assert model(data[0][0]).shape == (16, 10)
    assert model.classifier.out_features == 10
    if family == "resnet32":
        # each stage's residual stream: one width shared by all 5 blocks' outputs
        blocks = [m for m in model.modules() if isinstance(m, paper_protocol.BasicBlock)]
        streams = [{b.bn2.num_features for b in blocks[5 * s:5 * s + 5]} for s in range(3)]
        assert all(len(widths) == 1 for widths in streams)
        assert [w for w, in streams] != [8, 16, 32]   # and pruning did narrow a stream
