"""Diagonal Fisher from per-example squared gradients (the C-OBD criterion's curvature).

For every Conv2d / Linear the diagonal of the Fisher of the per-example loss is

    F_diag = E_n[G_n ⊙ G_n],   G_n = Σ_t g_t a_tᵀ   (per-example weight gradient)

on the same scale as K-FAC's ``A ⊗ S`` (MATH.md §1). ``G_n`` comes from a forward hook
(``a``) and a tensor hook on the layer output (``g = ∂ℓ_n/∂s``) via the layer adapters;
batching, labels and model-state handling are kfac.py's.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, Mapping, Optional

import torch
import torch.nn as nn

from .kfac import OutputTap, StaleStatisticsError, fisher_passes, select_modules
from .layers import adapter_for

#: Per-example gradients are formed for at most this many weight entries at a time.
CHUNK_ELEMENTS = 1 << 24


class FisherDiagStats(Mapping):
    """Diagonal Fisher keyed by module; ``stats[module]`` is ``(G, out/G, in/G, K)`` like
    :meth:`LayerAdapter.weight_blocks`."""

    def __init__(self, diagonals: Dict[nn.Module, torch.Tensor], names: Dict[nn.Module, str],
                 num_examples: float, model: nn.Module):
        self._diagonals, self._names = diagonals, names
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

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._diagonals)

    def __len__(self) -> int:
        return len(self._diagonals)


class _SquaredGradCollector(OutputTap):
    """Accumulates ``Σ_n G_n ⊙ G_n`` from the layer's input and output gradient."""

    def __init__(self, name: str, module: nn.Module):
        super().__init__(name, module)
        self.sum: Optional[torch.Tensor] = None

    def on_grad(self, x, g):
        per_example = max(1, self.module.weight.numel())
        chunk = max(1, CHUNK_ELEMENTS // per_example)
        for start in range(0, x.shape[0], chunk):
            grads = self.adapter.per_example_grads(self.module, x[start:start + chunk], g[start:start + chunk])
            sq = grads.square().sum(0)
            self.sum = sq if self.sum is None else self.sum + sq

    def non_finite(self) -> Optional[str]:
        return None if self.sum is None or torch.isfinite(self.sum).all() else "per-example gradients"


def collect_fisher_diag(model: nn.Module, data: Iterable, *,
                        modules: Optional[Iterable[nn.Module]] = None, **pass_options) -> FisherDiagStats:
    """Diagonal Fisher ``E_n[G_n²]`` of every Conv2d / Linear (or ``modules``).

    ``pass_options`` (``num_batches``, ``fisher_type``, ``loss_fn``, ``sample_fn``,
    ``batch_fn``, ``forward_fn``, ``progress``) mean what they mean in :func:`collect_kfac`:
    the same Fisher passes (:func:`~tp_eigendamage.kfac.fisher_passes`), batch handling, label
    sampling, errors and model-state restoration. Models must be batch-first (the per-example
    gradient of example n sums over every other axis).
    """
    collectors = [_SquaredGradCollector(n, m) for n, m in
                  select_modules(model, None if modules is None else list(modules))]
    num_examples = fisher_passes(model, data, collectors, desc="diagonal Fisher", **pass_options)
    done = [c for c in collectors if c.sum is not None]
    return FisherDiagStats({c.module: c.sum / num_examples for c in done},
                           {c.module: c.name for c in done}, num_examples, model)
