"""KFE reparameterization: to_kfe, re-rotation, fold_kfe, surviving directions (docs/method.md §3, §6, §7)."""
import pytest
import timm
import torch
import torch.nn as nn
import torch_pruning as tp

from tp_eigendamage import StaleStatisticsError, collect_kfac
from tp_eigendamage import KFEBlock, KFEError, StaleBasisError, fold_kfe, kfe_blocks, to_kfe


def stats_of(model, x, **kw):
    """Factors from one batch; ``x=(inputs, labels)`` gives the (deterministic) empirical Fisher."""
    if isinstance(x, tuple):
        return collect_kfac(model, [x], fisher_type="empirical", progress=False, **kw)
    return collect_kfac(model, [(x, None)], progress=False, mean_gradient=False, **kw)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def structure(model):
    return [(n, type(m).__name__) for n, m in model.named_modules()]


def snapshot(model):
    return structure(model), {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snap):
    names, state = snap
    assert structure(model) == names
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def prune_directions(model, x, block, in_idxs=(), out_idxs=()):
    """Remove core input / output channels (eigen-directions) with Torch-Pruning."""
    conv = isinstance(block.core, nn.Conv2d)
    fn_in = tp.prune_conv_in_channels if conv else tp.prune_linear_in_channels
    fn_out = tp.prune_conv_out_channels if conv else tp.prune_linear_out_channels
    for fn, idxs in ((fn_in, in_idxs), (fn_out, out_idxs)):
        if idxs:
            DG = tp.DependencyGraph().build_dependency(model, example_inputs=x)
            DG.get_pruning_group(block.core, fn, idxs=list(idxs)).prune()


def assert_three_plain_stages(block):
    for part in (block.rotate_in, block.core, block.rotate_out):
        assert type(part) in (nn.Conv2d, nn.Linear) and not list(part.children())


class SmallNet(nn.Module):
    """Stride, string padding with dilation, reflect padding, bias-free conv, tokens through a Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding="same", dilation=2, padding_mode="reflect", bias=False)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.bn = nn.BatchNorm2d(12)
        self.tok = nn.Linear(12, 10)
        self.fc = nn.Linear(10, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = self.bn(self.dw(torch.relu(self.conv2(x))))
        t = torch.relu(self.tok(x.flatten(2).transpose(1, 2)))  # (N, T, D) tokens
        return self.fc(t.mean(1))


def small_net():
    torch.manual_seed(0)
    return SmallNet().eval(), torch.randn(4, 3, 12, 12)


# -- to_kfe ----------------------------------------------------------------------------------------
TIMM = [("resnet18", {}), ("convnext_atto", {}), ("mobilenetv2_050", {}),
        ("vit_tiny_patch16_224", {"img_size": 32})]


@pytest.mark.parametrize("name,kw", TIMM, ids=[n for n, _ in TIMM])
def test_to_kfe_then_fold_on_timm_is_function_preserving(name, kw):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    head = model.get_classifier()
    expected = sorted(n for n, m in model.named_modules()
                      if type(m) in (nn.Conv2d, nn.Linear) and getattr(m, "groups", 1) == 1 and m is not head)
    grouped = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    with torch.no_grad():
        y0 = model(x)
    assert to_kfe(model, stats_of(model, x)) is model
    modules = dict(model.named_modules())
    assert sorted(n for n, _ in kfe_blocks(model)) == expected
    assert all(type(modules[n]) is nn.Conv2d for n in grouped)   # depthwise left out
    assert model.get_classifier() is head                         # classifier left out
    for _, block in kfe_blocks(model):
        assert_three_plain_stages(block)
    with torch.no_grad():
        assert rel(model(x), y0) <= 1e-4

    # prune a few eigen-directions in two blocks, then fold every block back exactly
    blocks = [b for _, b in kfe_blocks(model)]
    prune_directions(model, x, blocks[1], in_idxs=[0, 2], out_idxs=[1])
    prune_directions(model, x, blocks[-1], in_idxs=[3], out_idxs=[0, 4])
    with torch.no_grad():
        y_pruned = model(x)
    outer = {n: (b.rotate_in.weight.shape[1], b.rotate_out.weight.shape[0]) for n, b in kfe_blocks(model)}
    fold_kfe(model, only_unprofitable=False)
    assert not kfe_blocks(model)
    modules = dict(model.named_modules())
    for n, (fan_in, fan_out) in outer.items():
        assert type(modules[n]) in (nn.Conv2d, nn.Linear)
        assert modules[n].weight.shape[:2] == (fan_out, fan_in)
    with torch.no_grad():
        assert rel(model(x), y_pruned) <= 1e-5


def test_block_is_the_eigenbasis_rotation():
    model, x = small_net()
    stats = stats_of(model, x)
    layers = {n: m for n, m in model.named_modules()}
    with torch.no_grad():
        y0 = model(x)
    to_kfe(model, stats)
    with torch.no_grad():
        assert rel(model(x), y0) <= 1e-5
    assert sorted(n for n, _ in kfe_blocks(model)) == ["conv1", "conv2", "tok"]  # not dw, not fc
    for name in ("conv2", "tok"):
        block, f = getattr(model, name), stats[layers[name]]
        A, S = f.input_factor.double(), f.grad_factor.double()
        Qa, Qs = block.basis_in.double(), block.basis_out.double()
        lam_a, lam_s = block.eigen_in.double(), block.eigen_out.double()
        tol = 1e-5 * A.norm().item()
        assert torch.allclose(Qa.T @ Qa, torch.eye(len(lam_a), dtype=torch.float64), atol=1e-6)
        assert torch.allclose(A @ Qa, Qa * lam_a, atol=tol)
        assert torch.allclose(S @ Qs, Qs * lam_s, atol=1e-5 * S.norm().item())
        assert torch.allclose(block.rotation_in_matrix().double(), Qa.T, atol=1e-6)
        assert torch.allclose(block.rotation_out_matrix().double(), Qs, atol=1e-6)
        W = layers[name].weight.detach().double()
        W = W.reshape(W.shape[0], W.shape[1], -1)
        core = torch.einsum("so,sik,ij->ojk", Qs, W, Qa)
        assert torch.allclose(block.core.weight.double().reshape(core.shape), core, atol=1e-5)
        assert torch.allclose(block.fisher_diag.double(), torch.outer(lam_s, lam_a), rtol=1e-5, atol=1e-12)
    assert model.conv2.core.padding == "same" and model.conv2.core.padding_mode == "reflect"
    assert model.conv2.core.dilation == (2, 2) and model.conv1.core.stride == (2, 2)
    assert model.conv2.rotate_out.bias is None
    assert torch.equal(model.conv1.rotate_out.bias, layers["conv1"].bias)


def test_surviving_directions_after_pruning():
    model, x = small_net()
    to_kfe(model, stats_of(model, x))
    block = model.conv2
    prune_directions(model, x, block, in_idxs=[1, 4], out_idxs=[0, 3, 11])
    assert block.core.weight.shape[:2] == (9, 6)
    in_idx, out_idx = block.surviving_directions()
    assert in_idx.tolist() == [0, 2, 3, 5, 6, 7]
    assert out_idx.tolist() == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    with torch.no_grad():  # a little fine-tuning of the rotations does not confuse the matching
        block.rotate_in.weight.add_(1e-3 * torch.randn_like(block.rotate_in.weight))
        block.rotate_out.weight.add_(1e-3 * torch.randn_like(block.rotate_out.weight))
    assert [t.tolist() for t in block.surviving_directions()] == [in_idx.tolist(), out_idx.tolist()]


def prune_outer(model, x, layer, idxs):
    """Remove output channels of ``layer`` and everything coupled to them (Torch-Pruning)."""
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    fn = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
    DG.get_pruning_group(layer, fn, idxs=list(idxs)).prune()


def kept(n, removed):
    return [i for i in range(n) if i not in removed]


def test_surviving_outer_channels_and_directions_after_pruning_both_sides():
    """Outer channels removed on both sides of a block (through its neighbours) and directions
    removed inside it: the indices recovered are exactly those left by construction."""
    model, x = small_net()
    to_kfe(model, stats_of(model, x))
    block = model.conv2
    prune_outer(model, x, model.conv1.rotate_out, [2, 5])        # conv2's inputs (conv1's outputs)
    prune_outer(model, x, block.rotate_out, [0, 7, 11])          # conv2's outputs (dw, bn, tok read them)
    prune_directions(model, x, block, in_idxs=[1, 4], out_idxs=[3, 6])
    assert block.rotate_in.weight.shape[:2] == (6, 6) and block.rotate_out.weight.shape[:2] == (9, 10)
    s = block.surviving()
    assert s.channels_in.tolist() == kept(8, [2, 5])
    assert s.channels_out.tolist() == kept(12, [0, 7, 11])
    assert s.directions_in.tolist() == kept(8, [1, 4])
    assert s.directions_out.tolist() == kept(12, [3, 6])
    assert [t.tolist() for t in block.surviving_directions()] == [kept(8, [1, 4]), kept(12, [3, 6])]
    assert model.conv1.surviving_outer()[1].tolist() == kept(8, [2, 5])
    assert model.tok.surviving_outer()[0].tolist() == kept(12, [0, 7, 11])
    # current indices 0 and 8 of the output directions are the stored ones 0 and 10
    prune_directions(model, x, block, in_idxs=[0], out_idxs=[0, 8])
    assert block.surviving_directions()[0].tolist() == kept(8, [0, 1, 4])
    assert block.surviving_directions()[1].tolist() == kept(12, [0, 3, 6, 10])
    # keep_surviving_buffers cuts the buffers to what the layers still hold
    block.keep_surviving_buffers()
    assert torch.equal(block.basis_in.T, block.rotation_in_matrix().detach())
    assert torch.equal(block.basis_out, block.rotation_out_matrix().detach())
    assert block.fisher_diag.shape == (8, 5) and block.eigen_in.shape == (5,)
    # re-rotation re-bases every block on its current outer channels and directions
    with torch.no_grad():
        y = model(x)
    to_kfe(model, stats_of(model, x))
    with torch.no_grad():
        assert rel(model(x), y) <= 1e-5
    assert block.basis_in.shape == (6, 5) and block.basis_out.shape == (9, 8)
    for name in ("conv1", "conv2", "tok"):
        s, b = getattr(model, name).surviving(), getattr(model, name)
        assert [t.tolist() for t in s] == [list(range(n)) for n in (
            b.eigen_in.numel(), b.eigen_out.numel(), b.basis_in.shape[0], b.basis_out.shape[0])]


def test_survivors_are_known_without_matching_until_torch_pruning_changes_a_rotation(monkeypatch):
    """Right after to_kfe, a re-rotation or keep_surviving_buffers every rotation entry is where
    the buffers say: surviving() answers without matching (counted), and its answer is what
    matching the rotations against the bases finds. Pruning replaces a rotation: matched again."""
    from tp_eigendamage import kfe_block
    from tp_eigendamage._basis_matching import exact_indices

    calls = []
    monkeypatch.setattr(kfe_block, "exact_indices", lambda *a: calls.append(1) or exact_indices(*a))

    def matched(block):
        ins = exact_indices(block.rotation_in_matrix().detach().T, block.basis_in)
        outs = exact_indices(block.rotation_out_matrix().detach(), block.basis_out)
        return [t.tolist() for t in (ins[1], outs[1], ins[0], outs[0])]

    model, x = small_net()
    to_kfe(model, stats_of(model, x))
    for _, block in kfe_blocks(model):
        assert [t.tolist() for t in block.surviving()] == matched(block)
    assert calls == []
    block = model.conv2
    prune_directions(model, x, block, in_idxs=[1], out_idxs=[4])
    prune_outer(model, x, model.conv1.rotate_out, [3])
    assert [t.tolist() for t in block.surviving()] == matched(block) == [
        kept(8, [1]), kept(12, [4]), kept(8, [3]), list(range(12))]
    assert len(calls) == 2                    # input and output rotation, once (then cached)
    block.keep_surviving_buffers()
    calls.clear()
    assert [t.tolist() for t in block.surviving()] == matched(block)
    to_kfe(model, stats_of(model, x))
    for _, b in kfe_blocks(model):
        assert [t.tolist() for t in b.surviving()] == matched(b)
    assert calls == []


def test_surviving_on_bases_with_repeated_entries():
    """A basis with a block of repeated values (0 and 1, as eigh gives for dead channels): the
    dense part is identified exactly; in the 0/1 part the remaining weights fit several choices
    and the one returned reproduces them exactly with distinct indices."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    basis = torch.block_diag(q, torch.eye(3, dtype=torch.float64)[[2, 0, 1]]).float()  # 7 × 7
    rows, cols = [0, 1, 3, 4, 6], [0, 2, 3, 5, 6]
    rotate_in = nn.Linear(5, 5, bias=False)
    rotate_out = nn.Linear(7, 7, bias=False)
    with torch.no_grad():
        rotate_in.weight.copy_(basis[rows][:, cols].T)
        rotate_out.weight.copy_(basis)
    block = KFEBlock(rotate_in, nn.Linear(5, 5, bias=False), rotate_out,
                     torch.rand(7), torch.rand(7), basis, basis.clone(), torch.rand(7, 7))
    s = block.surviving()
    assert s.channels_out.tolist() == list(range(7)) and s.directions_out.tolist() == list(range(7))
    assert s.channels_in[:3].tolist() == rows[:3] and s.directions_in[:3].tolist() == cols[:3]
    assert len(set(s.channels_in.tolist())) == 5 and len(set(s.directions_in.tolist())) == 5
    assert torch.equal(basis[s.channels_in][:, s.directions_in].T, rotate_in.weight.detach())


def test_changed_rotations_with_pruned_outer_channels_raise():
    model, x = small_net()
    to_kfe(model, stats_of(model, x))
    block = model.conv2
    with torch.no_grad():   # fine-tuned: outer channels intact, so |cos| matching still works
        block.rotate_in.weight.add_(1e-3 * torch.randn_like(block.rotate_in.weight))
    assert block.surviving_directions()[0].tolist() == list(range(8))
    prune_outer(model, x, model.conv1.rotate_out, [3])
    with pytest.raises(StaleBasisError, match="input channels were pruned.*to_kfe"):
        block.surviving()


def test_two_rounds_stay_three_stages_and_rerotation_after_pruning_preserves_function():
    model, x = small_net()
    to_kfe(model, stats_of(model, x))
    with torch.no_grad():
        y1 = model(x)
    to_kfe(model, stats_of(model, x))  # round 2, nothing pruned
    assert sorted(n for n, _ in kfe_blocks(model)) == ["conv1", "conv2", "tok"]
    for _, block in kfe_blocks(model):
        assert_three_plain_stages(block)
    with torch.no_grad():
        assert rel(model(x), y1) <= 1e-5

    block = model.conv2
    prune_directions(model, x, block, in_idxs=[0, 5], out_idxs=[2, 7])
    with torch.no_grad():
        y_pruned = model(x)
    y = torch.arange(4) % 5
    to_kfe(model, stats_of(model, (x, y)))  # round 3 after pruning
    with torch.no_grad():
        assert rel(model(x), y_pruned) <= 1e-5
    assert_three_plain_stages(block)
    assert block.basis_in.shape == (8, 6) and block.basis_out.shape == (12, 10)
    assert block.eigen_in.shape == (6,) and block.fisher_diag.shape == (10, 6)
    assert [t.tolist() for t in block.surviving_directions()] == [list(range(6)), list(range(10))]
    # the merged rotation is still orthonormal and diagonalizes the core's fresh factors
    R = block.rotation_in_matrix().double()
    assert torch.allclose(R @ R.T, torch.eye(6, dtype=torch.float64), atol=1e-5)
    f = stats_of(model, (x, y))[block.core]  # same data and labels: the same factors
    for M, lam in ((f.input_factor.double(), block.eigen_in), (f.grad_factor.double(), block.eigen_out)):
        assert torch.allclose(M, torch.diag(lam.double()), atol=1e-4 * M.norm().item())


# -- fold_kfe and costs ----------------------------------------------------------------------------
def test_fold_only_unprofitable_blocks():
    import copy

    model, x = small_net()
    to_kfe(model, stats_of(model, x))
    prune_directions(model, x, model.conv2, in_idxs=list(range(6)), out_idxs=list(range(9)))
    with torch.no_grad():
        y = model(x)
    block_params = {n: sum(p.numel() for p in b.parameters()) for n, b in kfe_blocks(model)}
    every_folded = fold_kfe(copy.deepcopy(model), only_unprofitable=False)
    dense_params = {n: sum(p.numel() for p in every_folded.get_submodule(n).parameters()) for n in block_params}
    pays = {n for n in block_params if block_params[n] < dense_params[n]}
    assert pays == {"conv2"}                  # only the pruned bottleneck is smaller than dense
    fold_kfe(model)
    assert {n for n, _ in kfe_blocks(model)} == pays
    assert type(model.conv1) is nn.Conv2d and type(model.tok) is nn.Linear
    with torch.no_grad():
        assert rel(model(x), y) <= 1e-5


def test_param_and_flop_counts_include_rotation_layers():
    model, x = small_net()
    macs0, params0 = tp.utils.count_ops_and_params(model, x[:1])
    shapes = {}
    hooks = [getattr(model, n).register_forward_hook(
        lambda m, i, o, n=n: shapes.__setitem__(n, (i[0].shape, o.shape))) for n in ("conv1", "conv2", "tok")]
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    to_kfe(model, stats_of(model, x))
    macs1, params1 = tp.utils.count_ops_and_params(model, x[:1])
    extra_params = 3 * 3 + 8 * 8 + 8 * 8 + 12 * 12 + 12 * 12 + 10 * 10
    assert params1 - params0 == extra_params
    extra_macs = 0
    for n, (si, so) in shapes.items():  # rotate_in acts on the input map, rotate_out on the output map
        sites_in, sites_out = si[:-1].numel() if n == "tok" else si[2:].numel(), \
            so[:-1].numel() if n == "tok" else so[2:].numel()
        d_in, d_out = (si[-1], so[-1]) if n == "tok" else (si[1], so[1])
        extra_macs += d_in * d_in * sites_in + d_out * d_out * sites_out
    assert macs1 - macs0 == extra_macs


# -- errors: clear message, model untouched -------------------------------------------------------
def test_stats_resolve_by_name_on_a_copy_and_refuse_other_shapes():
    import copy

    model, x = small_net()
    stats = stats_of(model, x)
    twin = copy.deepcopy(model)
    to_kfe(twin, stats)                     # statistics of the original, matched by name
    to_kfe(model, stats)
    for (name, blk), (twin_name, twin_blk) in zip(kfe_blocks(model), kfe_blocks(twin)):
        assert name == twin_name
        for a, b in zip(blk.state_dict().values(), twin_blk.state_dict().values()):
            assert torch.equal(a, b)
    wider = nn.Sequential()
    wider.conv1 = nn.Conv2d(3, 9, 3, stride=2, padding=1)   # same name, another shape
    wider.fc = nn.Linear(9, 5)
    snap = snapshot(wider)
    with pytest.raises(StaleStatisticsError, match="conv1"):
        to_kfe(wider, stats, modules=["conv1"])
    assert_unchanged(wider, snap)


def test_stale_shapes_are_rejected_and_nothing_changes():
    model, x = small_net()
    stats = stats_of(model, x)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    DG.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[0, 1]).prune()
    snap = snapshot(model)
    with pytest.raises(StaleStatisticsError, match="conv1.*collect_kfac again"):
        to_kfe(model, stats)
    assert_unchanged(model, snap)
    with pytest.raises(StaleStatisticsError):  # the first (valid) layer is not swapped in either
        to_kfe(model, stats, modules=[model.tok, model.conv1])
    assert_unchanged(model, snap)


@pytest.mark.parametrize("pick,match", [
    (lambda m: m.dw, "grouped conv"),
    (lambda m: m.bn, "only nn.Conv2d / nn.Linear"),
    (lambda m: m.fc, "classifier.*include_classifier=True"),
    (lambda m: "nope", "not a submodule"),
])
def test_ineligible_modules_are_rejected(pick, match):
    model, x = small_net()
    stats = stats_of(model, x)
    snap = snapshot(model)
    with pytest.raises(KFEError, match=match):
        to_kfe(model, stats, modules=[model.conv1, pick(model)])
    assert_unchanged(model, snap)


def test_rotation_layers_patch_factors_and_spent_stats_are_rejected():
    model, x = small_net()
    with pytest.raises(KFEError, match="factor_mode='channel'"):
        to_kfe(model, stats_of(model, x, factor_mode="patch"))
    stats = stats_of(model, x)
    to_kfe(model, stats)
    with pytest.raises(KFEError, match="nothing to rewrite"):
        to_kfe(model, stats)  # the layers these factors describe were replaced
    stats = stats_of(model, x)
    with pytest.raises(KFEError, match="rotation layer"):
        to_kfe(model, stats, modules=[model.conv2.rotate_in])
    to_kfe(model, stats, modules=["fc"], include_classifier=True)
    assert isinstance(model.fc, KFEBlock) and type(model.conv2.rotate_in) is nn.Conv2d


def test_skip_by_name_or_module_and_default_classifier():
    model, x = small_net()
    to_kfe(model, stats_of(model, x), skip=["conv1", model.tok])
    assert [n for n, _ in kfe_blocks(model)] == ["conv2"]  # fc: last Linear = classifier
