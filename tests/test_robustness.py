"""What ``prune()`` promises about the user's model, and that every bad input gets a package
error naming the fix (the README's "Guarantees"). One table row per case.

References are independent of the code under test: object identity and values snapshot
before the call, hook call counts, the unfrozen model's pruned shape, brute-force K-FAC
factors, and an equivalent Conv2d for a Linear reading a flattened map.
"""
import itertools
import math
import os
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tp_eigendamage as ted
from _failing import FailingData, HardCoded
from tp_eigendamage import (FisherInputError, InvalidArgumentError, KFACError, KFEError, PruneArgumentError,
                            PruningError, TargetUnreachableError, TPEigenDamageError)
from tp_eigendamage.cli import main
from tp_eigendamage.testing import DigitsNet

pytestmark = pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")


def batches(n=2, size=8, channels=1, classes=10, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, channels, size, size, generator=g),
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]


def digits_net(seed=0):
    torch.manual_seed(seed)
    return DigitsNet().eval()


X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


class Boom(Exception):
    pass


# -- what the user holds: a snapshot of every object, value, gradient, flag, mode and hook -------
class Held:
    """Everything of ``model`` a failed ``prune()`` must leave exactly as it was, plus an
    optimizer built before the call."""

    def __init__(self, model):
        self.model = model
        loss = F.cross_entropy(model(X), torch.tensor([1, 2]))
        loss.backward()                                            # real .grad on trainable parameters
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        self.modules = list(model.named_modules())
        self.params = list(model.named_parameters())
        self.buffers = list(model.named_buffers())
        self.values = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.grads = [(p.grad, None if p.grad is None else p.grad.clone()) for _, p in self.params]
        self.flags = [p.requires_grad for _, p in self.params]
        self.modes = [m.training for _, m in self.modules]
        self.hook_tables = [(m._forward_hooks, dict(m._forward_hooks)) for _, m in self.modules]

    def assert_kept(self):
        model = self.model
        assert all(a is b for (_, a), (_, b) in zip(model.named_modules(), self.modules))
        assert [n for n, _ in model.named_modules()] == [n for n, _ in self.modules]
        assert all(a is b for (_, a), (_, b) in zip(model.named_parameters(), self.params))
        assert all(a is b for (_, a), (_, b) in zip(model.named_buffers(), self.buffers))
        for k, v in model.state_dict().items():
            assert torch.equal(v, self.values[k]), k
        for (_, p), (grad, value), flag in zip(model.named_parameters(), self.grads, self.flags):
            assert p.grad is grad and (grad is None or torch.equal(grad, value)) and p.requires_grad == flag
        assert [m.training for m in model.modules()] == self.modes
        assert all(m._forward_hooks is table and dict(m._forward_hooks) == entries
                   for m, (table, entries) in zip(model.modules(), self.hook_tables))
        # the optimizer built before still trains THIS model
        before = [p.detach().clone() for p in model.parameters()]
        assert all(a is b for a, b in zip(self.optimizer.param_groups[0]["params"], model.parameters()))
        self.optimizer.step()
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def frozen_mixed_hooked(model):
    """Some modules in train mode, a frozen layer, a forward hook: all must survive a failure."""
    first, second, third = list(model.children())[:3]
    model.train()
    second.eval()
    third.requires_grad_(False)
    first.register_forward_hook(lambda m, i, o: None)
    return model


def _finetune_fails_in_round_2(m, r):
    if r == 2:
        raise Boom()


FAILURES = [  # (id, model, prune kwargs, data, error)
    ("no batches at all", digits_net, dict(method="kron_obd"), [], KFACError),
    ("finetune fails in round 2", digits_net,
     dict(method="eigendamage", iterative_steps=2, finetune=_finetune_fails_in_round_2), batches(), Boom),
    ("interrupted during round 2 statistics", digits_net, dict(method="eigendamage", iterative_steps=2),
     FailingData(batches(), KeyboardInterrupt()), KeyboardInterrupt),
    ("Torch-Pruning breaks the model", lambda: HardCoded(in_channels=1, classes=10).eval(),
     dict(method="kron_obd"), batches(), PruningError),
]


@pytest.mark.parametrize("make,kwargs,data,error", [pytest.param(*row[1:], id=row[0]) for row in FAILURES])
def test_failure_keeps_the_users_objects(make, kwargs, data, error):
    held = Held(frozen_mixed_hooked(make()))
    with pytest.raises(error):
        ted.prune(held.model, data, X, pruning_ratio=0.5, progress=False, **kwargs)
    held.assert_kept()


# -- success: one pruned model with mixed modes, frozen layers and hooks, shared by rows -------
class Calls:
    def __init__(self):
        self.n = 0

    def __call__(self, *args):
        self.n += 1


FROZEN = ("stem", "bn0", "c1")


@pytest.fixture(scope="module")
def pruned():
    """DigitsNet, eigendamage to 25 % of its parameters: c1 stays a KFE block (in three or two
    layers), the stem is folded back; modes mixed, the stem and c1 frozen, hooks on the model,
    c1 and the stem."""
    model = digits_net().train()
    model.bn1.eval()
    model.c3.eval()
    for name in FROZEN:
        model.get_submodule(name).requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    calls = {k: Calls() for k in ("model", "c1", "c1 pre", "stem")}
    handles = {"model": model.register_forward_hook(calls["model"]),
               "c1": model.c1.register_forward_hook(calls["c1"]),
               "c1 pre": model.c1.register_forward_pre_hook(calls["c1 pre"]),
               "stem": model.stem.register_forward_hook(calls["stem"])}
    result, report = ted.prune(model, batches(), X, method="eigendamage", target_params=0.25,
                               tolerance=0.05, progress=False)
    assert result is model and isinstance(model.c1, KEPT_BLOCK) and type(model.stem) is nn.Conv2d
    assert report.kfe_blocks_built > len(ted.kfe_blocks(model))   # some folded back
    return dict(model=model, modes=modes, calls=calls, handles=handles)


#: A kept KFE block: three layers, or two (tp_eigendamage.forms).
KEPT_BLOCK = (ted.KFEBlock, ted.TwoLayerForm)


def _original_name(name, originals):
    while name not in originals:
        name = name.rpartition(".")[0]
    return name


def success_modes_are_kept_new_modules_take_their_layers(pruned):
    model, modes = pruned["model"], pruned["modes"]
    for name, m in model.named_modules():
        assert m.training == modes[_original_name(name, modes)], name
    assert next(model.c1.children()).training and not model.c3.training   # rotate_in / first


def success_frozen_layers_stay_frozen_kfe_parts_included(pruned):
    model = pruned["model"]
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith(FROZEN)), name
    inner = model.c1.width if isinstance(model.c1, ted.TwoLayerForm) else model.c1.core.out_channels
    assert inner < 16                                # the frozen c1 (a KFE block now) was pruned


def success_hooks_follow_rewritten_and_folded_layers(pruned):
    model, calls, handles = pruned["model"], pruned["calls"], pruned["handles"]
    counts = {k: c.n for k, c in calls.items()}
    with torch.no_grad():
        model(X)
    assert all(calls[k].n == counts[k] + 1 for k in calls)       # each fired once on one call
    for handle in handles.values():
        handle.remove()                                          # the user's handles still work
    with torch.no_grad():
        model(X)
    assert all(calls[k].n == counts[k] + 1 for k in calls)


@pytest.mark.parametrize("check", [success_modes_are_kept_new_modules_take_their_layers,
                                   success_frozen_layers_stay_frozen_kfe_parts_included,
                                   success_hooks_follow_rewritten_and_folded_layers],
                         ids=lambda f: f.__name__)
def test_success_keeps_modes_flags_hooks(pruned, check):
    check(pruned)


@pytest.mark.parametrize("mode", [True, False], ids=["train-mode model", "eval-mode model"])
def test_every_module_keeps_the_mode_of_the_model(mode):
    model = digits_net().train(mode)
    ted.prune(model, batches(), X, method="eigendamage", target_params=0.5, tolerance=0.05, progress=False)
    assert {m.training for m in model.modules()} == {mode}
    assert any(isinstance(m, KEPT_BLOCK) for m in model.modules())


# -- frozen layers: pruned like any other, still frozen, with every method ------------------
class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def _chain_pruned(method, frozen):
    torch.manual_seed(0)
    model = Chain().eval()
    if frozen:
        model.conv1.requires_grad_(False)
        model.bn1.requires_grad_(False)
    ted.prune(model, batches(), X, method=method, pruning_ratio=0.5, global_pruning=False, progress=False)
    return model


@pytest.mark.parametrize("method", list(ted.METHODS))
def test_frozen_layers_are_pruned_like_any_other_and_stay_frozen(method):
    reference = _chain_pruned(method, frozen=False)
    model = _chain_pruned(method, frozen=True)
    shapes = lambda m: [(n, tuple(p.shape)) for n, p in m.named_parameters()]  # noqa: E731
    assert shapes(model) == shapes(reference)       # freezing changes nothing about what is removed
    assert model.bn1.num_features == 8              # the frozen prefix lost half its channels
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith(("conv1", "bn1"))), name


# -- outputs are never pruned ---------------------------------------------------------------
class HeadFirst(nn.Module):
    """The head is registered FIRST; the last Linear registered is a hidden layer."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 10)
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.hidden = nn.Linear(16, 16)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(self.body(x).mean((2, 3)))))


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(1, 16, 3, padding=1)
        self.logits = nn.Linear(16, 10)
        self.aux = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.body(x)).mean((2, 3))
        return self.logits(h), self.aux(h)


class FeatureMap(nn.Module):
    """Outputs a residual feature map: the stream's producers are output layers too."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.inner = nn.Conv2d(8, 16, 3, padding=1)
        self.back = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        return x + self.back(torch.relu(self.inner(x)))


OUTPUTS = [  # (id, model, method, {layer: out channels kept})
    ("head registered first", HeadFirst, "kron_obd", {"head": 10}),
    ("two outputs", TwoHeads, "fisher_diag", {"logits": 10, "aux": 3}),
    ("feature map output", FeatureMap, "magnitude", {"stem": 8, "back": 8}),
]


def _first_output_loss(outputs, targets):
    outputs = outputs[0] if isinstance(outputs, tuple) else outputs
    return F.cross_entropy(outputs, targets, reduction="none")


def _first_output_sampler(outputs):
    return ted.sample_categorical(outputs[0] if isinstance(outputs, tuple) else outputs)


@pytest.mark.parametrize("make,method,kept", [pytest.param(*row[1:], id=row[0]) for row in OUTPUTS])
def test_output_channels_are_never_pruned(make, method, kept):
    torch.manual_seed(0)
    model = make().eval()
    params = sum(p.numel() for p in model.parameters())
    ted.prune(model, batches(), X, method=method, pruning_ratio=0.5, global_pruning=False, progress=False,
              loss_fn=_first_output_loss, sample_fn=_first_output_sampler)   # every other layer loses half
    assert {name: model.get_submodule(name).weight.shape[0] for name in kept} == kept
    assert sum(p.numel() for p in model.parameters()) < 0.8 * params     # hidden channels went


@pytest.mark.parametrize("kwargs", [dict(pruning_ratio=0.5), dict(target_params=0.5)], ids=["ratio", "target"])
def test_a_model_with_only_output_layers_is_refused(kwargs):
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 10))
    values = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TargetUnreachableError, match=r"nothing can be pruned.*outputs.*'1'"):
        ted.prune(model, [(torch.randn(4, 3, 4, 4), torch.randint(0, 10, (4,)))], torch.randn(1, 3, 4, 4),
                  method="kron_obd", progress=False, **kwargs)
    assert model[1].out_features == 10 and all(torch.equal(v, model.state_dict()[k]) for k, v in values.items())


# -- hooks through the public KFE rewrite ---------------------------------------------------
def test_to_kfe_and_fold_carry_call_hooks_and_warn_about_state_dict_hooks():
    model = digits_net()
    stats = ted.collect_kfac(model, batches(), progress=False)
    calls, pre = Calls(), Calls()
    handle = model.c1.register_forward_hook(calls)
    model.c1.register_forward_pre_hook(pre)
    model.c2._register_state_dict_hook(lambda *args: None)
    with pytest.warns(UserWarning, match="'c2' has state-dict hooks"):
        ted.to_kfe(model, stats)
    model(X)
    assert isinstance(model.c1, ted.KFEBlock) and (calls.n, pre.n) == (1, 1)
    ted.fold_kfe(model, only_unprofitable=False)
    model(X)
    assert type(model.c1) is nn.Conv2d and (calls.n, pre.n) == (2, 2)
    handle.remove()
    model(X)
    assert (calls.n, pre.n) == (2, 3)


# -- torch.compile ----------------------------------------------------------------------------
def _compiled_wrapper():
    model = digits_net()
    compiled = torch.compile(model, backend="eager")
    compiled(X)
    return compiled, model


def _compiled_in_place():
    model = digits_net()
    model.compile(backend="eager")
    model(X)
    return model, model


@pytest.mark.parametrize("make,warning", [(_compiled_wrapper, r"torch.compile'd model.*_orig_mod"),
                                          (_compiled_in_place, r"compiled in place")],
                         ids=["torch.compile(model)", "model.compile()"])
def test_compiled_models_are_pruned_eagerly(make, warning):
    given, inner = make()
    params = sum(p.numel() for p in inner.parameters())
    with pytest.warns(UserWarning, match=warning):
        result, report = ted.prune(given, batches(), X, method="eigendamage", target_params=0.5,
                                   tolerance=0.05, progress=False)
    assert result is inner and inner._compiled_call_impl is None
    assert report.before.flops > 0 and report.before.params == params
    assert abs(sum(p.numel() for p in inner.parameters()) / params / 0.5 - 1) <= 0.05
    assert result(X).shape == (2, 10)


def test_a_compiled_submodule_is_refused_up_front():
    model = digits_net()
    model.c1 = torch.compile(model.c1, backend="eager")   # never run: refused before any work
    held = Held(model)
    with pytest.raises(PruneArgumentError, match=r"'c1' is a torch.compile'd submodule.*_orig_mod"):
        ted.prune(model, batches(), X, method="kron_obd", pruning_ratio=0.5, progress=False)
    held.assert_kept()


# -- bad input gets our error, naming the fix ---------------------------------------------------
def _overflowing_linear():
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.fill_(3e38)          # finite, but the logits overflow to inf
    return model


def _nan_in_fc_bias():
    model = digits_net()
    with torch.no_grad():
        model.fc.bias[0] = float("nan")
    return model


def _targets_of(labels, n=8):
    return [(torch.randn(n, 1, 8, 8), labels)]


def _regression_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def _endless_with_warning_check():
    """An endless iterator that checks the warning was given before its first batch."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def endless():
            assert any("num_batches" in str(w.message) for w in caught), "no warning before the first batch"
            for i in itertools.count():
                if i == 2:
                    raise Boom()
                yield batches(1)[0]

        ted.collect_kfac(digits_net(), endless(), progress=False)


def _exhausted_generator():
    data = (b for b in batches())
    list(data)
    ted.collect_kfac(digits_net(), data, progress=False)


def _save_to_directory(tmp_path):
    ted.save(digits_net(), str(tmp_path))


def _lambda_in_metadata(tmp_path):
    ted.save(digits_net(), str(tmp_path / "m.pt"), metadata={"transform": lambda x: x})


def _classifier_only_to_kfe():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 10))
    ted.to_kfe(model, ted.collect_kfac(model, [torch.randn(4, 3, 4, 4)], progress=False))


def _classifier_only_prune():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 10))
    ted.prune(model, [torch.randn(4, 3, 4, 4)], torch.randn(1, 3, 4, 4), method="eigendamage",
              pruning_ratio=0.5, progress=False)


def _kfac(model, data, **kwargs):
    return lambda tmp_path: ted.collect_kfac(model(), data, progress=False, **kwargs)


def _prune(data, **kwargs):
    return lambda tmp_path: ted.prune(digits_net(), data, X, progress=False, **{"pruning_ratio": 0.5, **kwargs})


def _plain(fn):
    return lambda tmp_path: fn()


BAD_INPUT = [  # (id, call(tmp_path), error, message naming the problem and the fix)
    ("non-finite logits, true Fisher", _kfac(_overflowing_linear, [torch.ones(2, 4)]),
     FisherInputError, r"outputs hold NaN or Inf in batch 0.*overflowed"),
    ("non-finite logits, diagonal Fisher",
     lambda tmp_path: ted.collect_fisher_diag(_overflowing_linear(), [torch.ones(2, 4)], progress=False),
     FisherInputError, r"outputs hold NaN or Inf"),
    ("NaN in fc.bias, empirical Fisher", _kfac(_nan_in_fc_bias, batches(), fisher_type="empirical"),
     KFACError, r"parameter 'fc\.bias' holds NaN"),
    ("label out of range", _kfac(digits_net, _targets_of(torch.tensor([26, 1, 2, 3, 4, 5, 6, 7])),
                                 fisher_type="empirical"),
     FisherInputError, r"label 26 is outside \[0, 10\).*num_classes"),
    ("float labels to cross entropy", _kfac(digits_net, _targets_of(torch.rand(8)), fisher_type="empirical"),
     FisherInputError, r"torch.float32.*integer class labels.*loss_fn="),
    ("every label is the ignore index", _kfac(digits_net, _targets_of(torch.full((8,), -100)),
                                              fisher_type="empirical"),
     FisherInputError, r"label -100 is outside.*dropped from the batch"),
    ("float (N, 3) targets, default loss",
     _kfac(_regression_net, [(torch.randn(8, 1, 8, 8), torch.randn(8, 3))], fisher_type="empirical"),
     FisherInputError, r"cross entropy with integer class labels.*loss_fn=tp_eigendamage.gaussian_nll"),
    ("gaussian_nll shapes that do not match",
     lambda tmp_path: ted.gaussian_nll(torch.zeros(4, 2), torch.zeros(4, 3)),
     FisherInputError, r"\(4, 2\).*\(4, 3\).*must match"),
    ("data=None, collect_kfac", _kfac(digits_net, None), KFACError, r"NoneType, not an iterable of batches"),
    ("data=None, prune", _prune(None, method="kron_obd"), PruneArgumentError, r"NoneType, not an iterable"),
    ("a tensor as data", _kfac(digits_net, torch.randn(8, 1, 8, 8)), KFACError, r"single tensor"),
    ("one-shot generator, iterative_steps=2",
     _prune((b for b in batches()), method="kron_obd", iterative_steps=2), PruneArgumentError,
     r"one-shot iterator \(generator\).*iterative_steps=2.*list of batches"),
    ("a used-up generator", _plain(_exhausted_generator), KFACError, r"one-shot iterator.*already used up"),
    ("tolerance=-1", _prune(batches(), target_params=0.5, pruning_ratio=None, tolerance=-1),
     PruneArgumentError, r"tolerance=-1 must be in \(0, 1\)"),
    ("max_factor_dim=0", _kfac(digits_net, batches(), max_factor_dim=0), KFACError, r"max_factor_dim=0"),
    ("save to a directory", _save_to_directory, InvalidArgumentError, r"is a directory; give a file path"),
    ("a lambda in metadata", _lambda_in_metadata, InvalidArgumentError, r"the metadata cannot be pickled"),
    ("only a classifier, to_kfe", _plain(_classifier_only_to_kfe), KFEError,
     r"'1' is the classifier \(pass include_classifier=True to rewrite it\)$"),
    ("only a classifier, prune eigendamage", _plain(_classifier_only_prune), TargetUnreachableError,
     r"nothing can be pruned"),
]


@pytest.mark.parametrize("call,error,message", [pytest.param(*row[1:], id=row[0]) for row in BAD_INPUT])
def test_bad_input_gets_a_package_error_naming_the_fix(call, error, message, tmp_path):
    with pytest.raises(error, match=message) as info:
        call(tmp_path)
    assert isinstance(info.value, TPEigenDamageError)
    assert os.listdir(tmp_path) == []            # nothing half-written


def test_an_endless_iterator_is_warned_about_before_the_first_batch():
    with pytest.raises(Boom):
        _endless_with_warning_check()


# -- gaussian_nll: shapes aligned explicitly, checked against the brute-force S -------------------
class Regressor(nn.Module):
    def __init__(self, squeeze):
        super().__init__()
        self.body, self.out, self.squeeze = nn.Linear(5, 6), nn.Linear(6, 1), squeeze

    def forward(self, x):
        y = self.out(torch.tanh(self.body(x)))
        return y.squeeze(1) if self.squeeze else y


@pytest.mark.parametrize("squeeze", [False, True], ids=["(N, 1) outputs, (N,) targets", "(N,) outputs"])
def test_gaussian_nll_is_per_example_whatever_the_output_shape(squeeze):
    torch.manual_seed(0)
    model = Regressor(squeeze)
    x, t = torch.randn(12, 5), torch.randn(12)
    stats = ted.collect_kfac(model, [(x, t)], fisher_type="empirical", loss_fn=ted.gaussian_nll, progress=False)
    with torch.no_grad():
        residual = model.out(torch.tanh(model.body(x)))[:, 0] - t    # g = ∂ℓ_n/∂s for ℓ_n = ½ (s − t)²
    assert torch.allclose(stats[model.out].grad_factor, residual.square().mean().reshape(1, 1), rtol=1e-5)


# -- the command line -------------------------------------------------------------------------------
TINY = ["--model", "resnet10t", "--image-size", "16", "--epochs", "1", "--max-train-batches", "1",
        "--batch-size", "16", "--stat-batches", "1", "--no-progress"]


def _junk_file(tmp_path):
    (tmp_path / "junk.pt").write_text("not a model")
    return str(tmp_path / "junk.pt")


def _full_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "report.json").write_text("{}")
    return str(out)


CLI = [  # (id, extra args(tmp_path), message)
    ("--out holds files", lambda p: ["--out", _full_out(p)], r"--out .* is not empty \(it holds report.json\).*--overwrite"),
    ("--checkpoint is not a model file", lambda p: ["--checkpoint", _junk_file(p), "--out", str(p / "o")],
     r"--checkpoint: .* is not a tp_eigendamage model file"),
    ("--overwrite lets a full --out through", lambda p: ["--out", _full_out(p), "--overwrite", "--checkpoint",
                                                          _junk_file(p)], r"--checkpoint: "),
    ("--image-size 4", lambda p: ["--image-size", "4", "--out", str(p / "o")], r"--image-size 4 is smaller than the 8x8"),
    ("--finetune-epochs -1", lambda p: ["--finetune-epochs", "-1", "--out", str(p / "o")],
     r"--finetune-epochs must be >= 0"),
]


@pytest.mark.parametrize("args,message", [pytest.param(*row[1:], id=row[0]) for row in CLI])
def test_command_line_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    code = main(TINY + args(tmp_path))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    if (tmp_path / "out").exists():
        assert (tmp_path / "out" / "report.json").read_text() == "{}"


# -- huge layers: factors bounded by max_factor_dim ---------------------------------------------
def test_vgg11_first_classifier_layer_gets_channel_structured_factors():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vgg11(num_classes=10).eval()
    fc1 = model.classifier[0]                                     # Linear(512·7·7 = 25088, 4096)
    data = [(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))]
    stats = ted.collect_kfac(model, data, modules=[fc1], progress=False)
    f = stats[fc1]
    assert f.flattened_positions == 49 and f.input_factor.shape == (512, 512)
    factors = [f.input_sum, f.input_mean_sum, f.grad_sum]
    stored = sum(t.numel() * t.element_size() for t in factors)
    dense = 4 * 25088 ** 2                                        # the 25088² float32 A it replaces
    assert stored < 80 * 2 ** 20 < dense / 25                     # 65 MiB (mostly the 4096² S) vs 2.3 GiB
    assert f.mean_grad.numel() == fc1.weight.numel()              # Ḡ: one weight-sized buffer


class FlattenHead(nn.Module):
    """conv → flatten → Linear, and the same Linear as a conv with an H×W kernel."""

    def __init__(self, channels=6, size=4, out=5):
        super().__init__()
        self.conv = nn.Conv2d(2, channels, 3, padding=1)
        self.fc = nn.Linear(channels * size * size, out)
        self.head = nn.Linear(out, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


class ConvHead(FlattenHead):
    def __init__(self, flat: FlattenHead, size=4):
        super().__init__()
        self.load_state_dict(flat.state_dict())
        conv = nn.Conv2d(flat.conv.out_channels, flat.fc.out_features, size)
        with torch.no_grad():
            conv.weight.copy_(flat.fc.weight.view_as(conv.weight))
            conv.bias.copy_(flat.fc.bias)
        self.fc = conv

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.conv(x))).flatten(1)))


def test_channel_structured_factors_equal_the_equivalent_convs():
    torch.manual_seed(0)
    flat = FlattenHead()
    as_conv = ConvHead(flat)
    x = torch.randn(16, 2, 4, 4)
    assert torch.allclose(flat(x), as_conv(x), atol=1e-6)
    data = [(x, torch.randint(0, 3, (16,)))]
    mine = ted.collect_kfac(flat, data, fisher_type="empirical", max_factor_dim=50, progress=False)[flat.fc]
    conv = ted.collect_kfac(as_conv, data, fisher_type="empirical", progress=False)[as_conv.fc]
    assert mine.flattened_positions == 16 and mine.input_factor.shape == (6, 6)
    for a, b in [(mine.input_factor, conv.input_factor), (mine.grad_factor, conv.grad_factor),
                 (mine.homogeneous_input_factor(), conv.homogeneous_input_factor())]:
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert torch.equal(mine.weight_blocks(flat.fc), conv.weight_blocks(as_conv.fc))


@pytest.mark.parametrize("model,limit,message", [
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 10)), 16,
     r"layer '1' \(Linear\) needs a 48×48 input factor .* above max_factor_dim=16, and its input is "
     r"not a flattened C×H×W map.*Raise max_factor_dim="),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 60)), 50, r"layer '1' \(Linear\) needs a 60×60 output factor"),
], ids=["input not a flattened map", "output too wide"])
def test_a_factor_above_the_cap_is_refused_before_allocating(model, limit, message):
    with pytest.raises(KFACError, match=message):
        ted.collect_kfac(model(), [torch.randn(4, 3, 4, 4)], max_factor_dim=limit, progress=False)


@pytest.mark.parametrize("method", ["kron_obd", "kron_obs", "eigendamage"])
def test_prune_scores_a_flattened_linear_by_whole_channels(method):
    torch.manual_seed(0)
    model = FlattenHead(channels=8, out=12)
    data = [(torch.randn(16, 2, 4, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
    params = sum(p.numel() for p in model.parameters())
    _, report = ted.prune(model, data, data[0][0][:2], method=method, pruning_ratio=0.5, max_factor_dim=64,
                          progress=False)
    assert sum(p.numel() for p in model.parameters()) < 0.7 * params
    assert all(math.isfinite(row.predicted_damage) for row in report.rows)   # < 0: the loss drops
    fc = model.fc if isinstance(model.fc, nn.Linear) else model.fc.rotate_in
    assert fc.in_features == 16 * model.conv.out_channels < 16 * 8    # whole channels, 16 inputs each
    assert model.head.out_features == 3
