"""``prune(ranking="damage_per_cost")``: channels ranked by damage per unit of budgeted cost.

References: what removing a channel saves is MEASURED by removing it with Torch-Pruning on a
copy and counting the whole model again; the best removal for a budget is found by brute
force over how many channels each group loses, each combination pruned for real and counted.
"""
import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

import tp_eigendamage as ted
from tp_eigendamage import PruneArgumentError
from tp_eigendamage._round import channel_costs
from tp_eigendamage._tp import layer_costs
from tp_eigendamage.prune import default_ranking


class CostNet(nn.Module):
    """conv → BN → depthwise conv → 1×1 conv → flatten → Linear, bias-free and without
    activations, so every counted cost is linear in the channel counts: a channel's saving is
    exactly its share of each member layer. The Linear reads the flattened map, so each channel
    of the 1×1 conv feeds 36 of its inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.pw = nn.Conv2d(4, 3, 1, bias=False)
        self.head = nn.Linear(3 * 36, 5, bias=False)

    def forward(self, x):
        return self.head(torch.flatten(self.pw(self.dw(self.bn(self.conv(x)))), 1))


def counted(model, x):
    flops, params = tp.utils.count_ops_and_params(model, x)
    return {"flops": float(flops), "params": float(params)}


def measured_saving(model, x, layer_name, channel, metric):
    """Total cost of the model minus that of a copy with one channel of ``layer_name`` removed."""
    pruned = copy.deepcopy(model)
    layer = pruned.get_submodule(layer_name)
    DG = tp.DependencyGraph().build_dependency(pruned, example_inputs=x)
    DG.get_pruning_group(layer, tp.prune_conv_out_channels, idxs=[channel]).prune()
    return counted(model, x)[metric] - counted(pruned, x)[metric]


@pytest.mark.parametrize("metric", ["flops", "params"])
@pytest.mark.parametrize("root", ["conv", "pw"])
def test_channel_cost_is_what_removing_the_channel_saves(metric, root):
    torch.manual_seed(0)
    model, x = CostNet().eval(), torch.randn(1, 3, 6, 6)
    layer = model.get_submodule(root)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    group = DG.get_pruning_group(layer, tp.prune_conv_out_channels, idxs=list(range(layer.out_channels)))
    costs = channel_costs(group, layer_costs(model, x, metric))
    expected = [measured_saving(model, x, root, j, metric) for j in range(layer.out_channels)]
    assert costs.tolist() == pytest.approx(expected, rel=1e-12)
    assert min(expected) > 0


class TwoGroups(nn.Module):
    """Two prunable groups with very different per-channel FLOPs: ``a``'s 3 channels (a conv
    at 8×8 and the stride-2 conv reading them) and ``b``'s 16 (a conv at 4×4 and the head)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.b = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.head = nn.Linear(16, 2, bias=False)

    def forward(self, x):
        return self.head(self.b(self.a(x)).mean(dim=(2, 3)))


class FixedDamage(tp.importance.Importance):
    """Given per-channel damages of each group, keyed by the width of its root layer (``prune()``
    scores a private copy of the model, so the layers are not the caller's objects)."""

    def __init__(self, damages):
        self.damages = damages

    def __call__(self, group):
        dep, idxs = group[0]
        return self.damages[dep.layer.out_channels][torch.as_tensor(idxs)]


def removal(model, x, n_a, n_b):
    """The FLOPs fraction kept after removing the first ``n_a`` channels of ``a`` and ``n_b`` of ``b``."""
    pruned = copy.deepcopy(model)
    DG = tp.DependencyGraph().build_dependency(pruned, example_inputs=x)
    for name, n in (("a", n_a), ("b", n_b)):
        if n:
            DG.get_pruning_group(pruned.get_submodule(name), tp.prune_conv_out_channels, idxs=list(range(n))).prune()
    return counted(pruned, x)["flops"] / counted(model, x)["flops"]


def pruned_counts(damage_a, damage_b, ranking, target, tolerance):
    torch.manual_seed(0)
    model, x = TwoGroups().eval(), torch.randn(1, 3, 8, 8)
    importance = FixedDamage({3: torch.tensor(damage_a), 16: torch.tensor(damage_b)})
    ted.prune(model, [], x, method=importance, target_flops=target, ranking=ranking, tolerance=tolerance,
              ignored_layers=[model.head], progress=False)
    return 3 - model.a.out_channels, 16 - model.b.out_channels


DAMAGE_B = [0.1 + 0.02 * i for i in range(16)]


@pytest.mark.parametrize("damage_a0", [1.0, -0.5])
def test_damage_per_cost_finds_the_brute_force_best_removal(damage_a0):
    """The cheapest-damage removal meeting the budget, found by brute force over every (number of
    ``a`` channels, number of ``b`` channels) pruned for real (within a group the lowest damages
    go first), is what ``damage_per_cost`` removes. Ranking by damage alone strips the cheap
    ``b`` channels and removes more damage; a negative damage (a channel whose removal is
    predicted to help) goes first with either ranking."""
    damage_a = [damage_a0, 5.0, 5.0]
    target, tolerance = 0.6, 0.02
    torch.manual_seed(0)
    model, x = TwoGroups().eval(), torch.randn(1, 3, 8, 8)
    admissible = {}
    for n_a, n_b in itertools.product(range(3), range(16)):   # each layer keeps at least one channel
        if abs(removal(model, x, n_a, n_b) / target - 1) <= tolerance:
            admissible[(n_a, n_b)] = sum(sorted(damage_a)[:n_a]) + sum(sorted(DAMAGE_B)[:n_b])
    best = min(admissible, key=admissible.get)
    assert pruned_counts(damage_a, DAMAGE_B, "damage_per_cost", target, tolerance) == best
    by_damage = pruned_counts(damage_a, DAMAGE_B, "damage", target, tolerance)
    if damage_a0 > 0:
        assert admissible[by_damage] > admissible[best] + 0.5
    else:
        assert by_damage[0] == 1


def test_rankings_coincide_without_global_pruning():
    """Per-layer ranking: every channel of a group costs the same, so dividing changes nothing."""
    damage_a, damage_b = [0.3, 0.1, 0.2], [float(d) for d in torch.linspace(0.1, 1.6, 16)]
    results = []
    for ranking in ("damage", "damage_per_cost"):
        torch.manual_seed(0)
        model, x = TwoGroups().eval(), torch.randn(1, 3, 8, 8)
        importance = FixedDamage({3: torch.tensor(damage_a), 16: torch.tensor(damage_b)})
        ted.prune(model, [], x, method=importance, pruning_ratio=0.4, ranking=ranking, global_pruning=False,
                  ignored_layers=[model.head], progress=False)
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_unknown_ranking_names_the_closest():
    model = TwoGroups()
    with pytest.raises(PruneArgumentError, match=r"ranking='damage_per_flop' \(did you mean 'damage_per_cost'\?\)"):
        ted.prune(model, [], torch.randn(1, 3, 8, 8), method="magnitude", target_flops=0.5,
                  ranking="damage_per_flop", progress=False)


@pytest.mark.parametrize("target", ["target_flops", "target_latency", "target_params", "pruning_ratio"])
@pytest.mark.parametrize("method", sorted(ted.METHODS))
def test_default_ranking_per_budget_and_method(method, target):
    """Damage per cost by default only where it was measured to help (README): a FLOP or latency
    budget with a second-order criterion, whose scores are predicted loss increases."""
    second_order = method in ("eigendamage", "kron_obd", "kron_obs", "fisher_diag")
    expected = "damage_per_cost" if second_order and target in ("target_flops", "target_latency") else "damage"
    assert default_ranking(target, ted.METHODS[method]) == expected


def test_default_ranking_of_a_criterion_not_in_loss_units_is_damage():
    """A Torch-Pruning Importance instance: its scores need not add up across layers."""
    damage_a = [1.0, 5.0, 5.0]
    chosen = pruned_counts(damage_a, DAMAGE_B, None, 0.6, 0.02)
    assert chosen == pruned_counts(damage_a, DAMAGE_B, "damage", 0.6, 0.02)
    assert chosen != pruned_counts(damage_a, DAMAGE_B, "damage_per_cost", 0.6, 0.02)
