"""timm integration: heads to keep, attention heads for Torch-Pruning, the post-prune fix-up."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch_pruning as tp

from tp_eigendamage.integrations import timm as ti
from tp_eigendamage import KFEBlock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def vit(name="vit_tiny_patch16_224", **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=32, num_classes=10, **kwargs).eval()


def manual_attention(attn, x, heads):
    """Multi-head self-attention written out: ``heads`` heads of ``d = qkv_out / (3 heads)``
    dimensions, logits ``q·k / √d``."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x)
    d = qkv.shape[-1] // (3 * heads)
    q, k, v = qkv.reshape(batch, tokens, 3, heads, d).unbind(2)
    weights = (torch.einsum("bnhd,bmhd->bhnm", q, k) / d ** 0.5).softmax(dim=-1)
    out = torch.einsum("bhnm,bmhd->bnhd", weights, v).reshape(batch, tokens, heads * d)
    return out @ attn.proj.weight.T + attn.proj.bias


def check_attention_against_manual(model, x, expected_heads):
    """Every block's attention output equals the manual one, on the fused and the plain path."""
    records = []
    hooks = [blk.attn.register_forward_hook(lambda m, args, out: records.append((m, args[0], out)))
             for blk in model.blocks]
    outputs = []
    for fused in (True, False):
        for blk in model.blocks:
            blk.attn.fused_attn = fused
        records.clear()
        with torch.no_grad():
            outputs.append(model(x))
            for (attn, inputs, out), heads in zip(records, expected_heads):
                torch.testing.assert_close(out, manual_attention(attn, inputs, heads), rtol=1e-4, atol=1e-5)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
    return outputs[0]


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
@pytest.mark.parametrize("prune_heads", [False, True], ids=["head_dims", "num_heads"])
def test_pruned_vit_attention_is_consistent(name, prune_heads):
    model = vit(name, depth=4)  # the real architecture, 4 of its 12 blocks (test time)
    x = torch.randn(2, 3, 32, 32)
    kwargs = ti.pruner_kwargs(model, prune_num_heads=prune_heads, prune_head_dims=not prune_heads)
    assert kwargs["ignored_layers"] == [model.head]
    assert kwargs["num_heads"] == {blk.attn.qkv: 3 for blk in model.blocks}
    pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(),
                                  pruning_ratio=0.5, head_pruning_ratio=0.5, **kwargs)
    pruner.step()
    ti.fix_attention_after_pruning(model, pruner.num_heads)

    expected_heads = [pruner.num_heads[blk.attn.qkv] if prune_heads else 3 for blk in model.blocks]
    assert (min(expected_heads) < 3) if prune_heads else all(blk.attn.head_dim < 64 for blk in model.blocks)
    out = check_attention_against_manual(model, x, expected_heads)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert model.head.out_features == 10


def kfe_qkv(linear: nn.Linear) -> KFEBlock:
    """A function-preserving KFE block ``Q_o (Q_oᵀ W Q_i) Q_iᵀ`` with random orthogonal Q."""
    d_in, d_out = linear.in_features, linear.out_features
    q_in, _ = torch.linalg.qr(torch.randn(d_in, d_in))
    q_out, _ = torch.linalg.qr(torch.randn(d_out, d_out))
    rotate_in, core = nn.Linear(d_in, d_in, bias=False), nn.Linear(d_in, d_out, bias=False)
    rotate_out = nn.Linear(d_out, d_out)
    with torch.no_grad():
        rotate_in.weight.copy_(q_in.T)
        core.weight.copy_(q_out.T @ linear.weight @ q_in)
        rotate_out.weight.copy_(q_out)
        rotate_out.bias.copy_(linear.bias)
    return KFEBlock(rotate_in, core, rotate_out, torch.ones(d_in), torch.ones(d_out),
                    q_in, q_out, torch.ones(d_out, d_in))


@pytest.mark.parametrize("prune_heads", [False, True], ids=["head_dims", "num_heads"])
def test_pruned_kfe_qkv_attention_is_consistent(prune_heads):
    """With qkv rewritten as a KFE block, heads are keyed by its ``rotate_out``."""
    model = vit(depth=2)
    for blk in model.blocks:
        blk.attn.qkv = kfe_qkv(blk.attn.qkv)
    x = torch.randn(2, 3, 32, 32)
    kwargs = ti.pruner_kwargs(model, prune_num_heads=prune_heads, prune_head_dims=not prune_heads)
    assert kwargs["num_heads"] == {blk.attn.qkv.rotate_out: 3 for blk in model.blocks}
    pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(),
                                  pruning_ratio=0.5, head_pruning_ratio=0.5, **kwargs)
    pruner.step()
    ti.fix_attention_after_pruning(model, pruner.num_heads)
    expected_heads = [pruner.num_heads[blk.attn.qkv.rotate_out] if prune_heads else 3 for blk in model.blocks]
    assert all(blk.attn.qkv.rotate_out.out_features < 576 for blk in model.blocks)
    out = check_attention_against_manual(model, x, expected_heads)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("qkv_kind", ["linear", "kfe"])
@pytest.mark.parametrize("removed", ["head_dims", "one_head"])
def test_removing_qkv_channels_equals_zeroing_them(qkv_kind, removed):
    """Pruning + fix-up must act exactly like zeroing the removed q/k/v rows of the original
    model (the change every importance criterion scores): logits keep their 1/√d_old scale."""
    original = vit(depth=2)
    if qkv_kind == "kfe":
        original.blocks[1].attn.qkv = kfe_qkv(original.blocks[1].attn.qkv)
    heads, d = 3, 64
    if removed == "head_dims":
        idxs = [p * heads * d + h * d + j for p in range(3) for h in range(heads) for j in range(0, d, 2)]
    else:
        idxs = [p * heads * d + 1 * d + j for p in range(3) for j in range(d)]
    reference = copy.deepcopy(original)
    ref_qkv = reference.blocks[1].attn.qkv
    ref_out = ref_qkv.rotate_out if qkv_kind == "kfe" else ref_qkv
    with torch.no_grad():
        ref_out.weight[idxs] = 0
        ref_out.bias[idxs] = 0

    model = copy.deepcopy(original)
    x = torch.randn(2, 3, 32, 32)
    qkv_layer = ti.attention_num_heads(model)
    target = model.blocks[1].attn.qkv
    target = target.rotate_out if qkv_kind == "kfe" else target
    assert qkv_layer[target] == 3
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    graph.get_pruning_group(target, tp.prune_linear_out_channels, idxs).prune()
    new_heads = {target: 2} if removed == "one_head" else None
    ti.fix_attention_after_pruning(model, new_heads)
    attn = model.blocks[1].attn
    assert (attn.num_heads, attn.head_dim) == ((3, 32) if removed == "head_dims" else (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
        ti.fix_attention_after_pruning(model, new_heads)  # a second call changes nothing
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)


def test_inconsistent_head_count_is_rejected_without_changes():
    model = vit(depth=2)
    before = copy.deepcopy(model.state_dict())
    attrs = [(b.attn.num_heads, b.attn.head_dim, b.attn.scale) for b in model.blocks]
    with pytest.raises(ValueError, match="num_heads=pruner.num_heads"):
        ti.fix_attention_after_pruning(model, {model.blocks[1].attn.qkv: 5})
    assert attrs == [(b.attn.num_heads, b.attn.head_dim, b.attn.scale) for b in model.blocks]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unsupported_attention_keeps_its_heads():
    """q/k-normalized attention (LayerNorm over head_dim) is not head-prunable: its qkv is kept."""
    model = vit(depth=2, qk_norm=True)
    x = torch.randn(2, 3, 32, 32)
    kwargs = ti.pruner_kwargs(model)
    assert kwargs["num_heads"] == {}
    assert kwargs["ignored_layers"] == [model.head] + [blk.attn.qkv for blk in model.blocks]
    tp.pruner.BasePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(),
                         pruning_ratio=0.5, **kwargs).step()
    ti.fix_attention_after_pruning(model)
    assert all(blk.attn.qkv.out_features == 576 for blk in model.blocks)
    assert model.blocks[0].mlp.fc1.out_features < 768
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_cnn_classifier_is_ignored():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    assert ti.classifier_layers(model) == [model.fc]
    kwargs = ti.pruner_kwargs(model)
    assert kwargs["ignored_layers"] == [model.fc] and kwargs["num_heads"] == {}
    x = torch.randn(2, 3, 32, 32)
    tp.pruner.BasePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(),
                         pruning_ratio=0.5, **kwargs).step()
    assert model.fc.out_features == 10 and model.fc.in_features < 512
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_distilled_heads_are_both_kept():
    model = vit("deit_tiny_distilled_patch16_224", depth=1)
    assert ti.classifier_layers(model) == [model.head, model.head_dist]
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    assert ti.classifier_layers(plain) == [plain[4]]   # no get_classifier(): the last layer
