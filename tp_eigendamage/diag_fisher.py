"""Diagonal Fisher from per-example squared gradients (the C-OBD criterion's curvature).

For every Conv2d / Linear the diagonal of the Fisher of the per-example loss is

    F_diag = E_n[G_n ⊙ G_n],   G_n = Σ_t g_t a_tᵀ   (per-example weight gradient)

on the same scale as K-FAC's ``A ⊗ S`` (docs/method.md §8), and (``mean_gradient=True``) the
mean data-label gradient ``Ḡ = E_n[∂ℓ_n(y_n)/∂W]`` for the damages' first-order term
(docs/method.md §4). ``G_n`` comes from a forward hook (``a``) and a tensor hook on the layer
output (``g = ∂ℓ_n/∂s``) via the layer adapters; batching, labels and model-state handling are
the Fisher-pass engine's.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from ._model_state import model_device
from ._passes import PerExampleGradientTap, all_reduce_sums, fisher_passes, select_modules
from .errors import StaleStatisticsError
from .layer_statistics import LayerStatistics
from .layers import adapter_for

__all__ = ["FisherDiagStats", "collect_fisher_diag"]


class FisherDiagStats(LayerStatistics[torch.Tensor]):
    """Diagonal Fisher keyed by module; ``stats[module]`` is ``(G, out/G, in/G, K)`` like
    :meth:`~tp_eigendamage.layers.LayerAdapter.weight_blocks`.

    Attributes:
        model: the model the diagonal was collected on.
        num_examples: examples seen (over all ranks).
    """

    what = "diagonal Fisher"
    collector = "collect_fisher_diag"

    def __init__(self, diagonals: Dict[nn.Module, torch.Tensor], names: Dict[nn.Module, str],
                 num_examples: float, model: Optional[nn.Module] = None,
                 mean_grads: Optional[Dict[str, torch.Tensor]] = None):
        super().__init__(diagonals, names, model)
        self.num_examples = num_examples
        self._mean_grads = mean_grads or {}

    def _check(self, module: nn.Module, entry: torch.Tensor) -> None:
        adapter = adapter_for(module)
        if adapter is None or entry.shape != adapter.weight_blocks(module).shape:
            raise StaleStatisticsError(
                f"diagonal Fisher of '{self.name_of(module)}' has shape {tuple(entry.shape)} but "
                "the module's weight no longer matches (it was pruned); call collect_fisher_diag again")

    def mean_grad(self, module: nn.Module) -> Optional[torch.Tensor]:
        """``Ḡ = E_n[∂ℓ_n(y_n)/∂W]`` (data labels) shaped like ``self[module]``, or ``None`` if
        not collected."""
        self[module]  # the same checks
        return self._mean_grads.get(self.name_of(module))


class _SquaredGradCollector(PerExampleGradientTap):
    """Accumulates ``Σ_n G_n ⊙ G_n`` of one layer's per-example gradients."""

    def __init__(self, name: str, module: nn.Module, mean_gradient: bool):
        super().__init__(name, module)
        self.sum: Optional[torch.Tensor] = None
        self.collect_mean_grad = mean_gradient
        self.grad_sum: Optional[torch.Tensor] = None

    def add_gradients(self, grads: torch.Tensor) -> None:
        sq = grads.square().sum(0)
        self.sum = sq if self.sum is None else self.sum + sq

    def on_data_weight_grad(self, grad):
        if self.collect_mean_grad:
            blocks = self.adapter.weight_blocks(self.module, weight=grad.detach().float())
            self.grad_sum = blocks if self.grad_sum is None else self.grad_sum + blocks

    def discard_data_weight_grad(self) -> None:
        self.collect_mean_grad, self.grad_sum = False, None

    def running_sums(self) -> List[Tuple[str, torch.Tensor]]:
        return [(what, t) for what, t in (("per-example gradients", self.sum),
                                          ("data-label gradients", self.grad_sum)) if t is not None]


def collect_fisher_diag(model: nn.Module, data: Iterable, *, modules: Optional[Iterable[nn.Module]] = None,
                        mean_gradient: bool = True, **pass_options) -> FisherDiagStats:
    """Diagonal Fisher ``E_n[G_n²]`` of every Conv2d / Linear (or ``modules``) and, with
    ``mean_gradient``, the mean data-label gradient (:meth:`FisherDiagStats.mean_grad`; as in
    :func:`~tp_eigendamage.collect_kfac`).

    Args:
        model, data, modules: as for :func:`~tp_eigendamage.collect_kfac`.
        **pass_options: ``num_batches``, ``fisher_type``, ``loss_fn``, ``sample_fn``,
            ``batch_fn``, ``forward_fn``, ``progress``, meaning what they mean in
            :func:`~tp_eigendamage.collect_kfac` (the same Fisher passes, batch handling,
            label sampling, errors and model-state restoration).

    Returns:
        :class:`FisherDiagStats` keyed by module.

    Raises:
        KFACError: as :func:`~tp_eigendamage.collect_kfac`.

    Models must be batch-first (the per-example gradient of example n sums over every other axis).
    """
    collectors = [_SquaredGradCollector(n, m, mean_gradient) for n, m in
                  select_modules(model, None if modules is None else list(modules))]
    num_examples = fisher_passes(model, data, collectors, desc="diagonal Fisher",
                                 data_gradient=mean_gradient, **pass_options)
    done = [c for c in collectors if c.sum is not None]
    mean_grads = [c for c in done if c.grad_sum is not None]
    num_examples, = all_reduce_sums([c.sum for c in done] + [c.grad_sum for c in mean_grads], [num_examples],
                                    model_device(model))
    return FisherDiagStats({c.module: c.sum / num_examples for c in done},
                           {c.module: c.name for c in done}, num_examples, model,
                           {c.name: c.grad_sum / num_examples for c in mean_grads})
