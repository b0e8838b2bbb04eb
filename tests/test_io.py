"""Saving / loading pruned models (KFE blocks included) and tracing them."""
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn
import torch_pruning as tp

import tp_eigendamage
from tp_eigendamage import io
from tp_eigendamage.integrations import timm as ti
from tp_eigendamage import KFEBlock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def magnitude_pruned(model, x, ratio):
    kwargs = ti.pruner_kwargs(model)
    pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(),
                                  pruning_ratio=ratio, **kwargs)
    pruner.step()
    ti.fix_attention_after_pruning(model, pruner.num_heads)
    return model.eval()


@pytest.fixture(scope="module")
def pruned_resnet():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = magnitude_pruned(timm.create_model("resnet18", pretrained=False, num_classes=10), x, 0.3)
    assert model.conv1.out_channels < 64
    return model, x


def test_pruned_resnet_round_trip(pruned_resnet, tmp_path):
    model, x = pruned_resnet
    path = str(tmp_path / "pruned.pt")
    io.save(model, path, metadata={"accuracy": 0.5})
    loaded, header = io.load_with_metadata(path)
    assert type(loaded) is type(model)
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in model.parameters()]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert header["metadata"] == {"accuracy": 0.5} and header["format_version"] == io.FORMAT_VERSION
    assert header["versions"]["tp_eigendamage"] == tp_eigendamage.__version__
    assert header["versions"]["torch"] == torch.__version__
    # the file carries the pruned structure: the unpruned architecture cannot hold these weights
    with pytest.raises(RuntimeError, match="size mismatch"):
        timm.create_model("resnet18", pretrained=False, num_classes=10).load_state_dict(loaded.state_dict())


def test_load_in_a_fresh_interpreter(pruned_resnet, tmp_path):
    model, x = pruned_resnet
    io.save(model, str(tmp_path / "pruned.pt"))
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    script = ("import sys, torch, tp_eigendamage.io as io\n"
              "m = io.load(sys.argv[1]); ref = torch.load(sys.argv[2])\n"
              "with torch.no_grad():\n"
              "    assert torch.equal(m(ref['x']), ref['y'])\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "pruned.pt"), str(tmp_path / "io.pt")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_traced_pruned_model_matches(pruned_resnet):
    model, x = pruned_resnet
    traced = torch.jit.trace(model, x, check_trace=False)
    other = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(other), model(other), rtol=1e-5, atol=1e-6)


def test_pruned_vit_round_trip_keeps_attention_layout(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = magnitude_pruned(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                               num_classes=10, depth=2), x, 0.5)
    io.save(model, str(tmp_path / "vit.pt"))
    loaded = io.load(str(tmp_path / "vit.pt"))
    assert [(b.attn.num_heads, b.attn.head_dim, b.attn.scale) for b in loaded.blocks] == \
           [(b.attn.num_heads, b.attn.head_dim, b.attn.scale) for b in model.blocks]
    assert loaded.blocks[0].attn.head_dim < 64
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def kfe_model():
    """conv → KFE block (1×1 rotation, 3×3 core, 1×1 rotation) → pool → linear, built by hand."""
    torch.manual_seed(0)
    q_in, _ = torch.linalg.qr(torch.randn(8, 8))
    q_out, _ = torch.linalg.qr(torch.randn(6, 6))
    rotate_in = nn.Conv2d(8, 5, 1, bias=False)
    core = nn.Conv2d(5, 4, 3, padding=1, bias=False)
    rotate_out = nn.Conv2d(4, 6, 1)
    with torch.no_grad():
        rotate_in.weight.copy_(q_in[:, :5].T.reshape(5, 8, 1, 1))
        rotate_out.weight.copy_(q_out[:, :4].reshape(6, 4, 1, 1))
    block = KFEBlock(rotate_in, core, rotate_out, eigen_in=torch.rand(8), eigen_out=torch.rand(6),
                     basis_in=q_in, basis_out=q_out, fisher_diag=torch.rand(6, 8))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), block, nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10)).eval()


def test_kfe_block_round_trip(tmp_path):
    model = kfe_model()
    x = torch.randn(2, 3, 16, 16)
    io.save(model, str(tmp_path / "kfe.pt"))
    loaded = io.load(str(tmp_path / "kfe.pt"), map_location="cpu")
    block, original = loaded[2], model[2]
    assert isinstance(block, KFEBlock)
    for name in ("eigen_in", "eigen_out", "basis_in", "basis_out", "fisher_diag"):
        assert torch.equal(getattr(block, name), getattr(original, name)), name
    for got, want in zip(block.surviving_directions(), original.surviving_directions()):
        assert torch.equal(got, want)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        io.load(str(tmp_path / "nope.pt"))
    torch.save(kfe_model().state_dict(), tmp_path / "state.pt")
    with pytest.raises(ValueError, match="not a tp_eigendamage model file.*load_state_dict"):
        io.load(str(tmp_path / "state.pt"))
    (tmp_path / "junk.pt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="not a tp_eigendamage model file"):
        io.load(str(tmp_path / "junk.pt"))
    torch.save({"format": io.FORMAT, "format_version": io.FORMAT_VERSION + 1, "model": nn.Linear(1, 1)},
               tmp_path / "future.pt")
    with pytest.raises(ValueError, match="upgrade tp_eigendamage"):
        io.load(str(tmp_path / "future.pt"))


def test_bad_save_arguments(tmp_path):
    with pytest.raises(TypeError, match="nn.Module"):
        io.save({"weight": torch.zeros(1)}, str(tmp_path / "x.pt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.save(nn.Linear(1, 1), str(tmp_path / "missing_dir" / "x.pt"))
    hooked = nn.Linear(1, 1)
    hooked.register_forward_hook(lambda module, args, out: out)
    with pytest.raises(TypeError, match="cannot be pickled.*remove hooks"):
        io.save(hooked, str(tmp_path / "hooked.pt"))
    assert os.listdir(tmp_path) == []
