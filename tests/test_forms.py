"""The four exact forms of a KFE block (tp_eigendamage.forms) and choosing the cheapest:
function preservation, the choice against independent counts, deployment (trace, save, fuse,
Torch-Pruning)."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch_pruning as tp

import tp_eigendamage as ted
from tp_eigendamage import KFEBlock, TwoLayerForm, collect_kfac, kfe_blocks, to_cheapest_forms, to_kfe
from tp_eigendamage.forms import FORM_LAYERS, FORMS, FormLatencies, form_module


class FormsNet(nn.Module):
    """Convs with stride, padding, dilation, reflect / string padding, with and without bias,
    and a Linear on tokens."""

    def __init__(self):
        super().__init__()
        self.stride2 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(16, 16, 3, padding="same", dilation=2, padding_mode="reflect", bias=False)
        self.wide = nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=True)
        self.down = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)
        self.tok = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.stride2(x))
        x = torch.relu(self.dilated(x))
        x = torch.relu(self.wide(x)) + x
        x = torch.relu(self.down(x))
        t = torch.relu(self.tok(x.flatten(2).transpose(1, 2)))   # (N, T, D) tokens
        return self.head(t.mean(1))


#: directions removed per block: (input directions, output directions); sizes chosen so that
#: each form is the cheapest somewhere, and FLOPs and parameters disagree on ``down`` (stride 2:
#: its rotate_in runs at four times the core's positions).
REMOVED = {"stride2": ([], list(range(12))), "dilated": (list(range(14)), []),
           "wide": (list(range(12)), list(range(12))), "down": (list(range(6)), list(range(12))),
           "tok": ([], [])}


def pruned_net():
    """FormsNet in the KFE with directions removed by Torch-Pruning (REMOVED)."""
    torch.manual_seed(0)
    model, x = FormsNet().eval(), torch.randn(2, 3, 16, 16)
    to_kfe(model, collect_kfac(model, [(x, None)], progress=False), include_classifier=False)
    for name, (in_idxs, out_idxs) in REMOVED.items():
        block = model.get_submodule(name)
        conv = isinstance(block.core, nn.Conv2d)
        for fn, idxs in ((tp.prune_conv_in_channels if conv else tp.prune_linear_in_channels, in_idxs),
                         (tp.prune_conv_out_channels if conv else tp.prune_linear_out_channels, out_idxs)):
            if idxs:
                DG = tp.DependencyGraph().build_dependency(model, example_inputs=x)
                DG.get_pruning_group(block.core, fn, idxs=idxs).prune()
    return model, x


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def block_inputs(model, x):
    """Each block's input in one forward (the tensor a replacement module must take)."""
    seen = {}
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0])) for n, b in kfe_blocks(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_every_form_of_every_block_computes_the_block():
    model, x = pruned_net()
    inputs = block_inputs(model, x)
    assert set(inputs) == set(REMOVED)
    for name, block in kfe_blocks(model):
        with torch.no_grad():
            y = block(inputs[name])
        for form in FORMS:
            module = form_module(block, form)
            layers = [m for m in module.modules() if type(m) in (nn.Conv2d, nn.Linear)]
            assert len(layers) == FORM_LAYERS[form], (name, form)
            with torch.no_grad():
                assert rel(module(inputs[name]), y) <= 1e-5, (name, form)
        pair = form_module(block, "in_merged")   # the layer's shape attributes, read through
        assert (pair.in_features if name == "tok" else pair.in_channels) == block.rotation_in_matrix().shape[1]
        assert (pair.bias is None) == (block.rotate_out.bias is None)


@pytest.mark.parametrize("form", FORMS)
def test_a_whole_model_in_one_form_keeps_its_function(form):
    model, x = pruned_net()
    with torch.no_grad():
        y = model(x)
    to_cheapest_forms(model, forms=(form,))
    expected = {"kfe": KFEBlock, "dense": (nn.Conv2d, nn.Linear)}.get(form, TwoLayerForm)
    assert all(isinstance(model.get_submodule(n), expected) for n in REMOVED)
    with torch.no_grad():
        assert rel(model(x), y) <= 1e-5


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def n_flops(module, x):
    return tp.utils.count_ops_and_params(module, x)[0]


def cheapest_by(count):
    """The form with the smallest ``count``, ties to the fewest layers."""
    return min(count, key=lambda f: (count[f], FORM_LAYERS[f]))


def form_of(module):
    if isinstance(module, KFEBlock):
        return "kfe"
    return module.form if isinstance(module, TwoLayerForm) else "dense"


def chosen_and_expected(cost):
    """The forms ``to_cheapest_forms`` chooses by ``cost``, and the cheapest by an independent
    count of each built form: Σ numel of its parameters, or Torch-Pruning's FLOP counter on
    the input the block reads (the function is checked on the way)."""
    model, x = pruned_net()
    inputs = block_inputs(model, x)
    expected = {}
    for name, block in kfe_blocks(model):
        built = {f: form_module(block, f) for f in FORMS}
        count = {f: n_params(m) if cost == "params" else n_flops(m, inputs[name]) for f, m in built.items()}
        expected[name] = cheapest_by(count)
    with torch.no_grad():
        y = model(x)
    to_cheapest_forms(model, cost=cost, example_inputs=x)
    with torch.no_grad():
        assert rel(model(x), y) <= 1e-5
    return {n: form_of(model.get_submodule(n)) for n in REMOVED}, expected


@pytest.mark.parametrize("cost", ["params", "flops"])
def test_the_chosen_form_is_the_cheapest_by_an_independent_count(cost):
    chosen, expected = chosen_and_expected(cost)
    assert chosen == expected


def test_parameters_and_flops_choose_differently_and_every_form_occurs():
    by_params, by_flops = chosen_and_expected("params")[1], chosen_and_expected("flops")[1]
    assert set(by_params.values()) == set(FORMS)
    assert by_params["down"] == "kfe" and by_flops["down"] == "in_merged"


class TokenMixer(nn.Module):
    """Two large Linears on many tokens: blocks big enough that the forms' latencies differ by
    several times."""

    def __init__(self):
        super().__init__()
        self.narrow = nn.Linear(256, 256)
        self.full = nn.Linear(256, 256)

    def forward(self, x):
        return self.full(torch.relu(self.narrow(x)))


def test_latency_choice_follows_large_measured_differences():
    """``narrow`` keeps 8 of 256 directions per side: its dense form does ~16x the work of the
    others. ``full`` keeps every direction: its three-layer form does 3x the dense work."""
    torch.manual_seed(0)
    model, x = TokenMixer().eval(), torch.randn(4, 128, 256)
    stats = collect_kfac(model, [(x, None)], sample_fn=ted.sample_gaussian, loss_fn=ted.gaussian_nll,
                         progress=False)
    to_kfe(model, stats, include_classifier=True)
    block = model.narrow
    for fn, idxs in ((tp.prune_linear_in_channels, list(range(248))), (tp.prune_linear_out_channels, list(range(248)))):
        DG = tp.DependencyGraph().build_dependency(model, example_inputs=x)
        DG.get_pruning_group(block.core, fn, idxs=idxs).prune()
    with torch.no_grad():
        y = model(x)
    cache = FormLatencies()
    to_cheapest_forms(model, cost="latency", example_inputs=x, latencies=cache)
    assert form_of(model.narrow) != "dense" and form_of(model.full) == "dense"
    assert len(cache.seconds) == 2 and all(set(s) == set(FORMS) for s in cache.seconds.values())
    with torch.no_grad():
        assert rel(model(x), y) <= 1e-5


def test_deployed_forms_save_trace_fuse_and_prune_again(tmp_path):
    """A timm ResNet with every block in a two-layer form: BatchNorms after them fuse, the model
    saves, loads and traces, and Torch-Pruning prunes it again."""
    torch.manual_seed(0)
    model, x = timm.create_model("resnet10t", num_classes=5).eval(), torch.randn(2, 3, 32, 32)
    to_kfe(model, collect_kfac(model, [(x, None)], progress=False))
    to_cheapest_forms(model, forms=("in_merged", "out_merged"))
    pairs = [m for m in model.modules() if isinstance(m, TwoLayerForm)]
    assert {p.form for p in pairs} == {"in_merged", "out_merged"} and not kfe_blocks(model)
    with torch.no_grad():
        y = model(x)
    ted.save(model, str(tmp_path / "m.pt"))
    with torch.no_grad():
        assert torch.equal(ted.load(str(tmp_path / "m.pt"))(x), y)
        assert rel(torch.jit.trace(model, x)(x), y) <= 1e-6
    fused = ted.fuse_for_inference(copy.deepcopy(model), x)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) < sum(
        isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert rel(fused(x), y) <= 1e-5
    params = n_params(model)
    ted.prune(model, [(x, torch.tensor([0, 1]))], x, method="kron_obd", target_params=0.7, progress=False)
    assert n_params(model) / params == pytest.approx(0.7, rel=0.02) and model(x).shape == (2, 5)
