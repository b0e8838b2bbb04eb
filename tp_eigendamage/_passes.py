"""The Fisher-pass engine: one forward and one per-example-loss backward per batch, observed
layer by layer.

Every statistics collector of the package (K-FAC factors, the diagonal Fisher, the EK-FAC
refit) is an :class:`OutputTap` subclass run by :func:`fisher_passes`, which owns batching,
label sampling (true vs empirical Fisher, docs/method.md §1), errors and leaving the model as
it was found.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import fisher
from ._model_state import model_device, preserved_model_state
from ._options import FISHER_TYPES, check_choice
from .batches import batch_size, default_batch_fn, default_forward_fn, to_device
from .errors import KFACError
from .layers import adapter_for, example_chunks

__all__ = ["OutputTap", "PerExampleGradientTap", "fisher_passes", "check_pass_options", "select_modules",
           "all_reduce_sums"]


class OutputTap:
    """Observer of one layer during a Fisher pass: sees its input ``a`` at forward and
    ``g = ∂ℓ_n/∂s`` at backward (``ℓ_n`` the per-example loss).

    Subclasses override :meth:`on_forward`, :meth:`on_grad`, :meth:`end_batch` and
    :meth:`non_finite`. The forward hook returns ``output + probe`` with ``probe`` a zero scalar
    leaf: differentiating the loss w.r.t. the probes alone reaches every layer output without
    computing any weight gradient. The tensor hook sees the gradient of the value the layer
    produced, even if a later op (an inplace activation) overwrites that tensor.
    """

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module, self.adapter = name, module, adapter_for(module)
        self.probes: List[torch.Tensor] = []

    def on_forward(self, x: torch.Tensor, output: torch.Tensor) -> None:
        """Called with the layer's input and output at every call."""

    def on_grad(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        """Called with the input of a call and ``∂(Σ_n ℓ_n)/∂output`` of that call."""

    def end_batch(self) -> None:
        """Called after each batch's backward pass."""

    def non_finite(self) -> Optional[str]:
        """Name of what went non-finite in this layer's sums, if anything."""
        return None

    def forward_hook(self, module, inputs, output):
        if not torch.is_grad_enabled():
            return None
        x = inputs[0]
        self.on_forward(x, output)
        probe = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
        self.probes.append(probe)
        output = output + probe
        output.register_hook(lambda grad: self.on_grad(x, grad))
        return output

    def take_probes(self) -> List[torch.Tensor]:
        probes, self.probes = self.probes, []
        return probes


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


def _raise_if_non_finite(taps: Sequence[OutputTap], step: int) -> None:
    for tap in taps:
        bad = tap.non_finite()
        if bad is not None:
            raise KFACError(
                f"non-finite {bad} at layer '{tap.name}' in batch {step}; check the inputs, the "
                "model's weights and the loss (e.g. lower the learning rate)")


def check_pass_options(fisher_type: str, num_batches: Optional[int], sample_fn: Optional[Callable]) -> None:
    """Validate the options every Fisher pass shares (before any work)."""
    check_choice(fisher_type, "fisher_type", FISHER_TYPES, KFACError)
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise KFACError(f"num_batches={num_batches!r}; pass a positive integer or None")
    if sample_fn is not None and fisher_type == "empirical":
        raise KFACError("sample_fn= only applies to fisher_type='true'")


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
) -> float:
    """One forward and one per-example-loss backward per batch with ``taps`` hooked.

    The backward pass differentiates ``Σ_n ℓ_n`` (``ℓ_n`` from ``loss_fn``, labels drawn by
    ``sample_fn`` for the true Fisher) down to the tapped layer outputs only. Runs in eval mode
    and leaves the model as found (modes, ``requires_grad``, hooks removed), also on errors.
    Returns the number of examples seen.
    """
    check_pass_options(fisher_type, num_batches, sample_fn)
    loss_fn = loss_fn or fisher.cross_entropy
    sample_fn = sample_fn or fisher.sample_categorical
    device = model_device(model)

    from tqdm.auto import tqdm

    handles, bar, num_examples = [], None, 0.0
    try:
        with preserved_model_state(model):
            handles = [t.module.register_forward_hook(t.forward_hook) for t in taps]
            bar = tqdm(data, total=_total_batches(data, num_batches), desc=desc, disable=not progress,
                       leave=False)
            for step, batch in enumerate(bar):
                if num_batches is not None and step >= num_batches:
                    break
                inputs, targets = batch_fn(batch)
                inputs, targets = to_device(inputs, device), to_device(targets, device)
                try:
                    outputs = forward_fn(model, inputs)
                except Exception as exc:
                    raise KFACError(
                        f"the model could not consume batch {step} ({type(exc).__name__}: {exc}); "
                        "check the data, or pass batch_fn=/forward_fn= to adapt it") from exc
                _raise_if_non_finite(taps, step)
                if fisher_type == "true":
                    targets = sample_fn(outputs)
                elif targets is None:
                    raise KFACError("fisher_type='empirical' needs targets in every batch; "
                                    "the batch has none (or use fisher_type='true')")
                losses = loss_fn(outputs, targets)
                if not (isinstance(losses, torch.Tensor) and losses.dim() == 1
                        and losses.shape[0] == batch_size(outputs, losses.shape[0])):
                    shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                    raise KFACError(
                        f"loss_fn must return one loss per example, shape (N,), got {shape}; "
                        "use reduction='none' so the factors are scaled per example")
                probes = [p for t in taps for p in t.take_probes()]
                if probes and losses.requires_grad:
                    torch.autograd.grad(losses.sum(), probes, allow_unused=True)
                for t in taps:
                    t.end_batch()
                _raise_if_non_finite(taps, step)
                num_examples += losses.shape[0]
    finally:
        for h in handles:
            h.remove()
        if bar is not None:
            bar.close()
    if num_examples == 0:
        raise KFACError("data yielded no batches; pass a non-empty iterable of batches")
    return num_examples


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
