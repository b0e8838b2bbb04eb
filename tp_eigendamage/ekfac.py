"""Eigenvalue-corrected K-FAC (EK-FAC, George et al. 2018) for KFE blocks (docs/method.md §5).

K-FAC's Fisher diagonal in the KFE is ``λ_S,i λ_A,j``. EK-FAC replaces it by the second moment
of the per-example gradient projected into the KFE. The core of a KFE block already works in
those coordinates (its inputs are rotated by ``Q_Aᵀ``, its outputs by ``Q_S``), so its
per-example weight gradient IS the projected gradient ``Q_Sᵀ G_n Q_A``:

    (G_n)_{i,j,k} = Σ_t g_{n,t,i} x_{n,t,k,j}

with ``g = ∂ℓ_n/∂s`` at the core's output location / token t and ``x_{n,t,k}`` the core input
seen by kernel offset k (Linear: K = 1, every token a location). The refit is

    F_ij = E_n[ (1/K) Σ_k (G_n)_{i,j,k}² ]

one value per (output, input) direction shared by every kernel offset, as ``fisher_diag``
is used: ``damage = ½ Σ_k (W*_{ijk})² F_ij``. The ``1/K`` matches channel-mode K-FAC, whose
``A`` averages over kernel offsets: with one example and one output location (where K-FAC is
exact) ``F_ij = g*_i² · (1/K) Σ_k x*_{kj}² = λ_S,i λ_A,j``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

from ._model_state import model_device
from ._passes import PerExampleGradientTap, all_reduce_sums, fisher_passes
from .errors import KFEError
from .kfe import kfe_blocks
from .kfe_block import KFEBlock

__all__ = ["fit_eigen_correction"]


class _CoreRecorder(PerExampleGradientTap):
    """Accumulates ``Σ_n Σ_k G_n²`` of one core's per-example gradients (float64)."""

    def __init__(self, name: str, block: KFEBlock):
        super().__init__(name, block.core)
        self.block, self.core = block, block.core
        self.sq_sum: Optional[torch.Tensor] = None

    def add_gradients(self, grads: torch.Tensor) -> None:
        sq = grads[:, 0].double().pow(2).sum(dim=(0, 3))
        self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq

    def non_finite(self) -> Optional[str]:
        ok = self.sq_sum is None or torch.isfinite(self.sq_sum).all()
        return None if ok else "per-example gradients in the KFE"


def fit_eigen_correction(model: nn.Module, data, **pass_options) -> Dict[str, torch.Tensor]:
    """Refit every KFE block's ``fisher_diag`` with EK-FAC: ``F_ij = E_n[(1/K) Σ_k (G_n)_ijk²]``.

    Args:
        model: a model holding KFE blocks (:func:`~tp_eigendamage.to_kfe`).
        data: batches, as for :func:`~tp_eigendamage.collect_kfac`.
        **pass_options: ``num_batches``, ``fisher_type``, ``loss_fn``, ``sample_fn``,
            ``batch_fn``, ``forward_fn``, ``progress`` — the same Fisher passes as
            :func:`~tp_eigendamage.collect_kfac` (batch handling, label sampling, model-state
            restoration, errors). Taps on the cores record per-example gradients, vectorized
            over the batch.

    Returns:
        ``{block name: fisher_diag}``. Each block's buffers are cut to its surviving directions
        (:meth:`~tp_eigendamage.KFEBlock.keep_surviving_buffers`), ``fisher_diag`` is
        ``(r_out_now, r_in_now)`` in the core's channel order and ``block.eigen_corrected`` is
        True. Under ``torch.distributed`` the sums are all-reduced (global average).

    Raises:
        KFEError: the model has no KFE blocks, or a core never ran in forward.
        KFACError: as :func:`~tp_eigendamage.collect_kfac`.
    """
    blocks = kfe_blocks(model)
    if not blocks:
        raise KFEError("the model has no KFE blocks; call to_kfe(model, stats) first")
    recorders = [_CoreRecorder(name, blk) for name, blk in blocks]
    num_examples = fisher_passes(model, data, recorders, desc="EK-FAC refit", **pass_options)
    idle = [r.name for r in recorders if r.sq_sum is None]
    if idle:
        raise KFEError(f"the cores of {idle} never ran in forward; check the forward pass")
    num_examples, = all_reduce_sums([r.sq_sum for r in recorders], [num_examples], model_device(model))
    refits = [(r, r.sq_sum / (num_examples * r.adapter.kernel_numel(r.core))) for r in recorders]
    for r, F in refits:
        r.block.keep_surviving_buffers()
        r.block.fisher_diag = F.to(r.block.fisher_diag.device, r.block.fisher_diag.dtype)
        r.block.eigen_corrected = True
    return {r.name: r.block.fisher_diag for r in recorders}
