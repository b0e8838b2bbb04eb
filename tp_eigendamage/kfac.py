"""Kronecker-factored curvature (K-FAC) statistics for every Conv2d / Linear of a model.

For a layer ``s = W a`` the Fisher block of the per-example loss ``ℓ_n`` is approximated as

    F ≈ A ⊗ S,    A = input_factor,   S = grad_factor       (MATH.md §1)

with this split of the scale (``N`` examples, ``T`` output locations / tokens per example,
``K`` kernel offsets, ``g = ∂ℓ_n/∂s``):

* ``A`` is the MEAN of ``a aᵀ`` over every sample row: ``E_n[Σ_t a aᵀ] / T``
  (channel mode: ``E_n[Σ_{t,k} x xᵀ] / (T K)``, padding positions counted as zeros);
* ``S`` is the per-EXAMPLE sum ``E_n[Σ_t g gᵀ]``.

so ``A ⊗ S`` is the KFC "expand" approximation of ``E_n[∇ℓ_n ∇ℓ_nᵀ]`` and does not depend
on the batch size. Alongside, ``mean_grad`` is ``Ḡ = E_n[∂ℓ_n(y_n)/∂W]`` with the data
labels, the first-order term of every damage (docs/fidelity.md). Grouped convolutions get one
factor pair per group: ``input_factor`` is ``(G, d_in, d_in)`` and ``grad_factor``
``(G, d_out, d_out)`` when ``G > 1`` (2-D otherwise).
The bias is the homogeneous coordinate: :meth:`KFACFactors.homogeneous_input_factor` returns
``[[A, E a], [E aᵀ, 1]]``; ``input_factor`` is the weight block alone (as curvlinops'
``separate_weight_and_bias=True``).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from . import fisher
from .layers import FACTOR_MODES, adapter_for


class KFACError(ValueError):
    """Bad input to :func:`collect_kfac`; the model is left unchanged."""


class StaleStatisticsError(RuntimeError):
    """Factors no longer describe the module they are keyed by."""


def clamped_eigh(matrix: torch.Tensor, rel_tol: float = 1e-10) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``eigh`` of a symmetric PSD factor; eigenvalues below ``rel_tol·λ_max`` → 0."""
    m = matrix.double()
    evals, evecs = torch.linalg.eigh(0.5 * (m + m.transpose(-1, -2)))
    cutoff = rel_tol * evals.amax(dim=-1, keepdim=True).clamp_min(0)
    return torch.where(evals > cutoff, evals, torch.zeros_like(evals)), evecs


@dataclass
class KFACFactors:
    """K-FAC factors of one layer (see the module docstring for shapes and scale)."""

    name: str
    kind: str
    factor_mode: str
    weight_shape: torch.Size
    groups: int
    input_sum: torch.Tensor
    input_mean_sum: torch.Tensor
    grad_sum: torch.Tensor
    input_count: float = 0.0
    num_examples: float = 0.0
    has_bias: bool = False
    mean_grad_sum: Optional[torch.Tensor] = field(default=None, repr=False)
    _eigen: Optional[tuple] = field(default=None, repr=False)

    def _ungroup(self, t: torch.Tensor) -> torch.Tensor:
        return t[0] if self.groups == 1 else t

    @property
    def input_blocks(self) -> torch.Tensor:
        """``A`` per group, always ``(G, d_in, d_in)``."""
        return self.input_sum / self.input_count

    @property
    def grad_blocks(self) -> torch.Tensor:
        """``S`` per group, always ``(G, d_out, d_out)``."""
        return self.grad_sum / self.num_examples

    @property
    def input_factor(self) -> torch.Tensor:
        """``A`` = mean of ``a aᵀ`` over all sample rows (float32)."""
        return self._ungroup(self.input_blocks)

    @property
    def grad_factor(self) -> torch.Tensor:
        """``S`` = per-example ``Σ_t g gᵀ``, averaged over examples (float32)."""
        return self._ungroup(self.grad_blocks)

    @property
    def input_mean(self) -> torch.Tensor:
        """``E[a]``, the cross term with the bias' homogeneous coordinate."""
        return self._ungroup(self.input_mean_sum / self.input_count)

    @property
    def mean_grad(self) -> Optional[torch.Tensor]:
        """``Ḡ = (1/N) Σ_n ∂ℓ_n(y_n)/∂W`` with the DATA labels ``y_n``, or ``None`` if not collected.

        ``(G, d_out, in/G, K)`` like :meth:`~tp_eigendamage.layers.LayerAdapter.weight_blocks`
        (float32). A weight change ``Δ`` changes the mean loss by ``Σ Ḡ ⊙ Δ`` to first order;
        a model trained with weight decay ``λ`` sits where ``Ḡ ≈ −λ W``, not at ``Ḡ = 0``.
        """
        return None if self.mean_grad_sum is None else self.mean_grad_sum / self.num_examples

    def homogeneous_input_factor(self) -> torch.Tensor:
        """``[[A, E a], [E aᵀ, 1]]``: ``A`` for the weight and bias as one matrix ``[W | b]``."""
        A = self.input_blocks
        m = (self.input_mean_sum / self.input_count).unsqueeze(-1)
        one = torch.ones(A.shape[0], 1, 1, dtype=A.dtype, device=A.device)
        top = torch.cat([A, m], dim=-1)
        bottom = torch.cat([m.transpose(-1, -2), one], dim=-1)
        return self._ungroup(torch.cat([top, bottom], dim=-2))

    def eigen(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(λ_A, Q_A, λ_S, Q_S)``: float64 eigendecompositions of both factors, cached.

        ``A = Q_A diag(λ_A) Q_Aᵀ`` and ``S = Q_S diag(λ_S) Q_Sᵀ``, eigenvalues ascending,
        tiny or negative ones clamped to 0. Grouped layers get a leading group dimension.
        """
        if self._eigen is None:
            lam_a, q_a = clamped_eigh(self.input_blocks)
            lam_s, q_s = clamped_eigh(self.grad_blocks)
            self._eigen = tuple(self._ungroup(t) for t in (lam_a, q_a, lam_s, q_s))
        return self._eigen

    def check(self, module: nn.Module) -> None:
        """Raise :class:`StaleStatisticsError` unless ``module`` still has the shape seen."""
        weight = getattr(module, "weight", None)
        if weight is None or weight.shape != self.weight_shape or getattr(module, "groups", 1) != self.groups:
            got = None if weight is None else tuple(weight.shape)
            raise StaleStatisticsError(
                f"K-FAC factors of '{self.name}' were collected for weight shape "
                f"{tuple(self.weight_shape)} but the module now has {got}; the model changed "
                "since collect_kfac (e.g. it was pruned). Call collect_kfac again.")

    # -- accumulation -------------------------------------------------------------------
    def _state_tensors(self) -> List[torch.Tensor]:
        sums = [self.input_sum, self.input_mean_sum, self.grad_sum]
        return sums + ([] if self.mean_grad_sum is None else [self.mean_grad_sum])


class KFACStats(Mapping):
    """K-FAC factors keyed by module; ``stats[module]`` is a :class:`KFACFactors`."""

    def __init__(self, factors: Dict[nn.Module, KFACFactors], *, factor_mode: str,
                 fisher_type: str, num_examples: float, model: Optional[nn.Module] = None):
        self._factors = factors
        self.model = model
        self.factor_mode = factor_mode
        self.fisher_type = fisher_type
        self.num_examples = num_examples

    def __getitem__(self, module: nn.Module) -> KFACFactors:
        try:
            factors = self._factors[module]
        except KeyError:
            raise KeyError(
                f"no K-FAC factors for {type(module).__name__} module; it was not covered by "
                "collect_kfac (not a Conv2d/Linear, not in modules=, or added later)") from None
        factors.check(module)
        return factors

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._factors)

    def __len__(self) -> int:
        return len(self._factors)

    def __contains__(self, module) -> bool:
        return module in self._factors

    def names(self) -> Dict[str, nn.Module]:
        return {f.name: m for m, f in self._factors.items()}

    def __repr__(self) -> str:
        return (f"KFACStats({len(self)} layers, factor_mode={self.factor_mode!r}, "
                f"fisher_type={self.fisher_type!r}, examples={self.num_examples:g})")


# -- batches -------------------------------------------------------------------------------
TARGET_KEYS = ("targets", "target", "labels", "label", "y")


def default_batch_fn(batch) -> Tuple[object, object]:
    """Split a batch into ``(inputs, targets)``.

    * a tensor → ``(batch, None)``;
    * a tuple/list → ``(batch[0], batch[1])`` (targets ``None`` if there is one element);
    * a dict → targets from the first of ``targets/target/labels/label/y`` present, inputs =
      the remaining entries, passed to the model as keyword arguments.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise KFACError("got an empty batch; each batch must hold inputs (and targets)")
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, Mapping):
        key = next((k for k in TARGET_KEYS if k in batch), None)
        inputs = {k: v for k, v in batch.items() if k != key}
        return inputs, (batch[key] if key is not None else None)
    raise KFACError(f"cannot split a batch of type {type(batch).__name__} into inputs and "
                    "targets; pass batch_fn=lambda batch: (inputs, targets)")


def default_forward_fn(model: nn.Module, inputs):
    """``model(**inputs)`` for dicts, ``model(*inputs)`` for tuples, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def to_device(obj, device):
    """``obj`` with every tensor (in tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def _batch_size(outputs, default: int) -> int:
    """Leading size of the (first) output tensor: the number of examples in the batch."""
    if isinstance(outputs, torch.Tensor) and outputs.dim() > 0:
        return outputs.shape[0]
    return default


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


# -- leaving the model as it was -------------------------------------------------------------
@contextlib.contextmanager
def preserved_model_state(model: nn.Module):
    """Eval mode, trainable parameters and no ``.grad`` inside; every mode flag,
    ``requires_grad`` and ``.grad`` back after.

    BatchNorm statistics do not move in eval mode. Inside, the passes take the data-label
    weight gradients one layer at a time from ``.grad`` (see :func:`_backward`); the
    parameters' own ``.grad`` are set aside meanwhile and put back untouched.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _, _ in flags:
            p.requires_grad_(True)
            p.grad = None
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag, grad in flags:
            p.requires_grad_(flag)
            p.grad = grad


# -- Fisher passes -----------------------------------------------------------------------------
class OutputTap:
    """Observer of one layer during a Fisher pass: sees its input ``a`` at forward and
    ``g = ∂ℓ_n/∂s`` at backward (``ℓ_n`` the per-example loss).

    Subclasses override :meth:`on_forward`, :meth:`on_grad`, :meth:`on_data_weight_grad`,
    :meth:`end_batch`, :meth:`discard_data_weight_grad` and :meth:`non_finite`. The forward
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

    def non_finite(self) -> Optional[str]:
        """Name of what went non-finite in this layer's sums, if anything."""
        return None

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


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of a running sum is finite, in one reduction (NaN/Inf propagate into
    the total; a total that overflows means the entries are out of range anyway)."""
    return bool(torch.isfinite(t.sum()))


def _raise_if_non_finite(taps: List[OutputTap], step: int) -> None:
    for tap in taps:
        bad = tap.non_finite()
        if bad is not None:
            raise KFACError(
                f"non-finite {bad} at layer '{tap.name}' in batch {step}; check the inputs, the "
                "model's weights and the loss (e.g. lower the learning rate)")


def check_fisher_args(fisher_type: str, num_batches, sample_fn) -> None:
    if fisher_type not in fisher.FISHER_TYPES:
        raise KFACError(f"fisher_type={fisher_type!r}; choose one of {fisher.FISHER_TYPES}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise KFACError(f"num_batches={num_batches!r}; pass a positive integer or None")
    if sample_fn is not None and fisher_type == "empirical":
        raise KFACError("sample_fn= only applies to fisher_type='true'")


NO_TARGETS_WARNING = (
    "a batch has no targets, so the mean data-label gradient (the first-order term of the damage, "
    "docs/fidelity.md) is not collected and damages are second order only; pass (inputs, "
    "targets) batches to include it, or mean_gradient=False to silence this")


def _per_example_losses(loss_fn: Callable, outputs, targets) -> torch.Tensor:
    losses = loss_fn(outputs, targets)
    if not (isinstance(losses, torch.Tensor) and losses.dim() == 1
            and losses.shape[0] == _batch_size(outputs, losses.shape[0])):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise KFACError(
            f"loss_fn must return one loss per example, shape (N,), got {shape}; "
            "use reduction='none' so the factors are scaled per example")
    return losses


def _backward(taps: List[OutputTap], loss: torch.Tensor, probes: List[torch.Tensor],
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


def fisher_passes(
    model: nn.Module,
    data: Iterable,
    taps: List[OutputTap],
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
    Batches without targets end the data-label part with a warning. Runs in eval mode
    and leaves the model as found (:func:`preserved_model_state`, hooks removed), also on
    errors. Returns the number of examples seen.
    """
    check_fisher_args(fisher_type, num_batches, sample_fn)
    loss_fn = loss_fn or fisher.cross_entropy
    sample_fn = sample_fn or fisher.importance_sample_categorical
    device = _model_device(model)
    try:
        total = len(data)
    except TypeError:
        total = None
    if num_batches is not None:
        total = num_batches if total is None else min(total, num_batches)

    from tqdm.auto import tqdm

    handles, bar, num_examples = [], None, 0.0
    try:
        with preserved_model_state(model):
            handles = [t.module.register_forward_hook(t.forward_hook) for t in taps]
            bar = tqdm(data, total=total, desc=desc, disable=not progress, leave=False)
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
                losses = _per_example_losses(loss_fn, outputs, fisher_targets)
                probes = [p for t in taps for p in t.take_probes()]
                if probes and losses.requires_grad:
                    weights = [t.module.weight for t in taps] if data_gradient else []
                    weighted = losses if scale is None else losses * scale.to(losses.dtype)
                    if fisher_type == "true" and weights:
                        _backward(taps, weighted.sum(), probes, [], fisher_labels=True, retain_graph=True)
                        _backward(taps, _per_example_losses(loss_fn, outputs, targets).sum(), [], weights,
                                  fisher_labels=False)
                    else:
                        _backward(taps, weighted.sum(), probes, weights, fisher_labels=True)
                for t in taps:
                    t.end_batch()
                _raise_if_non_finite(taps, step)
                num_examples += losses.shape[0]
    finally:
        for h in handles:
            h.remove()
        for t in taps:
            t.fisher_labels = True
        if bar is not None:
            bar.close()
    if num_examples == 0:
        raise KFACError("data yielded no batches; pass a non-empty iterable of batches")
    return num_examples


# -- K-FAC factors ------------------------------------------------------------------------------
class _LayerCollector(OutputTap):
    """Records ``Σ a aᵀ`` at forward, ``Σ g gᵀ`` at backward and, with ``mean_gradient``, the
    data-label weight gradient ``Σ_n Σ_t g_t a_tᵀ`` for one layer."""

    def __init__(self, name: str, module: nn.Module, factor_mode: str, mean_gradient: bool):
        super().__init__(name, module)
        self.factor_mode, self.mean_gradient = factor_mode, mean_gradient
        self.factors: Optional[KFACFactors] = None

    def _ensure(self, device) -> KFACFactors:
        if self.factors is None:
            a, m = self.adapter, self.module
            G, d_in, d_out = a.groups(m), a.input_dim(m, self.factor_mode), a.output_dim(m)
            zeros = lambda *s: torch.zeros(*s, device=device, dtype=torch.float32)  # noqa: E731
            self.factors = KFACFactors(
                name=self.name, kind=a.kind, factor_mode=self.factor_mode,
                weight_shape=m.weight.shape, groups=G, input_sum=zeros(G, d_in, d_in),
                input_mean_sum=zeros(G, d_in), grad_sum=zeros(G, d_out, d_out),
                has_bias=getattr(m, "bias", None) is not None,
                mean_grad_sum=zeros(a.weight_blocks(m).shape) if self.mean_gradient else None)
        return self.factors

    def on_forward(self, x, output):
        f = self._ensure(x.device)
        xx, xsum, count = self.adapter.input_moments(self.module, x, output.shape, self.factor_mode)
        f.input_sum += xx
        f.input_mean_sum += xsum
        f.input_count += count

    def on_grad(self, x, grad):
        self.factors.grad_sum += self.adapter.grad_moment(self.module, grad)

    def on_data_weight_grad(self, grad):
        if self.factors.mean_grad_sum is not None:
            self.factors.mean_grad_sum += self.adapter.weight_blocks(self.module, grad.detach().float())

    def discard_data_weight_grad(self) -> None:
        self.mean_gradient = False
        if self.factors is not None:
            self.factors.mean_grad_sum = None

    def non_finite(self) -> Optional[str]:
        """Which accumulated sum went non-finite (NaN/Inf persist in a running sum)."""
        f = self.factors
        if f is None:
            return None
        if not (all_finite(f.input_sum) and all_finite(f.input_mean_sum)):
            return "input activations"
        if not all_finite(f.grad_sum):
            return "output gradients"
        if f.mean_grad_sum is not None and not all_finite(f.mean_grad_sum):
            return "data-label gradients"
        return None


def select_modules(model: nn.Module, modules) -> List[Tuple[str, nn.Module]]:
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


def _all_reduce(factors: List[KFACFactors], num_examples: float, device) -> float:
    """Sum factor sums and counts over ``torch.distributed`` ranks (global average)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return num_examples
    counts = torch.tensor([num_examples] + [c for f in factors for c in (f.input_count, f.num_examples)],
                          dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    for f in factors:
        for t in f._state_tensors():
            dist.all_reduce(t)
    values = counts.tolist()
    for i, f in enumerate(factors):
        f.input_count, f.num_examples = values[1 + 2 * i], values[2 + 2 * i]
    return values[0]


def collect_kfac(
    model: nn.Module,
    data: Iterable,
    *,
    num_batches: Optional[int] = None,
    fisher_type: str = "true",
    factor_mode: str = "channel",
    loss_fn: Optional[Callable] = None,
    sample_fn: Optional[Callable] = None,
    modules: Optional[Iterable[nn.Module]] = None,
    batch_fn: Callable = default_batch_fn,
    forward_fn: Callable = default_forward_fn,
    progress: bool = True,
    mean_gradient: bool = True,
) -> KFACStats:
    """Collect K-FAC factors ``A`` (``input_factor``) and ``S`` (``grad_factor``) per layer,
    and the mean data-label gradient ``mean_grad``.

    Args:
        model: any ``nn.Module``; every ``nn.Conv2d`` / ``nn.Linear`` is covered (or ``modules``).
        data: an iterable of batches (DataLoader, list of ``(inputs, targets)``, dicts, ...).
        num_batches: stop after this many batches (default: the whole iterable).
        fisher_type: ``"true"`` draws labels with ``sample_fn`` (default: importance-sampled
            from the softmax of the logits, :func:`~tp_eigendamage.fisher.importance_sample_categorical`);
            ``"empirical"`` uses the batch targets.
        factor_mode: ``"channel"`` (conv ``A`` is ``in×in``, pooled over kernel offsets) or
            ``"patch"`` (KFC: ``A`` over ``in·kh·kw`` patch vectors).
        loss_fn: ``loss_fn(outputs, targets) -> (N,)`` per-example losses (default: cross
            entropy). Must not average over the batch.
        sample_fn: ``sample_fn(outputs) -> targets`` (or ``WeightedTargets``) for the true Fisher.
        batch_fn: ``batch -> (inputs, targets)``; see :func:`default_batch_fn`.
        forward_fn: ``(model, inputs) -> outputs``; see :func:`default_forward_fn`.
        progress: show a tqdm progress bar.
        mean_gradient: also accumulate ``Ḡ = (1/N) Σ_n ∂ℓ_n(y_n)/∂W`` with the batches' own
            targets (:attr:`KFACFactors.mean_grad`, the damages' first-order term). Batches
            without targets: a warning, and ``mean_grad`` is ``None``.

    Cost per batch: one forward and one backward that stops at the layer outputs (see
    :class:`OutputTap`), plus the factor sums. With ``mean_gradient`` that backward also forms
    the weight gradients (empirical Fisher), or a second, plain backward with the data labels
    forms them (true Fisher).
    The model is evaluated in eval mode and left exactly as found (modes, parameters,
    buffers, ``.grad``, ``requires_grad``, hooks), also when an error is raised. Under an
    initialized ``torch.distributed`` group the sums and counts are all-reduced.
    """
    check_fisher_args(fisher_type, num_batches, sample_fn)
    if factor_mode not in FACTOR_MODES:
        raise KFACError(f"factor_mode={factor_mode!r}; choose one of {FACTOR_MODES}")
    selected = select_modules(model, None if modules is None else list(modules))
    collectors = [_LayerCollector(n, m, factor_mode, mean_gradient) for n, m in selected]
    num_examples = fisher_passes(model, data, collectors, num_batches=num_batches,
                                 fisher_type=fisher_type, loss_fn=loss_fn, sample_fn=sample_fn,
                                 batch_fn=batch_fn, forward_fn=forward_fn, progress=progress,
                                 desc="K-FAC statistics", data_gradient=mean_gradient)
    missing = [c.name for c in collectors if c.factors is None]
    if missing and modules is not None:
        raise KFACError(f"modules= lists layers that never ran in forward: {missing}; "
                        "remove them or check the forward pass")
    done = [c for c in collectors if c.factors is not None]
    for c in done:
        c.factors.num_examples = num_examples
    num_examples = _all_reduce([c.factors for c in done], num_examples, _model_device(model))
    return KFACStats({c.module: c.factors for c in done}, factor_mode=factor_mode,
                     fisher_type=fisher_type, num_examples=num_examples, model=model)
