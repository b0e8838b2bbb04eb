"""Damage terms of a :class:`~tp_eigendamage.kfe_block.KFEBlock` (docs/method.md §4, §8), kept
while the block is unchanged.

* :func:`direction_terms`: EigenDamage of removing each surviving eigen-direction (the core's
  input and output channels);
* :func:`outer_kron_terms`: Kron-OBD of removing each of the block's outer channels, the block
  taken as one layer (:meth:`KFEBlock.outer_kron_operands`);
* :func:`remember_output_terms`: the outer output terms of a block just built from a layer,
  from by-products of its rotation.

Terms are kept per block (outside the module, so that copies and pickles of a block start
without them) with weak references to every weight and buffer they depend on and their
versions: a block whose tensors were replaced (Torch-Pruning) or changed in place (training,
re-rotation, EK-FAC refit) computes them again.
"""
from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .damage import DamageTerms, eigen_terms, kron_in_terms, kron_out_terms
from .plain_layers import weight_3d

__all__ = ["direction_terms", "outer_kron_terms", "remember_output_terms", "select"]

# block → {what: (watched tensors, terms)}
_KEPT: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def select(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """``t.index_select(dim, idx)``, or ``t`` itself when ``idx`` is every index in order."""
    in_order = len(idx) == t.shape[dim] and torch.equal(idx, torch.arange(len(idx), device=idx.device))
    return t if in_order else t.index_select(dim, idx)


def _watched(block) -> Tuple[Optional[torch.Tensor], ...]:
    """Every tensor a block's damage terms depend on."""
    return (block.rotate_in.weight, block.core.weight, block.rotate_out.weight, block.basis_in, block.basis_out,
            block.eigen_in, block.eigen_out, block.fisher_diag, block.mean_grad, block.removal_fisher_in,
            block.removal_fisher_out)


def _keep(block, what: str, terms) -> None:
    watched = tuple((None, None) if t is None else (weakref.ref(t), t._version) for t in _watched(block))
    _KEPT.setdefault(block, {})[what] = (watched, terms)


def _kept(block, what: str):
    """The terms kept as ``what`` if the block's weights and buffers are the very tensors they
    were computed from, not changed in place since; else ``None``."""
    watched, terms = _KEPT.get(block, {}).get(what, (None, None))
    if watched is None:
        return None
    same = all((ref is None and t is None) or (ref is not None and ref() is t and t._version == version)
               for (ref, version), t in zip(watched, _watched(block)))
    return terms if same else None


def direction_terms(block) -> Tuple[DamageTerms, DamageTerms]:
    """EigenDamage terms (:func:`~tp_eigendamage.damage.eigen_terms`) of removing each surviving
    input and output direction of ``block``: from the core weight ``W*``, ``fisher_diag`` (or,
    after an EK-FAC refit, ``removal_fisher_in/out``) and ``mean_grad``, restricted to the
    surviving directions. Both sides come from one product over the core and are scored in two
    groups (one reads the input directions, the other writes the output ones): kept."""
    kept = _kept(block, "directions")
    if kept is not None:
        return kept
    in_idx, out_idx = block.surviving_directions()
    removal = (None if block.removal_fisher_in is None else
               (select(block.removal_fisher_in, 0, in_idx), select(block.removal_fisher_out, 0, out_idx)))
    mean_grad = None if block.mean_grad is None else select(select(block.mean_grad, 0, out_idx), 1, in_idx)
    terms = eigen_terms(weight_3d(block.core), select(select(block.fisher_diag, 0, out_idx), 1, in_idx),
                        mean_grad, removal)
    _keep(block, "directions", terms)
    return terms


def outer_kron_terms(block, side: str) -> DamageTerms:
    """Kron-OBD terms (:func:`~tp_eigendamage.damage.kron_in_terms` / ``kron_out_terms``) of
    ``block``'s outer ``"input"`` or ``"output"`` channels, the block taken as one layer
    (:meth:`KFEBlock.outer_kron_operands`).

    A block built from a layer is that layer until something changes, so the terms of its
    outputs are the layer's own: :func:`remember_output_terms` computed them when the block was
    built, and they hold while it is unchanged."""
    built = _kept(block, "outer_output") if side == "output" else None
    if built is not None:
        return built
    return (kron_out_terms if side == "output" else kron_in_terms)(*block.outer_kron_operands(side))


def remember_output_terms(block, eigen, weight_a: torch.Tensor, mean_grad_a: Optional[torch.Tensor]) -> None:
    """Keep the Kron-OBD terms of the outputs of the layer ``block`` was just built from:
    ``½ S_cc Σ_jk (W Q_A)²_cjk λ_A,j`` and ``−Σ_jk Ḡ_cjk W_cjk = −Σ_jk (Ḡ Q_A)_cjk (W Q_A)_cjk``,
    with ``S_cc = Σ_r Q_S,cr² λ_S,r``, from ``W_k Q_A`` and ``Ḡ_k Q_A`` (``weight_a``,
    ``mean_grad_a``: by-products of rotating ``W`` and ``Ḡ`` into the KFE) and the eigenbases
    ``eigen = (λ_A, Q_A, λ_S, Q_S)``: no product with the weight beyond the rotation's."""
    lam_a, _, lam_s, q_s = (t.to(weight_a.device, torch.float64) for t in eigen)
    terms = kron_out_terms(weight_a[None], lam_a[None], (q_s.square() @ lam_s)[None],
                           None if mean_grad_a is None else mean_grad_a[None])
    _keep(block, "outer_output", terms)
