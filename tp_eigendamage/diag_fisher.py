"""Diagonal Fisher from per-example squared gradients (the C-OBD criterion's curvature).

For every Conv2d / Linear the diagonal of the Fisher of the per-example loss is

    F_diag = E_n[G_n ⊙ G_n],   G_n = Σ_t g_t a_tᵀ   (per-example weight gradient)

on the same scale as K-FAC's ``A ⊗ S``, and (``mean_gradient=True``) the mean data-label
gradient ``Ḡ = E_n[∂ℓ_n(y_n)/∂W]`` for the damages' first-order term. ``G_n`` comes from a
forward hook (``a``) and a tensor hook on the layer output (``g = ∂ℓ_n/∂s``) via the layer
adapters; batching, labels and model-state handling are kfac.py's.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, Mapping, Optional

import torch
import torch.nn as nn

from .kfac import OutputTap, StaleStatisticsError, all_finite, fisher_passes, select_modules
from .layers import adapter_for

#: Per-example gradients are formed for at most this many weight entries at a time.
CHUNK_ELEMENTS = 1 << 24


class FisherDiagStats(Mapping):
    """Diagonal Fisher keyed by module; ``stats[module]`` is ``(G, out/G, in/G, K)`` like
    :meth:`LayerAdapter.weight_blocks`."""

    def __init__(self, diagonals: Dict[nn.Module, torch.Tensor], names: Dict[nn.Module, str],
                 num_examples: float, model: nn.Module,
                 mean_grads: Optional[Dict[nn.Module, torch.Tensor]] = None):
        self._diagonals, self._names, self._mean_grads = diagonals, names, mean_grads or {}
        self.num_examples, self.model = num_examples, model

    def __getitem__(self, module: nn.Module) -> torch.Tensor:
        try:
            diag = self._diagonals[module]
        except KeyError:
            raise KeyError(f"no diagonal Fisher for {type(module).__name__} module; it was not "
                           "covered by collect_fisher_diag") from None
        if diag.shape != adapter_for(module).weight_blocks(module).shape:
            raise StaleStatisticsError(
                f"diagonal Fisher of '{self._names[module]}' has shape {tuple(diag.shape)} but the "
                f"module's weight no longer matches (it was pruned); call collect_fisher_diag again")
        return diag

    def mean_grad(self, module: nn.Module) -> Optional[torch.Tensor]:
        """``Ḡ = E_n[∂ℓ_n(y_n)/∂W]`` (data labels) shaped like ``self[module]``, or ``None`` if
        not collected."""
        self[module]  # the same checks
        return self._mean_grads.get(module)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._diagonals)

    def __len__(self) -> int:
        return len(self._diagonals)


class _SquaredGradCollector(OutputTap):
    """Accumulates ``Σ_n G_n ⊙ G_n`` from the layer's input and output gradient."""

    def __init__(self, name: str, module: nn.Module, mean_gradient: bool):
        super().__init__(name, module)
        self.sum: Optional[torch.Tensor] = None
        self.collect_mean_grad = mean_gradient
        self.grad_sum: Optional[torch.Tensor] = None

    def on_grad(self, x, g):
        per_example = max(1, self.module.weight.numel())
        chunk = max(1, CHUNK_ELEMENTS // per_example)
        for start in range(0, x.shape[0], chunk):
            grads = self.adapter.per_example_grads(self.module, x[start:start + chunk], g[start:start + chunk])
            sq = grads.square().sum(0)
            self.sum = sq if self.sum is None else self.sum + sq

    def on_data_weight_grad(self, grad):
        if self.collect_mean_grad:
            blocks = self.adapter.weight_blocks(self.module, grad.detach().float())
            self.grad_sum = blocks if self.grad_sum is None else self.grad_sum + blocks

    def discard_data_weight_grad(self) -> None:
        self.collect_mean_grad, self.grad_sum = False, None

    def non_finite(self) -> Optional[str]:
        return None if self.sum is None or all_finite(self.sum) else "per-example gradients"


def collect_fisher_diag(model: nn.Module, data: Iterable, *, modules: Optional[Iterable[nn.Module]] = None,
                        mean_gradient: bool = True, **pass_options) -> FisherDiagStats:
    """Diagonal Fisher ``E_n[G_n²]`` of every Conv2d / Linear (or ``modules``) and, with
    ``mean_gradient``, the mean data-label gradient (:meth:`FisherDiagStats.mean_grad`; as in
    :func:`~tp_eigendamage.collect_kfac`).

    ``pass_options`` (``num_batches``, ``fisher_type``, ``loss_fn``, ``sample_fn``,
    ``batch_fn``, ``forward_fn``, ``progress``) mean what they mean in :func:`collect_kfac`:
    the same Fisher passes (:func:`~tp_eigendamage.kfac.fisher_passes`), batch handling, label
    sampling, errors and model-state restoration. Models must be batch-first (the per-example
    gradient of example n sums over every other axis).
    """
    collectors = [_SquaredGradCollector(n, m, mean_gradient) for n, m in
                  select_modules(model, None if modules is None else list(modules))]
    num_examples = fisher_passes(model, data, collectors, desc="diagonal Fisher",
                                 data_gradient=mean_gradient, **pass_options)
    done = [c for c in collectors if c.sum is not None]
    return FisherDiagStats({c.module: c.sum / num_examples for c in done},
                           {c.module: c.name for c in done}, num_examples, model,
                           {c.module: c.grad_sum / num_examples for c in done if c.grad_sum is not None})
