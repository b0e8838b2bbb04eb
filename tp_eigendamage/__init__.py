"""tp_eigendamage: EigenDamage structured pruning for Torch-Pruning and timm.

Public API:

* statistics: :func:`collect_kfac` (K-FAC factors), :func:`collect_fisher_diag`,
  :func:`fit_eigen_correction` (EK-FAC refit in the KFE);
* the KFE rewrite: :func:`to_kfe`, :func:`fold_kfe`, :class:`KFEBlock`, :func:`kfe_blocks`;
* Torch-Pruning importances: :class:`EigenDamageImportance`, :class:`KroneckerOBDImportance`,
  :class:`KroneckerOBSImportance`, :class:`FisherDiagImportance`, :class:`CombinedImportance`;
* the driver: :func:`prune` → ``(model, PruneReport)``;
* persistence: :func:`save`, :func:`load`.
"""
from .damage import obs_compensation, obs_damage
from .diag_fisher import collect_fisher_diag
from .ekfac import fit_eigen_correction
from .fisher import (
    WeightedTargets, cross_entropy, gaussian_nll, importance_sample_categorical, sample_categorical,
    sample_gaussian,
)
from .importance import (
    CombinedImportance,
    EigenDamageImportance,
    FisherDiagImportance,
    KroneckerOBDImportance,
    KroneckerOBSImportance,
)
from .io import load, save
from .kfac import KFACError, KFACFactors, KFACStats, StaleStatisticsError, collect_kfac
from .kfe import KFEBlock, KFEError, StaleBasisError, fold_kfe, kfe_blocks, to_kfe
from .prune import PruneArgumentError, PruningError, prune
from .budget import TargetUnreachableError
from .report import PruneReport

__version__ = "0.1.0"

__all__ = [
    "collect_kfac", "KFACStats", "KFACFactors", "KFACError", "StaleStatisticsError",
    "collect_fisher_diag", "fit_eigen_correction",
    "to_kfe", "fold_kfe", "kfe_blocks", "KFEBlock", "KFEError", "StaleBasisError",
    "EigenDamageImportance", "KroneckerOBDImportance", "KroneckerOBSImportance",
    "FisherDiagImportance", "CombinedImportance", "obs_compensation", "obs_damage",
    "prune", "PruneReport", "PruneArgumentError", "PruningError", "TargetUnreachableError",
    "save", "load",
    "cross_entropy", "gaussian_nll", "sample_categorical", "sample_gaussian",
    "importance_sample_categorical", "WeightedTargets",
]
