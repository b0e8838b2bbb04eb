"""Kronecker-factored curvature (K-FAC) statistics for every Conv2d / Linear of a model.

For a layer ``s = W a`` the Fisher block of the per-example loss ``ℓ_n`` is approximated as

    F ≈ A ⊗ S,    A = input_factor,   S = grad_factor       (docs/method.md §1)

with this split of the scale (``N`` examples, ``T`` output locations / tokens per example,
``K`` kernel offsets, ``g = ∂ℓ_n/∂s``):

* ``A`` is the MEAN of ``a aᵀ`` over every sample row: ``E_n[Σ_t a aᵀ] / T``
  (channel mode: ``E_n[Σ_{t,k} x xᵀ] / (T K)``, padding positions counted as zeros);
* ``S`` is the per-EXAMPLE sum ``E_n[Σ_t g gᵀ]``.

so ``A ⊗ S`` is the KFC "expand" approximation of ``E_n[∇ℓ_n ∇ℓ_nᵀ]`` and does not depend
on the batch size. Alongside, ``mean_grad`` is ``Ḡ = E_n[∂ℓ_n(y_n)/∂W]`` with the data
labels, the first-order term of every damage (docs/method.md §4). Grouped convolutions get one
factor pair per group: ``input_factor`` is ``(G, d_in, d_in)`` and ``grad_factor``
``(G, d_out, d_out)`` when ``G > 1`` (2-D otherwise).

Huge layers: a factor of dimension ``d`` takes ``4 d²`` bytes (float32) and its float64
eigendecomposition about ``24 d²`` more and ``O(d³)`` time. Before any allocation, every
factor is checked against ``max_factor_dim`` (default :data:`MAX_FACTOR_DIM`). A Linear whose
input factor would be larger but which reads a flattened ``C×H×W`` map (e.g. VGG's first
classifier layer, 512·7·7 = 25088 inputs) gets channel-structured factors instead: ``A`` is
``C×C`` over the channel vectors at the ``H·W`` positions, which play the part of kernel
offsets in channel mode (``flattened_positions = H·W``; docs/method.md §2) — exactly how
Torch-Pruning couples those inputs to the channels producing them. Any other factor above the
cap raises :class:`~tp_eigendamage.errors.KFACError` naming the layer, the factor size and
the option.

The bias is the homogeneous coordinate: :meth:`KFACFactors.homogeneous_input_factor` returns
``[[A, E a], [E aᵀ, 1]]``; ``input_factor`` is the weight block alone (as curvlinops'
``separate_weight_and_bias=True``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from ._model_state import model_device
from ._options import FACTOR_MODES, FactorMode, FisherType, check_choice
from .eigen import Precision, eigendecompose
from ._passes import OutputTap, all_reduce_sums, check_pass_options, fisher_passes, select_modules
from .batches import default_batch_fn, default_forward_fn
from .errors import KFACError, StaleStatisticsError
from .layer_statistics import LayerStatistics
from .layers import adapter_for

__all__ = ["KFACFactors", "KFACStats", "collect_kfac", "MAX_FACTOR_DIM"]

#: Default cap on a factor's dimension: an 8192×8192 float32 factor takes 256 MiB (its
#: float64 eigendecomposition about 1.5 GiB more).
MAX_FACTOR_DIM = 8192


@dataclass
class KFACFactors:
    """K-FAC factors of one layer (see the module docstring for shapes and scale).

    ``layer_kind`` is the adapter's layer kind (``"linear"`` / ``"conv2d"``); the ``*_sum``
    tensors and counts are the running sums the factors are means of. ``flattened_positions``
    is ``P > 1`` for a Linear with channel-structured factors (module docstring): ``A`` is
    over its ``in/P`` channels and :meth:`weight_blocks` views its weight as ``(1, out, in/P, P)``.
    """

    name: str
    layer_kind: str
    factor_mode: str
    weight_shape: torch.Size
    groups: int
    input_sum: torch.Tensor
    input_mean_sum: torch.Tensor
    grad_sum: torch.Tensor
    input_count: float = 0.0
    num_examples: float = 0.0
    has_bias: bool = False
    flattened_positions: int = 1
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

    def eigen(self, precision: Precision = "float64") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(λ_A, Q_A, λ_S, Q_S)``: float64 eigendecompositions of both factors, cached.

        ``A = Q_A diag(λ_A) Q_Aᵀ`` and ``S = Q_S diag(λ_S) Q_Sᵀ``, eigenvalues ascending,
        tiny or negative ones clamped to 0 (:mod:`tp_eigendamage.eigen`; ``precision`` is used
        when nothing is cached yet). Grouped layers get a leading group dimension.
        """
        if self._eigen is None:
            self.set_eigen(*eigendecompose([self.input_blocks, self.grad_blocks], precision))
        return self._eigen

    def weight_blocks(self, module: nn.Module) -> torch.Tensor:
        """``module``'s weight as ``(G, d_out, d_in, K)`` blocks matching these factors' ``A``
        (channel mode; ``K`` = kernel offsets, or the positions of a flattened map)."""
        return adapter_for(module).weight_blocks(module, self.flattened_positions)

    def set_eigen(self, input_decomposition: Tuple[torch.Tensor, torch.Tensor],
                  grad_decomposition: Tuple[torch.Tensor, torch.Tensor]) -> None:
        """Cache ``(λ_A, Q_A)`` and ``(λ_S, Q_S)`` computed elsewhere (per group)."""
        self._eigen = tuple(self._ungroup(t) for t in (*input_decomposition, *grad_decomposition))

    def check(self, module: nn.Module) -> None:
        """Raise :class:`StaleStatisticsError` unless ``module`` still has the shape seen."""
        weight = getattr(module, "weight", None)
        if weight is None or weight.shape != self.weight_shape or getattr(module, "groups", 1) != self.groups:
            got = None if weight is None else tuple(weight.shape)
            raise StaleStatisticsError(
                f"K-FAC factors of '{self.name}' were collected for weight shape "
                f"{tuple(self.weight_shape)} but the module now has {got}; the model changed "
                "since collect_kfac (e.g. it was pruned). Call collect_kfac again.")

    def state_tensors(self) -> List[torch.Tensor]:
        """The running sums (what a distributed all-reduce adds up)."""
        sums = [self.input_sum, self.input_mean_sum, self.grad_sum]
        return sums + ([] if self.mean_grad_sum is None else [self.mean_grad_sum])


class KFACStats(LayerStatistics[KFACFactors]):
    """K-FAC factors keyed by module; ``stats[module]`` is a :class:`KFACFactors`.

    Attributes:
        model: the model the factors were collected on.
        factor_mode: ``"channel"`` or ``"patch"``.
        fisher_type: ``"true"`` or ``"empirical"``.
        num_examples: examples seen (over all ranks).
    """

    what = "K-FAC factors"
    collector = "collect_kfac"

    def __init__(self, factors: "dict[nn.Module, KFACFactors]", *, factor_mode: str,
                 fisher_type: str, num_examples: float, model: Optional[nn.Module] = None):
        super().__init__(factors, {m: f.name for m, f in factors.items()}, model)
        self.factor_mode = factor_mode
        self.fisher_type = fisher_type
        self.num_examples = num_examples

    def _check(self, module: nn.Module, entry: KFACFactors) -> None:
        entry.check(module)

    def eigendecompose(self, modules: Iterable[nn.Module], precision: Precision = "float64") -> None:
        """Decompose the factors of ``modules`` not decomposed yet, all at once, scheduled for
        the hardware (:func:`tp_eigendamage.eigen.eigendecompose`); each factor exactly once."""
        todo = [f for f in (self[m] for m in modules) if f._eigen is None]
        todo = list({id(f): f for f in todo}.values())
        done = eigendecompose([t for f in todo for t in (f.input_blocks, f.grad_blocks)], precision)
        for k, f in enumerate(todo):
            f.set_eigen(done[2 * k], done[2 * k + 1])

    def __repr__(self) -> str:
        return (f"KFACStats({len(self)} layers, factor_mode={self.factor_mode!r}, "
                f"fisher_type={self.fisher_type!r}, examples={self.num_examples:g})")


def _gib(dim: int) -> str:
    return f"{4 * dim * dim / 2 ** 30:.2g} GiB"


class _LayerCollector(OutputTap):
    """Records ``Σ a aᵀ`` at forward, ``Σ g gᵀ`` at backward and, with ``mean_gradient``, the
    data-label weight gradient ``Σ_n Σ_t g_t a_tᵀ`` for one layer."""

    def __init__(self, name: str, module: nn.Module, factor_mode: str, max_factor_dim: int,
                 mean_gradient: bool):
        super().__init__(name, module)
        self.factor_mode, self.max_factor_dim, self.mean_gradient = factor_mode, max_factor_dim, mean_gradient
        self.factors: Optional[KFACFactors] = None

    def _too_large(self, side: str, dim: int, hint: str = "") -> KFACError:
        return KFACError(
            f"layer '{self.name}' ({type(self.module).__name__}) needs a {dim}×{dim} {side} factor "
            f"({_gib(dim)} in float32, several times that to eigendecompose), above "
            f"max_factor_dim={self.max_factor_dim}{hint}. Raise max_factor_dim= if the memory and "
            "time are acceptable, or leave the layer out (collect_kfac(modules=...)).")

    def _positions(self, x: torch.Tensor) -> int:
        """1, or the positions of a flattened map when the dense input factor is too large."""
        a, m = self.adapter, self.module
        dense = a.input_dim(m, self.factor_mode)
        if dense <= self.max_factor_dim:
            return 1
        structure = a.flattened_map(m, x)
        if structure is None or self.factor_mode != "channel":
            raise self._too_large("input", dense, "" if self.factor_mode != "channel" else
                                  ", and its input is not a flattened C×H×W map that could be "
                                  "factored per channel")
        channels, positions = structure
        if channels > self.max_factor_dim:
            raise self._too_large("input", channels, " even per channel of its flattened input")
        return positions

    def _ensure(self, x: torch.Tensor) -> KFACFactors:
        if self.factors is None:
            a, m = self.adapter, self.module
            positions = self._positions(x)
            G, d_in, d_out = a.groups(m), a.input_dim(m, self.factor_mode, positions), a.output_dim(m)
            if d_out > self.max_factor_dim:
                raise self._too_large("output", d_out)

            def zeros(*shape):
                return torch.zeros(*shape, device=x.device, dtype=torch.float32)

            self.factors = KFACFactors(
                name=self.name, layer_kind=a.layer_kind, factor_mode=self.factor_mode,
                weight_shape=m.weight.shape, groups=G, input_sum=zeros(G, d_in, d_in),
                input_mean_sum=zeros(G, d_in), grad_sum=zeros(G, d_out, d_out),
                has_bias=getattr(m, "bias", None) is not None, flattened_positions=positions,
                mean_grad_sum=zeros(a.weight_blocks(m, positions).shape) if self.mean_gradient else None)
        return self.factors

    def on_forward(self, x, output):
        f = self._ensure(x)
        xx, xsum, count = self.adapter.input_moments(self.module, x, output.shape, self.factor_mode,
                                                     f.flattened_positions)
        f.input_sum += xx
        f.input_mean_sum += xsum
        f.input_count += count

    def on_grad(self, x, grad):
        self.factors.grad_sum += self.adapter.grad_moment(self.module, grad)

    def on_data_weight_grad(self, grad):
        if self.factors.mean_grad_sum is not None:
            self.factors.mean_grad_sum += self.adapter.weight_blocks(
                self.module, self.factors.flattened_positions, grad.detach().float())

    def discard_data_weight_grad(self) -> None:
        self.mean_gradient = False
        if self.factors is not None:
            self.factors.mean_grad_sum = None

    #: what each of :meth:`KFACFactors.state_tensors` sums (the last only with the mean gradient)
    SUMMED = ("input activations", "input activations", "output gradients", "data-label gradients")

    def running_sums(self) -> List[Tuple[str, torch.Tensor]]:
        return [] if self.factors is None else list(zip(self.SUMMED, self.factors.state_tensors()))


def collect_kfac(
    model: nn.Module,
    data: Iterable,
    *,
    num_batches: Optional[int] = None,
    fisher_type: FisherType = "true",
    factor_mode: FactorMode = "channel",
    loss_fn: Optional[Callable] = None,
    sample_fn: Optional[Callable] = None,
    modules: Optional[Iterable[nn.Module]] = None,
    batch_fn: Callable = default_batch_fn,
    forward_fn: Callable = default_forward_fn,
    progress: bool = True,
    max_factor_dim: int = MAX_FACTOR_DIM,
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
        modules: the layers to cover (default: every ``nn.Conv2d`` / ``nn.Linear``).
        batch_fn: ``batch -> (inputs, targets)``; see :func:`~tp_eigendamage.batches.default_batch_fn`.
        forward_fn: ``(model, inputs) -> outputs``; see :func:`~tp_eigendamage.batches.default_forward_fn`.
        progress: show a tqdm progress bar.
        max_factor_dim: the largest factor dimension allowed (module docstring): a Linear
            reading a flattened map above it gets channel-structured factors, anything else
            above it raises before allocating.
        mean_gradient: also accumulate ``Ḡ = (1/N) Σ_n ∂ℓ_n(y_n)/∂W`` with the batches' own
            targets (:attr:`KFACFactors.mean_grad`, the damages' first-order term). Batches
            without targets: a warning, and ``mean_grad`` is ``None``.

    Returns:
        :class:`KFACStats`, keyed by module (``stats.for_model(copy)`` re-keys them onto a copy).

    Raises:
        KFACError: bad options or data, a model that cannot consume a batch, non-finite
            parameters, activations, outputs or gradients (naming the layer), a loss that is
            not per example, a factor above ``max_factor_dim``.

    Cost per batch: one forward and one backward that stops at the layer outputs (docs/method.md
    §1), plus the factor sums. With ``mean_gradient`` that backward also forms the weight
    gradients (empirical Fisher), or a second, plain backward with the data labels forms them
    (true Fisher). The model is evaluated in
    eval mode and left exactly as found (modes, parameters, buffers, ``.grad``,
    ``requires_grad``, hooks), also when an error is raised. Under an initialized
    ``torch.distributed`` group the sums and counts are all-reduced.
    """
    check_pass_options(fisher_type, num_batches, sample_fn)
    check_choice(factor_mode, "factor_mode", FACTOR_MODES, KFACError)
    if isinstance(max_factor_dim, bool) or not isinstance(max_factor_dim, int) or max_factor_dim < 1:
        raise KFACError(f"max_factor_dim={max_factor_dim!r}; pass a positive integer (default {MAX_FACTOR_DIM})")
    selected = select_modules(model, None if modules is None else list(modules))
    collectors = [_LayerCollector(n, m, factor_mode, max_factor_dim, mean_gradient) for n, m in selected]
    num_examples = fisher_passes(model, data, collectors, num_batches=num_batches,
                                 fisher_type=fisher_type, loss_fn=loss_fn, sample_fn=sample_fn,
                                 batch_fn=batch_fn, forward_fn=forward_fn, progress=progress,
                                 desc="K-FAC statistics", data_gradient=mean_gradient)
    missing = [c.name for c in collectors if c.factors is None]
    if missing and modules is not None:
        raise KFACError(f"modules= lists layers that never ran in forward: {missing}; "
                        "remove them or check the forward pass")
    factors = [c.factors for c in collectors if c.factors is not None]
    counts = all_reduce_sums([t for f in factors for t in f.state_tensors()],
                             [num_examples] + [f.input_count for f in factors], model_device(model))
    num_examples = counts[0]
    for f, input_count in zip(factors, counts[1:]):
        f.input_count, f.num_examples = input_count, num_examples
    return KFACStats({c.module: c.factors for c in collectors if c.factors is not None},
                     factor_mode=factor_mode, fisher_type=fisher_type, num_examples=num_examples,
                     model=model)
