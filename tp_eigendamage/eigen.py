"""Eigendecompositions of K-FAC factors: the precision policy and how they are scheduled.

Each factor ``M`` (``A`` or ``S``, symmetric PSD) is decomposed once per round,
``M = Q diag(λ) Qᵀ``, eigenvalues ascending; eigenvalues below ``1e-10 · λ_max`` (round-off,
including slightly negative ones) are set to 0.

Precision (``precision=``):

* ``"float64"`` (default): ``torch.linalg.eigh`` in float64. Eigenvalues are accurate far
  below the largest (the clamp at ``1e-10·λ_max`` is what decides), and ``Q`` is orthogonal to
  round-off, so the KFE rewrite is function-preserving to float32 precision.
* ``"float32"``: ``eigh`` in float32 (about 2× faster on CPUs), then in float64: ``Q`` made
  orthonormal again (QR, signs kept), eigenvalues taken as Rayleigh quotients ``λ_i = q_iᵀ M
  q_i``, and the residual ``‖M Q − Q diag(λ)‖_F / ‖M‖_F`` checked; above
  :data:`FLOAT32_RESIDUAL` the factor is decomposed again in float64. Eigenvalues are then
  accurate to about ``1e-6·λ_max`` in absolute terms: directions whose eigenvalue is below
  that have their damage's curvature part known only to that absolute accuracy.

Scheduling (:func:`eigendecompose`): on CUDA the factors are decomposed on the device, stacked
by size into batches; on CPU every factor is decomposed with single-threaded LAPACK and the
factors are spread over ``torch.get_num_threads()`` Python threads (``eigh`` releases the GIL).
Multi-threaded LAPACK ``eigh`` on a busy CPU can be hundreds of times slower than one thread
(measured here: n = 256, 0.016 s on one thread, 5.9 s on two threads of a loaded 2-core
machine); one thread per factor avoids that and still uses every core.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, List, Literal, Sequence, Tuple, get_args

import torch

from ._options import check_choice

__all__ = ["Precision", "PRECISIONS", "FLOAT32_RESIDUAL", "CLAMP", "clamped_eigh", "eigendecompose"]

Precision = Literal["float64", "float32"]
PRECISIONS = get_args(Precision)

#: Relative residual above which a float32 decomposition is redone in float64.
FLOAT32_RESIDUAL = 1e-4
#: Eigenvalues below ``CLAMP · λ_max`` are set to 0.
CLAMP = 1e-10

Decomposition = Tuple[torch.Tensor, torch.Tensor]


def _clamp(evals: torch.Tensor) -> torch.Tensor:
    cutoff = CLAMP * evals.amax(dim=-1, keepdim=True).clamp_min(0)
    return torch.where(evals > cutoff, evals, torch.zeros_like(evals))


def _float32_refined(m: torch.Tensor) -> Decomposition:
    """Float32 ``eigh`` refined in float64 (module docstring); float64 ``eigh`` if it fails."""
    _, q32 = torch.linalg.eigh(m.float())
    q, r = torch.linalg.qr(q32.double())
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    mq = m @ q
    evals = (mq * q).sum(dim=-2)
    residual = (mq - q * evals.unsqueeze(-2)).flatten(-2).norm(dim=-1) / m.flatten(-2).norm(dim=-1).clamp_min(1e-300)
    if bool((residual > FLOAT32_RESIDUAL).any()) or not bool(torch.isfinite(evals).all()):
        return torch.linalg.eigh(m)
    order = evals.argsort(dim=-1)
    return evals.gather(-1, order), q.gather(-1, order.unsqueeze(-2).expand_as(q))


def clamped_eigh(matrix: torch.Tensor, precision: Precision = "float64") -> Decomposition:
    """``(λ, Q)`` of a symmetric PSD matrix (or a batch), float64, ascending, tiny λ → 0."""
    check_choice(precision, "precision", PRECISIONS)
    m = matrix.double()
    m = 0.5 * (m + m.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(m) if precision == "float64" else _float32_refined(m)
    return _clamp(evals), evecs


@contextlib.contextmanager
def _single_threaded_lapack() -> Iterator[int]:
    """One intra-op thread inside (yields the thread count outside)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def eigendecompose(matrices: Sequence[torch.Tensor], precision: Precision = "float64") -> List[Decomposition]:
    """:func:`clamped_eigh` of every matrix (each ``(n, n)`` or ``(G, n, n)``), scheduled for the
    hardware (module docstring); results in the input order, on each matrix's device."""
    check_choice(precision, "precision", PRECISIONS)
    results: Dict[int, Decomposition] = {}
    on_cuda = [i for i, m in enumerate(matrices) if m.is_cuda]
    by_shape: Dict[tuple, List[int]] = {}
    for i in on_cuda:
        by_shape.setdefault((matrices[i].device, tuple(matrices[i].shape)), []).append(i)
    for indices in by_shape.values():
        evals, evecs = clamped_eigh(torch.stack([matrices[i] for i in indices]), precision)
        for k, i in enumerate(indices):
            results[i] = (evals[k], evecs[k])
    on_cpu = sorted((i for i in range(len(matrices)) if i not in results),
                    key=lambda i: -matrices[i].shape[-1])          # largest first: balanced threads
    if on_cpu:
        with _single_threaded_lapack() as threads:
            if threads <= 1 or len(on_cpu) == 1:
                done = [clamped_eigh(matrices[i], precision) for i in on_cpu]
            else:
                with ThreadPoolExecutor(max_workers=threads) as pool:
                    done = list(pool.map(lambda i: clamped_eigh(matrices[i], precision), on_cpu))
            results.update(zip(on_cpu, done))
    return [results[i] for i in range(len(matrices))]
