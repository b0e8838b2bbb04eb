"""CombinedImportance: mixing our criteria with Torch-Pruning's own."""
import pytest
import torch
import torch_pruning as tp
from scipy.stats import rankdata

from _importance_nets import groups_of, tiny_setup
from tp_eigendamage import collect_kfac
from tp_eigendamage import CombinedImportance, KroneckerOBDImportance


EXAMPLE = torch.randn(1, 3, 6, 6)


class SkipAll(tp.importance.Importance):
    """An importance that can score nothing (returns None for every group)."""

    def __call__(self, group):
        return None


@pytest.fixture(scope="module")
def setup():
    model, batches = tiny_setup()
    stats = collect_kfac(model, batches, progress=False)
    DG, groups = groups_of(model, EXAMPLE, ignored=[model.head])
    return model, stats, groups


def reference(parts, normalize):
    total = 0
    for scores, weight in parts:
        s = scores.double().numpy()
        if normalize == "rank":
            s = (rankdata(s) - 1) / (len(s) - 1)           # average ranks of ties, scaled to [0, 1]
        elif normalize == "sum":
            s = s / s.sum()
        total = total + weight * s
    return torch.as_tensor(total)


@pytest.mark.parametrize("normalize", ["rank", "sum", None])
def test_mix_with_torch_pruning_magnitude(setup, normalize):
    model, stats, groups = setup
    ours = KroneckerOBDImportance(stats, first_order="off")   # positive scores: "sum" is a share
    theirs = tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    mixed = CombinedImportance([(ours, 1.0), (theirs, 0.5)], normalize=normalize)
    for group in groups:
        expect = reference([(ours(group), 1.0), (theirs(group), 0.5)], normalize)
        torch.testing.assert_close(mixed(group).double(), expect, rtol=1e-5, atol=1e-9)


def test_rank_ties_and_range():
    group_scores = torch.tensor([3.0, 1.0, 3.0, 0.5])

    class Fixed(tp.importance.Importance):
        def __call__(self, group):
            return group_scores

    got = CombinedImportance([(Fixed(), 2.0)])(None)
    torch.testing.assert_close(got.double(), torch.tensor([2 * 2.5 / 3, 2 * 1 / 3, 2 * 2.5 / 3, 0.0],
                                                          dtype=torch.float64))


def test_skipping_criteria(setup):
    model, stats, groups = setup
    theirs = tp.importance.GroupMagnitudeImportance(normalizer=None)
    assert CombinedImportance([(SkipAll(), 1.0)])(groups[0]) is None
    alone = CombinedImportance([(theirs, 1.0)], normalize=None)(groups[0])
    with_skip = CombinedImportance([(SkipAll(), 3.0), (theirs, 1.0)], normalize=None)(groups[0])
    torch.testing.assert_close(with_skip, alone)


def test_drives_global_pruning():
    model, batches = tiny_setup(seed=1)
    stats = collect_kfac(model, batches, progress=False)
    imp = CombinedImportance([(KroneckerOBDImportance(stats), 1.0),
                              (tp.importance.GroupMagnitudeImportance(), 1.0)])
    params = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.BasePruner(model, EXAMPLE, importance=imp, pruning_ratio=0.25,
                                  global_pruning=True, ignored_layers=[model.head])
    pruner.step()
    assert model(EXAMPLE).shape == (1, 5)
    assert sum(p.numel() for p in model.parameters()) < params


def test_bad_arguments(setup):
    model, stats, groups = setup
    ours = KroneckerOBDImportance(stats)
    with pytest.raises(ValueError, match="normalize"):
        CombinedImportance([(ours, 1.0)], normalize="zscore")
    with pytest.raises(TypeError, match="not a torch_pruning Importance"):
        CombinedImportance([(lambda group: None, 1.0)])
    with pytest.raises(ValueError, match="non-negative"):
        CombinedImportance([(ours, -0.5)])
    with pytest.raises(ValueError, match="all weights are zero"):
        CombinedImportance([(ours, 0.0)])
    with pytest.raises(ValueError, match="at least one"):
        CombinedImportance([])
    with pytest.raises(TypeError, match="pair"):
        CombinedImportance([ours])
