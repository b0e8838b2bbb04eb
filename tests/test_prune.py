"""The one-call driver ``prune()``: budgets, criteria, report, rollback, argument errors.

References are independent of the code under test: parameter counts are ``Σ p.numel()``,
FLOPs come from Torch-Pruning's counter, the Torch-Pruning-criterion case is compared with
Torch-Pruning's own ``BasePruner``, rollback with a snapshot taken before the call.
"""
import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch_pruning as tp

import tp_eigendamage as ted
from _failing import FailingData, HardCoded
from tp_eigendamage import PruneArgumentError, PruningError

def n_params(model):
    return sum(p.numel() for p in model.parameters())


def n_flops(model, x):
    """Torch-Pruning's count, with timm's layer subclasses (``Linear``, ``BatchNormAct2d``)
    turned into their torch base classes first: Torch-Pruning matches exact types, so it would
    count them as zero."""
    from torch_pruning.utils.op_counter import MODULES_MAPPING

    model = copy.deepcopy(model)
    for m in model.modules():
        base = next(b for b in type(m).__mro__ if b in MODULES_MAPPING or b is nn.Module)
        if base is not nn.Module and base is not type(m):
            m.__class__ = base
    return tp.utils.count_ops_and_params(model, x)[0]


def batches(size, n=2, batch=4, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def timm_model(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()


def snapshot(model):
    return repr(model), [(n, type(m).__name__) for n, m in model.named_modules()], \
        {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    text, modules, state = before
    assert repr(model) == text
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), k


# -- budgets -----------------------------------------------------------------------------------
CASES = [  # (model, kwargs, size, method, target kind, value, rounds)
    ("resnet18", {}, 32, "eigendamage", "target_params", 0.6, 1),
    ("resnet18", {}, 32, "kron_obd", "target_flops", 0.5, 3),
    ("efficientnet_b0", {}, 32, "kron_obd", "target_params", 0.6, 3),
    ("efficientnet_b0", {}, 32, "fisher_diag", "target_flops", 0.5, 1),
]


@pytest.mark.parametrize("name,kwargs,size,method,kind,value,rounds", CASES)
def test_prune_reaches_target_within_two_percent(name, kwargs, size, method, kind, value, rounds):
    model = timm_model(name, **kwargs)
    x = torch.randn(2, 3, size, size)
    measure = (lambda m: n_params(m)) if kind == "target_params" else (lambda m: n_flops(m, x))
    cost0 = measure(model)
    out_shape = model(x).shape
    seen = []

    def finetune(m, r):   # gets prune()'s working copy, which moves into `model` on success
        assert m is not model and type(m) is type(model)
        seen.append((r, measure(m) / cost0))

    pruned, report = ted.prune(model, batches(size), x, method=method, iterative_steps=rounds,
                               finetune=finetune, progress=False, **{kind: value})
    assert pruned is model
    assert [r for r, _ in seen] == list(range(1, rounds + 1))
    for r, achieved in seen:   # round r aims at value^(r / rounds) of the original
        assert abs(achieved / value ** (r / rounds) - 1) <= 0.02, (r, achieved)
    with torch.no_grad():
        out = model(x)
    assert out.shape == out_shape and torch.isfinite(out).all()
    assert len(report.rounds) == rounds
    assert report.after.params == n_params(model)


# -- criteria ----------------------------------------------------------------------------------
class ConcatNet(nn.Module):
    """Two producers concatenated into one BatchNorm + consumer (DenseNet's pattern)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(3, 24, 3, padding=1)
        self.bn = nn.BatchNorm2d(40)
        self.c = nn.Conv2d(40, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        return self.head(torch.relu(self.c(x)).mean(dim=(2, 3)))


def concat_net():
    torch.manual_seed(0)
    model = ConcatNet().eval()
    with torch.no_grad():   # distinct BatchNorm statistics expose any channel mix-up
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("make,size,head", [(lambda: timm_model("resnet18"), 32, "fc"),
                                            (concat_net, 8, "head")], ids=["resnet18", "concat"])
def test_torch_pruning_importance_gives_torch_prunings_own_result(make, size, head):
    model = make()
    x = torch.randn(2, 3, size, size)
    reference = copy.deepcopy(model)
    pruner = tp.pruner.BasePruner(reference, x, importance=tp.importance.GroupMagnitudeImportance(),
                                  pruning_ratio=0.3, global_pruning=True,
                                  ignored_layers=[reference.get_submodule(head)])
    pruner.step()
    params0 = n_params(model)
    ted.prune(model, batches(size), x, method=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.3,
              ignored_layers=[model.get_submodule(head)], recalibrate_bn=False, progress=False)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert n_params(model) < 0.9 * params0


def test_groups_listed_once_are_torch_prunings_groups():
    """Listing a round's groups derives Torch-Pruning's index mappings once: the same groups
    (members, channels, root channels) as Torch-Pruning's own listing through a concatenation,
    and Torch-Pruning's mapping function is in place again afterwards."""
    from tp_eigendamage import _tp

    update = tp.dependency.index_mapping.update_index_mapping
    model, x = concat_net(), torch.randn(1, 3, 8, 8)
    names = {m: n for n, m in model.named_modules()}

    def listed(once):
        pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(),
                                      ignored_layers=[model.head])
        if once:
            _tp.list_groups_once(pruner)
        groups = pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types)
        return [[(names.get(item.dep.layer, type(item.dep.layer).__name__), item.dep.pruning_fn.__name__,
                  [int(i) for i in item.idxs], [None if r is None else int(r) for r in item.root_idxs])
                 for item in group] for group in groups]

    reference = listed(False)
    assert any(name == "_ConcatOp" for group in reference for name, *_ in group)
    assert listed(True) == reference
    assert tp.dependency.index_mapping.update_index_mapping is update


class SmallNet(nn.Module):
    """conv → bn → relu → conv → residual → grouped conv → pool → linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 1))
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.grouped(x + self.branch(x)))
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("method", ["eigendamage", "kron_obd", "kron_obs", "fisher_diag"])
def test_every_method_reaches_a_params_target_on_a_small_net(method):
    torch.manual_seed(0)
    model = SmallNet().eval()
    x = torch.randn(2, 3, 8, 8)
    params0 = n_params(model)
    ted.prune(model, batches(8), x, method=method, target_params=0.5, ignored_layers=[model.head],
              tolerance=0.05, progress=False)
    assert abs(n_params(model) / params0 / 0.5 - 1) <= 0.05
    assert model(x).shape == (2, 10) and model.head.out_features == 10


@pytest.mark.parametrize("make,size", [(lambda: timm_model("resnet18", zero_init_last=False), 16),
                                       (concat_net, 8)], ids=["resnet18", "concat"])
def test_shape_only_trials_cost_exactly_what_pruning_costs(make, size):
    """Twins (a copy of the round's pruner and of the groups it listed once, parameters counted
    without a forward) cost what the real model costs after the same pruning, also where a
    concatenation maps one group's indices through another's (DenseNet's pattern)."""
    x = torch.randn(1, 3, size, size)
    for kind, count in (("target_params", n_params), ("target_flops", lambda m: n_flops(m, x))):
        model = make()
        before = count(model)
        _, report = ted.prune(model, batches(size), x, progress=False, **{kind: 0.55})
        searched = report.rounds[0]["searched_fraction"]   # measured on the shape-only twin
        assert searched == count(model) / before           # ... is what the real model costs


def test_tie_break_is_skipped_only_where_it_changes_no_float32_score():
    """Scores far above the tie-break scale skip the magnitude term: the result is bit-for-bit
    ``raw + 1e-20 · magnitude`` computed in full; tiny scores get the term."""
    from tp_eigendamage._round import RoundImportance

    model = SmallNet().eval()
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    magnitude = tp.importance.GroupMagnitudeImportance(p=2, normalizer="max")
    for scale in (1.0, 1e-3, 1e-18):
        criterion = RoundImportance(lambda group: scale * magnitude(group), cap=1.0, initial={})
        criterion.attach(model)
        for group in DG.get_all_groups(ignored_layers=[model.head]):
            want = scale * magnitude(group) + RoundImportance.TIE_BREAK * magnitude(group)
            got = criterion(group)
            want[torch.topk(want, 1).indices] = float("inf")   # the one channel the cap keeps
            assert torch.equal(got, want)
            assert scale > 1e-12 or not torch.equal(got, scale * magnitude(group))


class DirectEigenDamage(ted.EigenDamageImportance):
    """EigenDamage as computed before the speed-ups, kept as the reference: a block's
    survivors found by matching its rotations against its bases every time, its outer-channel
    Kron-OBD from ``w = R_out W* R_in``, ``A``/``S`` and the outer mean gradient
    ``Ḡ = D Ḡ* Bᵀ`` formed in full from the basis rows."""

    def _prepare(self, model, graph):
        super()._prepare(model, graph)
        self.blocks = {getattr(b, role): (b, role) for b in model.modules() if isinstance(b, ted.KFEBlock)
                       for role in ("rotate_in", "rotate_out")}

    def _member_damage(self, module, reads, writes, side, stats):
        from tp_eigendamage._basis_matching import exact_indices
        from tp_eigendamage.damage import DamageTerms

        block, role = self.blocks.get(module, (None, None))
        if role is None or not ((role == "rotate_in" and reads and side == "consumer")
                                or (role == "rotate_out" and writes and side == "producer")):
            return super()._member_damage(module, reads, writes, side, stats)
        R_in, R_out = block.rotation_in_matrix().detach(), block.rotation_out_matrix().detach()
        channels_in, _ = exact_indices(R_in.T, block.basis_in)
        channels_out, _ = exact_indices(R_out, block.basis_out)
        core = block.core.weight.detach().double().flatten(2)
        w = torch.einsum("or,rsk,si->oik", R_out.double(), core, R_in.double())
        B, D = block.basis_in.double()[channels_in], block.basis_out.double()[channels_out]
        A = (B * block.eigen_in.double()) @ B.T
        S = (D * block.eigen_out.double()) @ D.T
        mean_grad = self._first_order(block.mean_grad)
        G = None if mean_grad is None else torch.einsum("or,rsk,is->oik", D, mean_grad.double(), B)
        if role == "rotate_in":   # ½ A_jj Σ_k w_:,j,kᵀ S w_:,j,k and −Σ Ḡ ⊙ w over input channel j
            return DamageTerms(0.5 * A.diagonal() * torch.einsum("ojk,op,pjk->j", w, S, w),
                               None if G is None else -(G * w).sum((0, 2)))
        return DamageTerms(0.5 * S.diagonal() * torch.einsum("ijk,jl,ilk->i", w, A, w),
                           None if G is None else -(G * w).sum((1, 2)))


@pytest.mark.parametrize("side", ["producer", "consumer"])
def test_fast_paths_prune_like_the_direct_computation(monkeypatch, side):
    """prune() with the speed-ups (survivors known without matching, outer-channel curvature in
    the eigenbasis, twins sharing one trace) gives the pruning of the direct computation, over
    two rounds (fresh blocks, then re-rotated ones): same shapes, damages to round-off."""
    from tp_eigendamage.methods import METHODS, Method, get_method

    eigendamage = get_method("eigendamage")
    for name, cls in (("fast", ted.EigenDamageImportance), ("direct", DirectEigenDamage)):
        monkeypatch.setitem(METHODS, name, Method(name, name, eigendamage.statistics,
                                                  lambda stats, cls=cls: cls(stats, side=side),
                                                  kfe=True, loss_units=True))
    results = {}
    for name in ("fast", "direct"):
        torch.manual_seed(0)
        model = SmallNet().eval()
        _, report = ted.prune(model, batches(8), torch.randn(2, 3, 8, 8), method=name, target_params=0.3,
                              iterative_steps=2, ignored_layers=[model.head], tolerance=0.05, progress=False)
        results[name] = ({k: v.shape for k, v in model.state_dict().items()}, report)
    (fast_shapes, fast), (direct_shapes, direct) = results["fast"], results["direct"]
    assert fast_shapes == direct_shapes
    assert [r["channel_ratio"] for r in fast.rounds] == [r["channel_ratio"] for r in direct.rounds]
    assert [r.name for r in fast.rows] == [r.name for r in direct.rows]
    for a, b in zip(fast.rows, direct.rows):
        assert a.after == b.after and a.predicted_damage == pytest.approx(b.predicted_damage, rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("side", ["producer", "consumer"])
def test_criterion_options_score_like_the_criterion_built_directly(side):
    """kron_obd with ``criterion_options={"side": side}`` prunes exactly like
    ``KroneckerOBDImportance(stats, side=side)`` built on the same statistics."""
    torch.manual_seed(0)
    model = SmallNet().eval()
    data, x = batches(8), torch.randn(2, 3, 8, 8)
    direct = copy.deepcopy(model)
    stats = ted.collect_kfac(direct, data, fisher_type="empirical", progress=False)
    ted.prune(direct, data, x, method=ted.KroneckerOBDImportance(stats, side=side), pruning_ratio=0.4,
              ignored_layers=[direct.head], progress=False)
    ted.prune(model, data, x, method="kron_obd", criterion_options={"side": side}, fisher_type="empirical",
              pruning_ratio=0.4, ignored_layers=[model.head], progress=False)
    ours, theirs = model.state_dict(), direct.state_dict()
    assert list(ours) == list(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_criterion_options_reach_every_round(monkeypatch):
    """Two rounds of eigendamage with ``criterion_options`` prune like a registered method whose
    criterion has those options built in, and unlike the defaults (so the options changed the
    scores of both rounds)."""
    from tp_eigendamage.methods import METHODS, Method, get_method

    options = {"side": "consumer", "first_order": "off"}
    eigendamage = get_method("eigendamage")
    monkeypatch.setitem(METHODS, "built_in", Method(
        "built_in", "built_in", eigendamage.statistics,
        lambda stats: ted.EigenDamageImportance(stats, **options), kfe=True, loss_units=True))
    results = {}
    for name, method, criterion_options in (("options", "eigendamage", options), ("built_in", "built_in", None),
                                            ("defaults", "eigendamage", None)):
        torch.manual_seed(0)
        model = SmallNet().eval()
        _, report = ted.prune(model, batches(8), torch.randn(2, 3, 8, 8), method=method,
                              criterion_options=criterion_options, fisher_type="empirical", target_params=0.3,
                              iterative_steps=2, ignored_layers=[model.head], tolerance=0.05, progress=False)
        results[name] = ([r.after for r in report.rows], [r["predicted_damage"] for r in report.rounds])
    assert results["options"] == results["built_in"]
    assert all(a != b for a, b in zip(results["options"][1], results["defaults"][1]))


class DataDependent(nn.Module):
    """A forward with value-dependent control flow: cannot run on the meta device."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 64, 3, padding=1)
        self.b = nn.Conv2d(64, 64, 3, padding=1)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        x = torch.relu(self.a(x))
        if bool(x.sum() > -1):
            x = torch.relu(self.b(x))
        return self.head(x.mean(dim=(2, 3)))


def test_models_that_cannot_run_on_meta_are_measured_on_real_copies():
    torch.manual_seed(0)
    model = DataDependent().eval()
    x = torch.randn(2, 3, 8, 8)
    params0 = n_params(model)
    ted.prune(model, batches(8, classes=4), x, method="kron_obd", target_params=0.6,
              ignored_layers=[model.head], progress=False)
    assert abs(n_params(model) / params0 / 0.6 - 1) <= 0.02


class WideConvNet(nn.Module):
    """Convolutions wide enough that their arithmetic, not Python, dominates a forward pass."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 64, 3, padding=1)
        self.b = nn.Conv2d(64, 128, 3, padding=1)
        self.c = nn.Conv2d(128, 128, 3, padding=1)
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.a(x))))
        return self.head(torch.relu(self.c(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("method", ["kron_obd", "eigendamage"])
def test_latency_target_is_searched_on_timed_real_copies(method):
    """The search's own guarantee: the trial it stops at was timed within ``tolerance`` of the
    target (whether the final model lands there too is a timing question for
    benchmarks/latency.py). EigenDamage's blocks take the forms timed fastest."""
    torch.manual_seed(0)
    model, x = WideConvNet().eval(), torch.randn(1, 3, 32, 32)
    _, report = ted.prune(model, batches(32), x, method=method, target_latency=0.6, tolerance=0.1,
                          progress=False)
    (round_,) = report.rounds
    assert abs(round_["searched_fraction"] / 0.6 - 1) <= 0.1 and round_["search_trials"] >= 1
    assert report.target == {"target_latency": 0.6} and "keep 60% of the measured latency" in str(report)
    assert report.latency_fraction is not None and report.timings["latency"] > 0
    assert report.params_fraction < 1 and report.flops_fraction < 1


# -- report ------------------------------------------------------------------------------------
def test_report_rows_totals_and_table():
    model = timm_model("resnet18")
    x = torch.randn(1, 3, 32, 32)
    params0 = n_params(model)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    _, report = ted.prune(model, batches(32), x, target_params=0.6, progress=False)
    assert [r.name for r in report.rows] == layers
    assert report.before.params == params0 and report.after.params == n_params(model)
    for row in report.rows:
        module = model.get_submodule(row.name)
        assert row.after.params == sum(p.numel() for p in module.parameters())
        assert math.isfinite(row.predicted_damage)  # < 0: removing it lowers the training loss
    assert sum(r.after.params for r in report.rows) < sum(r.before.params for r in report.rows)
    forms = [m.form if isinstance(m, ted.TwoLayerForm) else "kfe" for m in model.modules()
             if isinstance(m, (ted.KFEBlock, ted.TwoLayerForm))]
    assert report.kfe_block_forms == {f: forms.count(f) for f in set(forms)}
    assert report.kfe_blocks_kept == len(forms) and report.kfe_blocks_built == len(forms) + report.kfe_blocks_folded
    text = str(report)
    assert "layer" in text and "shape before" in text and "pred. Δloss" in text
    assert "keep 60% of the parameters" in text and "eigen-directions between the two rotations" in text
    assert report.to_dict()["target"] == {"target_params": 0.6}
    latency = report.to_dict()["latency"]               # measured for every target
    assert latency["before_s"] > 0 and latency["after_s"] > 0 and latency["clock"] == "cpu"
    assert latency["fraction"] == report.latency_after / report.latency_before
    assert "latency on example_inputs" in text
    assert all(name in text for name in layers)
    assert f"{params0:,}" in text and f"{n_params(model):,}" in text


# -- rollback ----------------------------------------------------------------------------------
class Boom(Exception):
    pass


def test_failure_in_a_later_round_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model = SmallNet().eval()
    x = torch.randn(2, 3, 8, 8)
    before = snapshot(model)
    structures = []

    def finetune(m, r):
        structures.append(repr(m))
        if r == 2:
            raise Boom()

    with pytest.raises(Boom):
        ted.prune(model, batches(8), x, pruning_ratio=0.5, iterative_steps=3, finetune=finetune,
                  ignored_layers=[model.head], progress=False)
    assert len(structures) == 2 and structures[1] != before[0]   # it had really been pruned
    assert_unchanged(model, before)
    assert model(x).shape == (2, 10)


def test_failure_during_statistics_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model = SmallNet().eval()
    x = torch.randn(2, 3, 8, 8)
    before = snapshot(model)
    data = FailingData(batches(8), Boom())
    with pytest.raises(Boom):
        ted.prune(model, data, x, method="eigendamage", pruning_ratio=0.5, iterative_steps=2,
                  ignored_layers=[model.head], progress=False)
    assert data.passes == 2
    assert_unchanged(model, before)


def test_model_torch_pruning_breaks_gives_a_clear_error_and_no_change():
    torch.manual_seed(0)
    model = HardCoded().eval()
    x = torch.randn(2, 3, 8, 8)
    before = snapshot(model)
    with pytest.raises(PruningError, match=r"running the pruned model failed.*'head' \(Linear\)"):
        ted.prune(model, batches(8, classes=4), x, method="kron_obd", pruning_ratio=0.5,
                  ignored_layers=[model.head], progress=False)
    assert_unchanged(model, before)


# -- bad arguments -----------------------------------------------------------------------------
class Untouchable:
    def __iter__(self):
        raise AssertionError("prune() started work despite bad arguments")


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_params=0.5, target_flops=0.5), "exactly one"),
    (dict(target_flops=0.5, target_latency=0.5), "exactly one"),
    (dict(target_latency=1.2), "strictly between 0 and 1"),
    (dict(target_params=0.5, form_cost="speed"), "form_cost"),
    (dict(), "exactly one"),
    (dict(target_params=1.0), "strictly between 0 and 1"),
    (dict(target_flops=0.0), "strictly between 0 and 1"),
    (dict(pruning_ratio=-0.2), "strictly between 0 and 1"),
    (dict(target_params=0.5, method="magnitud"), "choose one of"),
    (dict(target_params=0.5, tolerance=-1), "tolerance"),
    (dict(target_params=0.5, finetune="yes"), "callable"),
    (dict(target_params=0.5, iterative_steps=0), "positive integer"),
    (dict(target_params=0.5, max_layer_ratio=1.5), "max_layer_ratio"),
    (dict(target_params=0.5, max_pruning_ratio=0.5), "set by prune"),
    (dict(target_params=0.5, importance=tp.importance.GroupMagnitudeImportance()), "set by prune"),
    (dict(target_params=0.5, ignored_layers=[nn.Linear(2, 2)]), "not a submodule"),
    (dict(target_params=0.5, criterion_options={"sid": "consumer"}), "'sid' .did you mean 'side'.*accepts side="),
    (dict(target_params=0.5, criterion_options={"side": "consumr"}), "did you mean 'consumer'"),
    (dict(target_params=0.5, criterion_options={"first_order": "of"}), "did you mean 'off'"),
    (dict(target_params=0.5, method="kron_obs", criterion_options={"damping": -1}), "non-negative"),
    (dict(target_params=0.5, criterion_options=["side"]), "must be a dict"),
    (dict(target_params=0.5, method="magnitude", criterion_options={"side": "consumer"}), "takes none"),
    (dict(target_params=0.5, method=tp.importance.GroupMagnitudeImportance(),
          criterion_options={"side": "consumer"}), "takes none"),
])
def test_bad_arguments_fail_before_any_work(kwargs, message):
    model = SmallNet()
    before = snapshot(model)
    with pytest.raises(PruneArgumentError, match=message):
        ted.prune(model, Untouchable(), torch.randn(1, 3, 8, 8), progress=False, **kwargs)
    assert_unchanged(model, before)


# -- the budget search -------------------------------------------------------------------------
def test_search_lands_on_smooth_and_on_late_dropping_curves():
    from tp_eigendamage.budget import search_ratio

    calls = []

    def quadratic(r):
        calls.append(r)
        return (1 - r) ** 2

    r, f, p = search_ratio(quadratic, 0.6, start=1.0)
    assert abs(f / 0.6 - 1) <= 0.02 and len(calls) == 1 and p == pytest.approx(2)

    def late(r):   # flat, then steep: what KFE bottlenecks that only pay when small look like
        return 1.0 if r < 0.3 else (1 - (r - 0.3) / 0.7) ** 3

    r, _, _ = search_ratio(late, 0.5, start=1.0)
    assert abs(late(r) / 0.5 - 1) <= 0.02


def test_search_reports_a_jump_it_cannot_land_in():
    from tp_eigendamage import TargetUnreachableError
    from tp_eigendamage.budget import search_ratio

    with pytest.raises(TargetUnreachableError, match=r"jumps from 1\.000 .* to 0\.300"):
        search_ratio(lambda r: 1.0 if r < 0.5 else 0.3, 0.6, start=1.0)
    with pytest.raises(TargetUnreachableError, match="out of reach"):
        search_ratio(lambda r: 0.9, 0.6, start=1.0, max_ratio=0.5)


def test_timm_layer_subclasses_are_counted_like_their_torch_base():
    model = timm_model("mobilenetv3_small_100")
    x = torch.randn(1, 3, 32, 32)
    _, report = ted.prune(model, batches(32), x, pruning_ratio=0.1, method="magnitude", progress=False)
    head = next(r for r in report.rows if r.name == "classifier")    # a timm.layers.Linear
    plain = nn.Linear(head.before.in_channels, head.before.out_channels)
    assert head.before.flops == n_flops(plain, torch.randn(1, head.before.in_channels)) > 0


class LayerScaled(nn.Module):
    """A per-channel scale outside any layer Torch-Pruning knows (like ConvNeXt's gamma)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.unique_scale_for_warning_test = nn.Parameter(torch.ones(16, 1, 1))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head((self.conv(x) * self.unique_scale_for_warning_test).mean(dim=(2, 3)))


def test_unwrapped_parameter_warning_is_shown_once_with_its_name():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            torch.manual_seed(0)
            model = LayerScaled().eval()
            ted.prune(model, batches(8, classes=4), torch.randn(1, 3, 8, 8), target_params=0.7,
                      method="kron_obd", tolerance=0.1, progress=False)
    about = [w for w in caught if "unique_scale_for_warning_test" in str(w.message)]
    assert len(about) == 1 and "unwrapped_parameters" in str(about[0].message)


def test_nan_scores_count_as_zero_with_a_warning():
    """Torch-Pruning's Taylor importance is 0/0 = NaN for channels behind timm's zero-initialised
    last BatchNorm; the target is still reached, with one warning naming the groups."""
    import warnings

    model = timm_model("resnet18")
    x = torch.randn(1, 3, 32, 32)
    flops0 = n_flops(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ted.prune(model, batches(32), x, target_flops=0.3, method="taylor", progress=False)
    assert abs(n_flops(model, x) / flops0 / 0.3 - 1) <= 0.02
    nan = [w for w in caught if "NaN scores" in str(w.message)]
    assert len(nan) == 1 and "layer1.0.conv1" in str(nan[0].message)
