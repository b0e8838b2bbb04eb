"""The Fisher-pass engine: one forward and one per-example-loss backward per batch, observed
layer by layer.

Every statistics collector of the package (K-FAC factors, the diagonal Fisher, the EK-FAC
refit) is an :class:`OutputTap` subclass run by :func:`fisher_passes`, which owns batching,
label sampling (true vs empirical Fisher, docs/method.md §1), errors and leaving the model as
it was found.
"""
from __future__ import annotations

import collections.abc
import itertools
import warnings
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn

from . import fisher
from ._model_state import grads_set_aside, model_device, preserved_model_state
from ._options import FISHER_TYPES, check_choice
from .batches import batch_size, default_batch_fn, default_forward_fn, to_device
from .errors import FisherInputError, KFACError, TPEigenDamageError
from .layers import adapter_for, example_chunks

__all__ = ["OutputTap", "PerExampleGradientTap", "fisher_passes", "check_pass_options", "check_data",
           "is_one_shot", "select_modules", "all_reduce_sums", "PASS_OPTIONS"]

#: The keyword options every Fisher pass takes (``collect_kfac`` adds its own).
PASS_OPTIONS = ("num_batches", "fisher_type", "loss_fn", "sample_fn", "batch_fn", "forward_fn", "progress")


class OutputTap:
    """Observer of one layer during a Fisher pass: sees its input ``a`` at forward and
    ``g = ∂ℓ_n/∂s`` at backward (``ℓ_n`` the per-example loss).

    Subclasses override :meth:`on_forward`, :meth:`on_grad`, :meth:`on_data_weight_grad`,
    :meth:`end_batch`, :meth:`discard_data_weight_grad` and :meth:`running_sums`. The forward
    hook returns ``output + probe`` with ``probe`` a zero scalar leaf: differentiating the loss
    w.r.t. the probes alone reaches every layer output without computing any weight gradient.
    The tensor hook sees the gradient of the value the layer produced, even if a later op (an
    inplace activation) overwrites that tensor; it reports to :meth:`on_grad` only in the
    backward pass of the Fisher's labels (``fisher_labels``, set by :func:`fisher_passes`).
    """

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module, self.adapter = name, module, adapter_for(module)
        self.probes: List[torch.Tensor] = []
        self.fisher_labels = True

    def on_forward(self, x: torch.Tensor, output: torch.Tensor) -> None:
        """Called with the layer's input and output at every call."""

    def on_grad(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        """Called with the input of a call and ``∂(Σ_n s_n ℓ_n)/∂output`` of that call (the
        Fisher's labels: sampled for the true Fisher, with the sampler's scales ``s_n``)."""

    def on_data_weight_grad(self, grad: torch.Tensor) -> None:
        """Called once per batch with ``Σ_n ∂ℓ_n(y_n)/∂W``, the weight gradient with the DATA
        labels ``y_n`` (passes with ``data_gradient=True`` only)."""

    def discard_data_weight_grad(self) -> None:
        """The data-label gradient cannot be completed (a batch had no targets): drop it."""

    def end_batch(self) -> None:
        """Called after each batch's backward pass(es)."""

    def running_sums(self) -> List[Tuple[str, torch.Tensor]]:
        """``(what it sums, sum)`` of the sums accumulated so far, checked for NaN / Inf after
        every forward and backward."""
        return []

    def non_finite(self) -> Optional[str]:
        """What the first of :meth:`running_sums` holding NaN or Inf sums, if any."""
        return next((what for what, t in self.running_sums() if not bool(torch.isfinite(t).all())), None)

    def _on_backward(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        if self.fisher_labels:
            self.on_grad(x, grad)

    def forward_hook(self, module, inputs, output):
        if not torch.is_grad_enabled():
            return None
        x = inputs[0]
        self.on_forward(x, output)
        probe = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
        self.probes.append(probe)
        output = output + probe
        output.register_hook(lambda grad: self._on_backward(x, grad))
        return output

    def take_probes(self) -> List[torch.Tensor]:
        probes, self.probes = self.probes, []
        return probes

    def take_weight_grad(self, weight: torch.Tensor) -> None:
        """Post-accumulate hook on the layer's weight: hand its gradient over and free it."""
        self.on_data_weight_grad(weight.grad)
        weight.grad = None


class PerExampleGradientTap(OutputTap):
    """A tap that needs per-example weight gradients ``G_n = Σ_calls Σ_t g_t a_tᵀ``.

    Keeps ``(a, g)`` of every call of the layer in a batch and, after the batch's backward
    pass, hands :meth:`add_gradients` the per-example gradients in example chunks (at most
    :data:`~tp_eigendamage.layers.CHUNK_ELEMENTS` entries each), shaped ``(n, G, out/G, in/G, K)``.
    Calls of a layer used several times per forward are summed BEFORE any square is taken,
    as the gradient of a shared weight is the sum over its uses.
    """

    def __init__(self, name: str, module: nn.Module):
        super().__init__(name, module)
        self.calls: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def on_grad(self, x, grad):
        self.calls.append((x.detach(), grad.detach()))

    def add_gradients(self, grads: torch.Tensor) -> None:
        """Called with each chunk of per-example gradients."""
        raise NotImplementedError

    def end_batch(self) -> None:
        calls, self.calls = self.calls, []
        if not calls:
            return
        for chunk in example_chunks(calls[0][0].shape[0], self.module.weight.numel()):
            self.add_gradients(sum(self.adapter.per_example_grads(self.module, x[chunk], g[chunk])
                                   for x, g in calls))


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """True if no tensor holds NaN or Inf, in one pass over the data and one device sync: a sum
    is finite if every term is, and NaN / Inf terms make it non-finite. (A sum of finite values
    that overflows reads as non-finite too: the caller then checks element-wise.)"""
    if not tensors:
        return True
    device = tensors[0].device
    total = torch.stack([t.sum().to(device) for t in tensors]).sum()
    return bool(torch.isfinite(total))


def _raise_if_non_finite(taps: Sequence[OutputTap], step: int) -> None:
    """Blame the first tap whose sums went non-finite. After a forward, taps in forward order
    (the first layer whose INPUT went bad); after a backward, pass them reversed (gradients go
    bad from the output backwards, so the layer nearest the output is the first)."""
    if _all_finite([t for tap in taps for _, t in tap.running_sums()]):
        return
    for tap in taps:
        bad = tap.non_finite()
        if bad is not None:
            raise KFACError(
                f"non-finite {bad} at layer '{tap.name}' in batch {step}; check the inputs, the "
                "model's weights and the loss (e.g. lower the learning rate)")


def _raise_if_non_finite_state(model: nn.Module) -> None:
    """Name the first parameter or buffer holding NaN / Inf (before any pass starts)."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise KFACError(
                    f"{kind} '{name}' holds NaN or Inf values, so every output it reaches is "
                    "non-finite; restore the model from a good checkpoint (e.g. training diverged: "
                    "lower the learning rate)")


def _raise_if_non_finite_outputs(outputs, step: int) -> None:
    tensors = [outputs] if isinstance(outputs, torch.Tensor) else (
        list(outputs.values()) if isinstance(outputs, collections.abc.Mapping) else
        list(outputs) if isinstance(outputs, (tuple, list)) else [])
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FisherInputError(
                f"the model's outputs hold NaN or Inf in batch {step} although its parameters and "
                "every covered layer's inputs are finite: something after the last Conv2d/Linear "
                "overflowed or divided by zero (check the inputs' scale and the model's last "
                "operations)")


def check_data(data, error: Type[Exception] = KFACError) -> None:
    """``data`` must be an iterable of batches (not None, not a single tensor)."""
    if isinstance(data, torch.Tensor):
        raise error("data is a single tensor; pass an iterable of batches, e.g. "
                    "[(inputs, targets)] or a DataLoader")
    if not (hasattr(type(data), "__iter__") or hasattr(type(data), "__getitem__")):
        raise error(f"data is {type(data).__name__}, not an iterable of batches; pass e.g. "
                    "[(inputs, targets)] or a DataLoader")


def is_one_shot(data) -> bool:
    """True for an iterator (a generator, ``iter(loader)``): it can be read only once."""
    return isinstance(data, collections.abc.Iterator)


def check_pass_options(fisher_type: str, num_batches: Optional[int], sample_fn: Optional[Callable]) -> None:
    """Validate the options every Fisher pass shares (before any work)."""
    check_choice(fisher_type, "fisher_type", FISHER_TYPES, KFACError)
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise KFACError(f"num_batches={num_batches!r}; pass a positive integer or None")
    if sample_fn is not None and fisher_type == "empirical":
        raise KFACError("sample_fn= only applies to fisher_type='true'")


NO_TARGETS_WARNING = (
    "a batch has no targets, so the mean data-label gradient (the first-order term of the damage, "
    "docs/method.md §4) is not collected and damages are second order only; pass (inputs, "
    "targets) batches to include it, or mean_gradient=False to silence this")


def _per_example_losses(loss_fn: Callable, outputs, targets, step: int) -> torch.Tensor:
    losses = loss_fn(outputs, targets)
    if not (isinstance(losses, torch.Tensor) and losses.dim() == 1
            and losses.shape[0] == batch_size(outputs, losses.shape[0])):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise KFACError(
            f"loss_fn must return one loss per example, shape (N,), got {shape}; "
            "use reduction='none' so the factors are scaled per example")
    if not bool(torch.isfinite(losses.detach()).all()):
        raise FisherInputError(
            f"loss_fn returned NaN or Inf in batch {step} for finite model outputs; "
            "check the targets and the loss (e.g. log of zero)")
    return losses


def _backward(taps: Sequence[OutputTap], loss: torch.Tensor, probes: List[torch.Tensor],
              weights: List[torch.Tensor], *, fisher_labels: bool, retain_graph: bool = False) -> None:
    """``∂loss/∂(every tapped output)`` (seen by the taps' :meth:`OutputTap.on_grad` if
    ``fisher_labels``) and ``∂loss/∂weights`` (one per tap, given to
    :meth:`OutputTap.on_data_weight_grad` as soon as autograd has formed it, then dropped, so
    at most one layer's weight gradient is held at a time)."""
    for t in taps:
        t.fisher_labels = fisher_labels
    if not weights:
        torch.autograd.grad(loss, probes, allow_unused=True, retain_graph=retain_graph)
        return
    handles = [w.register_post_accumulate_grad_hook(t.take_weight_grad) for t, w in zip(taps, weights)]
    try:
        torch.autograd.backward(loss, inputs=probes + weights, retain_graph=retain_graph)
    finally:
        for h in handles:
            h.remove()
        for t in probes + weights:
            t.grad = None


def _total_batches(data: Iterable, num_batches: Optional[int]) -> Optional[int]:
    try:
        total = len(data)
    except TypeError:
        total = None
    if num_batches is not None:
        total = num_batches if total is None else min(total, num_batches)
    return total


def fisher_passes(
    model: nn.Module,
    data: Iterable,
    taps: Sequence[OutputTap],
    *,
    num_batches: Optional[int] = None,
    fisher_type: str = "true",
    loss_fn: Optional[Callable] = None,
    sample_fn: Optional[Callable] = None,
    batch_fn: Callable = default_batch_fn,
    forward_fn: Callable = default_forward_fn,
    progress: bool = True,
    desc: str = "Fisher passes",
    data_gradient: bool = False,
) -> float:
    """One forward and one per-example-loss backward per batch with ``taps`` hooked.

    The backward pass differentiates ``Σ_n s_n ℓ_n`` (``ℓ_n`` from ``loss_fn``; for the true
    Fisher with labels and scales ``s_n`` drawn by ``sample_fn``, default
    :func:`~tp_eigendamage.fisher.importance_sample_categorical`; ``s_n = 1`` otherwise) down to
    the tapped layer outputs only (:meth:`OutputTap.on_grad`). With ``data_gradient=True`` the
    taps also get the weight gradient ``Σ_n ∂ℓ_n(y_n)/∂W`` with the data labels
    (:meth:`OutputTap.on_data_weight_grad`): from the same backward pass for the empirical
    Fisher, from a second one (a plain backward to the tapped weights) for the true Fisher.
    Batches without targets end the data-label part with a warning. Runs in eval mode and
    leaves the model as found (modes, ``requires_grad``, ``.grad``, hooks removed), also on
    errors. Returns the number of examples seen.
    """
    check_pass_options(fisher_type, num_batches, sample_fn)
    check_data(data)
    total = _total_batches(data, num_batches)
    if total is None:
        warnings.warn(f"{desc}: data has no len() and num_batches=None, so the pass reads until the "
                      "iterable ends (an endless iterator never does); pass num_batches= to bound it",
                      stacklevel=3)
    _raise_if_non_finite_state(model)
    loss_fn = loss_fn or fisher.cross_entropy
    sample_fn = sample_fn or fisher.importance_sample_categorical
    device = model_device(model)

    from tqdm.auto import tqdm

    handles, bar, num_examples = [], None, 0.0
    try:
        with preserved_model_state(model), grads_set_aside(model):
            handles = [t.module.register_forward_hook(t.forward_hook) for t in taps]
            bar = tqdm(itertools.islice(data, num_batches), total=total, desc=desc,
                       disable=not progress, leave=False)
            for step, batch in enumerate(bar):
                inputs, targets = batch_fn(batch)
                inputs, targets = to_device(inputs, device), to_device(targets, device)
                try:
                    outputs = forward_fn(model, inputs)
                except TPEigenDamageError:
                    raise
                except Exception as exc:
                    raise KFACError(
                        f"the model could not consume batch {step} ({type(exc).__name__}: {exc}); "
                        "check the data, or pass batch_fn=/forward_fn= to adapt it") from exc
                _raise_if_non_finite(taps, step)
                _raise_if_non_finite_outputs(outputs, step)
                scale = None
                if fisher_type == "true":
                    drawn = sample_fn(outputs)
                    fisher_targets, scale = drawn if isinstance(drawn, fisher.WeightedTargets) else (drawn, None)
                elif targets is None:
                    raise KFACError("fisher_type='empirical' needs targets in every batch; "
                                    "the batch has none (or use fisher_type='true')")
                else:
                    fisher_targets = targets
                if data_gradient and targets is None:
                    warnings.warn(NO_TARGETS_WARNING, stacklevel=3)
                    data_gradient = False
                    for t in taps:
                        t.discard_data_weight_grad()
                losses = _per_example_losses(loss_fn, outputs, fisher_targets, step)
                probes = [p for t in taps for p in t.take_probes()]
                if probes and losses.requires_grad:
                    weights = [t.module.weight for t in taps] if data_gradient else []
                    weighted = losses if scale is None else losses * scale.to(losses.dtype)
                    if fisher_type == "true" and weights:
                        _backward(taps, weighted.sum(), probes, [], fisher_labels=True, retain_graph=True)
                        data_losses = _per_example_losses(loss_fn, outputs, targets, step)
                        _backward(taps, data_losses.sum(), [], weights, fisher_labels=False)
                    else:
                        _backward(taps, weighted.sum(), probes, weights, fisher_labels=True)
                for t in taps:
                    t.end_batch()
                _raise_if_non_finite(taps[::-1], step)
                num_examples += losses.shape[0]
    finally:
        for h in handles:
            h.remove()
        for t in taps:
            t.fisher_labels = True
        if bar is not None:
            bar.close()
    if num_examples == 0:
        raise KFACError(empty_data_message(data))
    return num_examples


def empty_data_message(data) -> str:
    """Why a pass saw no batch: an empty iterable, or an iterator already used up."""
    if is_one_shot(data):
        return (f"data yielded no batches: it is a one-shot iterator ({type(data).__name__}) that "
                "was already used up, e.g. by an earlier pass or round; pass a list of batches or "
                "a DataLoader, which can be read again")
    return "data yielded no batches; pass a non-empty iterable of batches"


def select_modules(model: nn.Module, modules: Optional[Iterable[nn.Module]]) -> List[Tuple[str, nn.Module]]:
    """``(qualified name, module)`` of the layers a pass covers: every layer an adapter knows,
    or exactly ``modules`` (each checked to be such a layer of ``model``)."""
    named = [(n, m) for n, m in model.named_modules() if adapter_for(m) is not None]
    if modules is None:
        if not named:
            raise KFACError(f"{type(model).__name__} has no nn.Conv2d or nn.Linear layer; "
                            "K-FAC statistics cover only those layer kinds")
        return named
    names = {id(m): n for n, m in model.named_modules()}
    chosen = []
    for m in modules:
        if id(m) not in names:
            raise KFACError(f"modules= contains a {type(m).__name__} that is not a submodule "
                            "of the model")
        if adapter_for(m) is None:
            raise KFACError(f"modules= contains '{names[id(m)]}' ({type(m).__name__}); only "
                            "nn.Conv2d and nn.Linear layers are supported")
        chosen.append((names[id(m)], m))
    if not chosen:
        raise KFACError("modules= is empty; pass None to cover every Conv2d/Linear layer")
    return chosen


def all_reduce_sums(tensors: Sequence[torch.Tensor], counts: Sequence[float], device) -> List[float]:
    """Sum ``tensors`` (in place) and ``counts`` over ``torch.distributed`` ranks; returns the
    global counts. Without an initialized process group nothing changes."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(counts)
    totals = torch.tensor(list(counts), dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    for t in tensors:
        dist.all_reduce(t)
    return totals.tolist()
