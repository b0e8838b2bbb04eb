"""The Kronecker-factored eigenbasis (KFE) reparameterization (MATH.md §2, §4, §5).

A layer ``y = W x + b`` becomes three plain layers that Torch-Pruning traces as usual::

    x → rotate_in (Q_Aᵀ, 1×1 conv / linear) → core (W* = Q_Sᵀ W Q_A, original kernel)
      → rotate_out (Q_S, original bias) → y

In these coordinates the K-FAC Fisher ``A ⊗ S`` is diagonal with entries ``λ_S,i λ_A,j``, so
removing a core input channel (eigen-direction j of A) or output channel (direction i of S)
costs exactly the ``damage_in`` / ``damage_out`` of MATH.md §3.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn


class KFEBlock(nn.Module):
    """``rotate_in → core → rotate_out``, built only from ``nn.Conv2d`` / ``nn.Linear``.

    Buffers (fixed when the block is built or re-rotated, never pruned by Torch-Pruning):

    * ``basis_in``  ``(in, r_in)``:  the columns of ``Q_A`` (the eigenbasis of A) at build time;
    * ``basis_out`` ``(out, r_out)``: the columns of ``Q_S``;
    * ``eigen_in``  ``(r_in,)``:  ``λ_A``, eigenvalue of each column of ``basis_in``;
    * ``eigen_out`` ``(r_out,)``: ``λ_S``;
    * ``fisher_diag`` ``(r_out, r_in)``: the Fisher diagonal in the KFE, ``λ_S,i λ_A,j`` or,
      after eigenvalue correction (EK-FAC), the refit ``E[(Q_Sᵀ G Q_A)_ij²]``.

    Torch-Pruning removes rows of ``rotate_in`` / columns of ``core`` (input directions) and
    rows of ``core`` / columns of ``rotate_out`` (output directions) without knowing these
    buffers; :meth:`surviving_directions` recovers which stored directions are still present
    by projecting the current rotation weights onto the stored bases.
    """

    def __init__(self, rotate_in: nn.Module, core: nn.Module, rotate_out: nn.Module,
                 eigen_in: torch.Tensor, eigen_out: torch.Tensor,
                 basis_in: torch.Tensor, basis_out: torch.Tensor,
                 fisher_diag: torch.Tensor):
        super().__init__()
        self.rotate_in = rotate_in
        self.core = core
        self.rotate_out = rotate_out
        self.register_buffer("eigen_in", eigen_in)
        self.register_buffer("eigen_out", eigen_out)
        self.register_buffer("basis_in", basis_in)
        self.register_buffer("basis_out", basis_out)
        self.register_buffer("fisher_diag", fisher_diag)

    def forward(self, x):
        return self.rotate_out(self.core(self.rotate_in(x)))

    def rotation_in_matrix(self) -> torch.Tensor:
        """Current input rotation as ``(r_in_now, in)`` (rows are directions)."""
        return self.rotate_in.weight.reshape(self.rotate_in.weight.shape[0], -1)

    def rotation_out_matrix(self) -> torch.Tensor:
        """Current output rotation as ``(out, r_out_now)`` (columns are directions)."""
        return self.rotate_out.weight.reshape(self.rotate_out.weight.shape[0], -1)

    def surviving_directions(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Indices into ``eigen_in`` / ``eigen_out`` of the directions the block still has."""
        in_idx = (self.rotation_in_matrix().detach().double() @ self.basis_in.double()).abs().argmax(dim=1)
        out_idx = (self.basis_out.double().T @ self.rotation_out_matrix().detach().double()).abs().argmax(dim=0)
        return in_idx, out_idx
