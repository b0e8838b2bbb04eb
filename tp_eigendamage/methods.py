"""The pruning methods by name: what each collects from the data and which criterion it uses.

One registry serves :func:`~tp_eigendamage.prune` and the command line. Each round of
``prune()`` calls ``method.statistics(model, data, options)`` on the model as it is (K-FAC
factors, the diagonal Fisher, gradients for Taylor, or nothing), then
``method.criterion(stats, options)`` for the Torch-Pruning criterion that scores the round:
``method.importance(stats, **{**method.criterion_defaults, **options})``, where ``options`` are
``prune(criterion_options=...)``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch_pruning as tp

from ._model_state import model_device, preserved_model_state
from ._options import did_you_mean
from ._passes import PASS_OPTIONS, check_data, empty_data_message
from .batches import default_batch_fn, default_forward_fn, to_device
from .damage import OBS_DAMPING
from .diag_fisher import collect_fisher_diag
from .errors import InvalidArgumentError, KFACError, PruneArgumentError
from .fisher import cross_entropy
from .importance import (EigenDamageImportance, FisherDiagImportance, KroneckerOBDImportance,
                         KroneckerOBSImportance)
from .kfac import collect_kfac

__all__ = ["Method", "METHODS", "get_method", "accumulate_gradients"]


@dataclass(frozen=True)
class Method:
    """A pruning method.

    Attributes:
        name: the name ``prune(method=...)`` and ``tp-eigendamage --method`` accept.
        summary: one line for help texts.
        statistics: ``(model, data, options) -> stats`` run at the start of every round
            (``options``: the options of :func:`~tp_eigendamage.collect_kfac`),
            or ``None`` for criteria that need nothing from the data.
        importance: ``(stats, **criterion options) -> tp.importance.Importance`` for the round.
        kfe: rewrite the model in the KFE before scoring (EigenDamage).
        compensation: apply the Kron-OBS weight update to consumers before removing channels.
        loss_units: scores are predicted loss increases (comparable across layers and with
            the measured loss change).
        criterion_defaults: the keyword options of ``importance`` that
            ``prune(criterion_options=...)`` may set, with the values used when it does not
            (empty: the criterion takes none).
    """

    name: str
    summary: str
    statistics: Optional[Callable[[nn.Module, Iterable, Dict[str, Any]], Any]]
    importance: Callable[[Any], tp.importance.Importance]
    kfe: bool = False
    compensation: bool = False
    loss_units: bool = False
    criterion_defaults: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def criterion(self, stats: Any, options: Optional[Mapping[str, Any]] = None) -> tp.importance.Importance:
        """The round's criterion: ``importance(stats)`` with :attr:`criterion_defaults` updated
        by ``options``."""
        return self.importance(stats, **{**self.criterion_defaults, **(options or {})})

    def check_criterion_options(self, options: Mapping[str, Any]) -> None:
        """Raise :class:`~tp_eigendamage.errors.PruneArgumentError` if ``options`` has a key
        that is not in :attr:`criterion_defaults` or a value the criterion refuses (it is
        built once, without statistics, to check)."""
        if not isinstance(options, Mapping):
            raise PruneArgumentError(f"criterion_options must be a dict of keyword options, got "
                                     f"{type(options).__name__}")
        if options and not self.criterion_defaults:
            raise PruneArgumentError(
                f"criterion_options={dict(options)!r}: method {self.name!r} takes none (only the "
                f"registry's {', '.join(m.name for m in METHODS.values() if m.criterion_defaults)} "
                "do; configure a Torch-Pruning Importance instance directly)")
        for key in options:
            if key not in self.criterion_defaults:
                listed = ", ".join(f"{k}={v!r}" for k, v in self.criterion_defaults.items())
                raise PruneArgumentError(
                    f"criterion_options has an unknown key {key!r}{did_you_mean(key, self.criterion_defaults)}; "
                    f"method {self.name!r} accepts {listed} (the defaults)")
        try:
            self.criterion(_no_statistics, options)
        except InvalidArgumentError as exc:
            raise PruneArgumentError(f"criterion_options for method {self.name!r}: {exc}") from exc


def _no_statistics():
    """The statistics factory of :meth:`Method.check_criterion_options`, never called."""
    raise AssertionError("a criterion built to check its options was asked for statistics")


def accumulate_gradients(model: nn.Module, data: Iterable, *, num_batches: Optional[int] = None,
                         loss_fn: Optional[Callable] = None, batch_fn: Callable = default_batch_fn,
                         forward_fn: Callable = default_forward_fn, **ignored) -> None:
    """Fill every parameter's ``.grad`` with the gradient of the mean data-label loss over
    ``data`` (what first-order Taylor importance reads); previous ``.grad`` are replaced.

    ``loss_fn(outputs, targets) -> (N,)`` per-example losses (default cross entropy); the
    remaining Fisher-pass options (``fisher_type``, ``sample_fn``, ``progress``) do not apply.
    Like the Fisher passes, it runs in eval mode with every parameter trainable (frozen layers
    are scored like any other) and restores modes and ``requires_grad`` after.
    """
    check_data(data)
    loss_fn = loss_fn or cross_entropy
    device = model_device(model)
    model.zero_grad(set_to_none=True)
    count = 0
    with torch.enable_grad(), preserved_model_state(model):
        for batch in itertools.islice(data, num_batches):
            inputs, targets = to_device(batch_fn(batch), device)
            if targets is None:
                raise KFACError("Taylor importance needs targets in every batch; the batch has none")
            losses = loss_fn(forward_fn(model, inputs), targets)
            losses.sum().backward()
            count += losses.shape[0]
    if count == 0:
        raise KFACError(empty_data_message(data))
    for p in model.parameters():
        if p.grad is not None:
            p.grad /= count


def _kfac(model, data, options):
    return collect_kfac(model, data, **options)


def _diagonal(model, data, options):
    return collect_fisher_diag(model, data, **{k: v for k, v in options.items() if k in PASS_OPTIONS})


def _gradients(model, data, options):
    accumulate_gradients(model, data, **options)


#: The criterion options of the second-order methods in ``prune()`` (docs/method.md §9).
SECOND_ORDER_DEFAULTS = MappingProxyType({"side": "producer", "first_order": "positive"})

METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("eigendamage", "EigenDamage: KFE rewrite, eigen-direction damages (second order)",
           _kfac, EigenDamageImportance, kfe=True, loss_units=True, criterion_defaults=SECOND_ORDER_DEFAULTS),
    Method("kron_obd", "Kronecker-factored OBD channel damages (second order)",
           _kfac, KroneckerOBDImportance, loss_units=True, criterion_defaults=SECOND_ORDER_DEFAULTS),
    Method("kron_obs", "Kronecker-factored OBS with weight compensation (second order)",
           _kfac, KroneckerOBSImportance, compensation=True, loss_units=True,
           criterion_defaults=MappingProxyType({"side": "consumer", "first_order": "positive",
                                                "damping": OBS_DAMPING})),
    Method("fisher_diag", "C-OBD: diagonal Fisher from per-example gradients (second order)",
           _diagonal, FisherDiagImportance, loss_units=True, criterion_defaults=SECOND_ORDER_DEFAULTS),
    Method("magnitude", "Torch-Pruning's L2 weight magnitude", None,
           lambda stats: tp.importance.GroupMagnitudeImportance(p=2)),
    Method("taylor", "Torch-Pruning's first-order Taylor (gradients over the statistics batches)",
           _gradients, lambda stats: tp.importance.GroupTaylorImportance()),
    Method("bn_scale", "Torch-Pruning's BatchNorm scale", None,
           lambda stats: tp.importance.BNScaleImportance()),
    Method("random", "Torch-Pruning's random scores (a baseline)", None,
           lambda stats: tp.importance.RandomImportance()),
)}


def get_method(method: Union[str, tp.importance.Importance]) -> Method:
    """The registered method of that name, or a method wrapping a Torch-Pruning importance
    instance (no statistics). Raises ``KeyError`` for an unknown name."""
    if isinstance(method, tp.importance.Importance):
        return Method(type(method).__name__, "a user-supplied Torch-Pruning importance", None,
                      lambda stats: method)
    return METHODS[method]
