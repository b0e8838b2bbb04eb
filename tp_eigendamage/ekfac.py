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

The same per-example gradients give the Fisher's quadratic form along each single removal
EXACTLY (no diagonal, Kronecker or spatial approximation): removing input direction j changes
the core weight by ``−W*_{:,j,:}``, so

    removal_in_j  = E_n[ (Σ_{i,k} (G_n)_{ijk} W*_{ijk})² ],
    removal_out_i = E_n[ (Σ_{j,k} (G_n)_{ijk} W*_{ijk})² ]

(stored as ``KFEBlock.removal_fisher_in`` / ``removal_fisher_out``). After a refit the
EigenDamage of direction j is ``first-order term + ½ removal_in_j`` (docs/fidelity.md).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

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
        self.removal_sums: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.grad_sum: Optional[torch.Tensor] = None
        self.collect_mean_grad = True

    def on_data_weight_grad(self, grad):
        if self.collect_mean_grad:
            total = self.adapter.weight_blocks(self.core, weight=grad.detach().double())[0]
            self.grad_sum = total if self.grad_sum is None else self.grad_sum + total

    def discard_data_weight_grad(self) -> None:
        self.collect_mean_grad, self.grad_sum = False, None

    def add_gradients(self, grads: torch.Tensor) -> None:
        """``Σ_n Σ_k G_n²`` and ``Σ_n (Σ G_n ⊙ W*)²`` per input / output direction of a chunk
        of per-example gradients ``G_n``."""
        G = grads[:, 0].double()
        core = self.adapter.weight_blocks(self.core)[0].detach().double()
        along = G * core
        sums = (G.pow(2).sum(dim=(0, 3)), along.sum(dim=(1, 3)).pow(2).sum(0),
                along.sum(dim=(2, 3)).pow(2).sum(0))
        if self.sq_sum is None:
            self.sq_sum, self.removal_sums = sums[0], sums[1:]
        else:
            self.sq_sum = self.sq_sum + sums[0]
            self.removal_sums = tuple(a + b for a, b in zip(self.removal_sums, sums[1:]))

    def running_sums(self) -> List[Tuple[str, torch.Tensor]]:
        sums = [("per-example gradients in the KFE", t) for t in (self.sq_sum, *(self.removal_sums or ()))]
        return [(what, t) for what, t in sums + [("data-label gradients", self.grad_sum)] if t is not None]


def fit_eigen_correction(model: nn.Module, data, *, mean_gradient: bool = True,
                         **pass_options) -> Dict[str, torch.Tensor]:
    """Refit every KFE block's ``fisher_diag`` with EK-FAC, ``F_ij = E_n[(1/K) Σ_k (G_n)_ijk²]``,
    its exact single-removal Fisher ``removal_fisher_in`` / ``removal_fisher_out`` (module
    docstring) and, with ``mean_gradient``, its ``mean_grad`` ``Ḡ* = E_n[∂ℓ_n(y_n)/∂W*]`` (data
    labels; kept as it was if the batches have no targets).

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
    num_examples = fisher_passes(model, data, recorders, desc="EK-FAC refit",
                                 data_gradient=mean_gradient, **pass_options)
    idle = [r.name for r in recorders if r.sq_sum is None]
    if idle:
        raise KFEError(f"the cores of {idle} never ran in forward; check the forward pass")
    num_examples, = all_reduce_sums([t for r in recorders for t in (r.sq_sum, *r.removal_sums, r.grad_sum)
                                     if t is not None], [num_examples], model_device(model))
    refits = [(r, r.sq_sum / (num_examples * r.adapter.kernel_numel(r.core))) for r in recorders]
    for r, F in refits:
        r.block.keep_surviving_buffers()
        like = r.block.fisher_diag
        cast = lambda t: (t / num_examples).to(like.device, like.dtype)  # noqa: E731
        r.block.fisher_diag = F.to(like.device, like.dtype)
        r.block.removal_fisher_in, r.block.removal_fisher_out = (cast(t) for t in r.removal_sums)
        if r.grad_sum is not None:
            r.block.mean_grad = cast(r.grad_sum)
        r.block.eigen_corrected = True
    return {r.name: r.block.fisher_diag for r in recorders}
