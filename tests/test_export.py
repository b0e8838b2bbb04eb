"""End to end: a model pruned by ``prune()`` with KFE blocks still in it saves, loads, pickles
and traces to the same function (tests/test_io.py covers hand-built blocks)."""
import io

import pytest
import timm
import torch

import tp_eigendamage as ted



@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    x = torch.randn(2, 3, 32, 32, generator=g)
    ted.prune(model, data, x, method="eigendamage", pruning_ratio=0.6, progress=False)
    assert ted.kfe_blocks(model), "expected some KFE blocks to pay and stay"
    return model, x


def reference(model, x):
    with torch.no_grad():
        return model(x)


def test_save_load_round_trip_after_prune(pruned, tmp_path):
    model, x = pruned
    expected = reference(model, x)
    path = str(tmp_path / "pruned.pt")
    ted.save(model, path, metadata={"method": "eigendamage"})
    loaded = ted.load(path).eval()
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]
    assert len(ted.kfe_blocks(loaded)) == len(ted.kfe_blocks(model))
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_torch_save_of_the_whole_module(pruned):
    model, x = pruned
    expected = reference(model, x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_jit_trace_of_the_pruned_model(pruned):
    model, x = pruned
    expected = reference(model, x)
    traced = torch.jit.trace(model, x)
    other = torch.randn_like(x)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), expected)
        torch.testing.assert_close(traced(other), model(other))
