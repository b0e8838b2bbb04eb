"""tp_eigendamage: EigenDamage structured pruning for Torch-Pruning and timm.

Public API (the method: docs/method.md):

* statistics: :func:`collect_kfac` (K-FAC factors), :func:`collect_fisher_diag`,
  :func:`fit_eigen_correction` (EK-FAC refit in the KFE);
* the KFE rewrite: :func:`to_kfe`, :func:`fold_kfe`, :class:`KFEBlock`, :func:`kfe_blocks`;
  deployment: :func:`to_cheapest_forms` (each block in its cheapest exact form, two-layer forms
  as :class:`TwoLayerForm`), :func:`fuse_for_inference` (BatchNorm folded into convolutions),
  :func:`measure_latency`;
* after pruning: :func:`recalibrate_batchnorm` (BatchNorm running statistics re-estimated;
  :func:`prune` does it every round);
* Torch-Pruning importances: :class:`EigenDamageImportance`, :class:`KroneckerOBDImportance`,
  :class:`KroneckerOBSImportance`, :class:`FisherDiagImportance`, :class:`CombinedImportance`;
* the driver: :func:`prune` → ``(model, PruneReport)``, its methods :data:`METHODS`;
* persistence: :func:`save`, :func:`load`;
* errors: every error derives from :class:`TPEigenDamageError` (see :mod:`tp_eigendamage.errors`).
"""
from ._version import __version__
from .batchnorm import recalibrate_batchnorm
from .budget import Cost
from .damage import obs_compensation, obs_damage
from .diag_fisher import FisherDiagStats, collect_fisher_diag
from .ekfac import fit_eigen_correction
from .errors import (FisherInputError, InvalidArgumentError, KFACError, KFEError, ModelFileError,
                     PruneArgumentError, PruningError, StaleBasisError, StaleStatisticsError,
                     TargetUnreachableError, TPEigenDamageError, TrainingDivergedError)
from .fisher import (WeightedTargets, cross_entropy, gaussian_nll, importance_sample_categorical,
                     sample_categorical, sample_gaussian)
from .forms import TwoLayerForm
from .fusion import fuse_for_inference
from .importance import (CombinedImportance, EigenDamageImportance, FisherDiagImportance,
                         KroneckerOBDImportance, KroneckerOBSImportance)
from .io import load, save
from .kfac import KFACFactors, KFACStats, collect_kfac
from .kfe import fold_kfe, kfe_blocks, to_cheapest_forms, to_kfe
from .kfe_block import KFEBlock
from .latency import measure_latency
from .methods import METHODS, Method
from .prune import prune
from .report import PruneReport

__all__ = [
    "__version__",
    "collect_kfac", "KFACStats", "KFACFactors",
    "collect_fisher_diag", "FisherDiagStats", "fit_eigen_correction",
    "to_kfe", "fold_kfe", "kfe_blocks", "KFEBlock", "to_cheapest_forms", "TwoLayerForm",
    "fuse_for_inference", "measure_latency", "recalibrate_batchnorm",
    "EigenDamageImportance", "KroneckerOBDImportance", "KroneckerOBSImportance",
    "FisherDiagImportance", "CombinedImportance", "obs_compensation", "obs_damage",
    "prune", "PruneReport", "Cost", "METHODS", "Method",
    "save", "load",
    "cross_entropy", "gaussian_nll", "sample_categorical", "sample_gaussian",
    "importance_sample_categorical", "WeightedTargets",
    "TPEigenDamageError", "InvalidArgumentError", "KFACError", "FisherInputError", "KFEError",
    "StaleBasisError", "PruneArgumentError", "ModelFileError", "StaleStatisticsError",
    "PruningError", "TargetUnreachableError", "TrainingDivergedError",
]
