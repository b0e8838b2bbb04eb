"""The pruning methods by name: what each collects from the data and which criterion it uses.

One registry serves :func:`~tp_eigendamage.prune` and the command line. Each round of
``prune()`` calls ``method.statistics(model, data, options)`` on the model as it is (K-FAC
factors, the diagonal Fisher, gradients for Taylor, or nothing), then
``method.importance(stats)`` for the Torch-Pruning criterion that scores the round.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch
import torch.nn as nn
import torch_pruning as tp

from ._model_state import model_device, preserved_model_state
from ._passes import PASS_OPTIONS, check_data, empty_data_message
from .batches import default_batch_fn, default_forward_fn, to_device
from .diag_fisher import collect_fisher_diag
from .errors import KFACError
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
        importance: ``stats -> tp.importance.Importance`` for the round.
        kfe: rewrite the model in the KFE before scoring (EigenDamage).
        compensation: apply the Kron-OBS weight update to consumers before removing channels.
        loss_units: scores are predicted loss increases (comparable across layers and with
            the measured loss change).
    """

    name: str
    summary: str
    statistics: Optional[Callable[[nn.Module, Iterable, Dict[str, Any]], Any]]
    importance: Callable[[Any], tp.importance.Importance]
    kfe: bool = False
    compensation: bool = False
    loss_units: bool = False


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


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("eigendamage", "EigenDamage: KFE rewrite, eigen-direction damages (second order)",
           _kfac, EigenDamageImportance, kfe=True, loss_units=True),
    Method("kron_obd", "Kronecker-factored OBD channel damages (second order)",
           _kfac, KroneckerOBDImportance, loss_units=True),
    Method("kron_obs", "Kronecker-factored OBS with weight compensation (second order)",
           _kfac, KroneckerOBSImportance, compensation=True, loss_units=True),
    Method("fisher_diag", "C-OBD: diagonal Fisher from per-example gradients (second order)",
           _diagonal, FisherDiagImportance, loss_units=True),
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
