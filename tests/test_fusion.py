"""Inference fusion: BatchNorm folded into the convolution that feeds it (eval-mode function
kept), on plain layers, KFE blocks and timm's BatchNormAct2d; traced and exported models agree."""
import copy
import io

import pytest
import timm
import torch
import torch.nn as nn

import tp_eigendamage as ted


def randomize_norms(model):
    """Non-trivial running statistics and affine parameters, so folding is really tested."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def norms(model):
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.fixture(scope="module")
def pruned_resnet():
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("resnet18", num_classes=10, zero_init_last=False)).eval()
    x = torch.randn(2, 3, 32, 32)
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    ted.prune(model, data, x[:1], target_params=0.2, progress=False)   # deep enough to keep a block
    assert ted.kfe_blocks(model), "the test needs KFE blocks whose rotate_out feeds a BatchNorm"
    return model, x


def test_pruned_model_with_kfe_blocks_keeps_its_eval_function(pruned_resnet):
    model, x = pruned_resnet
    fused = copy.deepcopy(model)
    ted.fuse_for_inference(fused, x)
    assert norms(model) == 20 and norms(fused) == 0
    computing = lambda m: sum(not list(c.children()) and not isinstance(c, nn.Identity)  # noqa: E731
                              for c in m.modules())
    assert computing(fused) == computing(model) - 20
    with torch.no_grad():
        assert rel(fused(x), model(x)) < 1e-5


@pytest.mark.parametrize("name", ["mobilenetv3_small_100", "efficientnet_b0"])
def test_timm_norm_act_layers_keep_their_activation(name):
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(name, num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    ted.fuse_for_inference(model, x)
    assert norms(model) == 0
    with torch.no_grad():
        assert rel(model(x), y) < 1e-5


class NotFusable(nn.Module):
    """A BatchNorm whose conv also feeds a shortcut, one after a conv used twice, one with batch
    statistics, one after an addition, and one foldable pair (the control)."""

    def __init__(self):
        super().__init__()
        self.shared_out = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_shared_out = nn.BatchNorm2d(4)
        self.reused = nn.Conv2d(4, 4, 1)
        self.bn_reused = nn.BatchNorm2d(4)
        self.plain = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_batch_stats = nn.BatchNorm2d(4, track_running_stats=False)
        self.bn_after_add = nn.BatchNorm2d(4)
        self.control = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn_control = nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.shared_out(x)
        x = torch.relu(self.bn_shared_out(a)) + a
        x = self.bn_reused(self.reused(self.reused(x)))
        x = self.bn_batch_stats(self.plain(x))
        x = self.bn_after_add(x + 1.0)
        return self.bn_control(self.control(x))


def test_only_exact_pairs_are_fused():
    torch.manual_seed(0)
    model = randomize_norms(NotFusable()).eval()
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        y = model(x)
    ted.fuse_for_inference(model, x)
    kept = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert kept == {"bn_shared_out", "bn_reused", "bn_batch_stats", "bn_after_add"}
    assert isinstance(model.bn_control, nn.Identity) and model.control.bias is not None
    with torch.no_grad():
        assert rel(model(x), y) < 1e-5


def test_fused_model_traces_and_exports_to_onnx(pruned_resnet):
    model, x = pruned_resnet
    fused = ted.fuse_for_inference(copy.deepcopy(model), x)
    with torch.no_grad():
        expected = model(x)
        traced = torch.jit.trace(fused, x)
        assert rel(traced(x), expected) < 1e-5
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    buffer = io.BytesIO()
    torch.onnx.export(fused, (x,), buffer, dynamo=True, verbose=False)
    session = ort.InferenceSession(buffer.getvalue())
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert rel(torch.from_numpy(out), expected) < 1e-5
