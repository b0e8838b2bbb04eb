"""tp_eigendamage: EigenDamage structured pruning for Torch-Pruning and timm."""
from .fisher import cross_entropy, gaussian_nll, sample_categorical, sample_gaussian
from .kfac import (
    KFACError,
    KFACFactors,
    KFACStats,
    StaleStatisticsError,
    collect_kfac,
)

__version__ = "0.1.0"

__all__ = [
    "collect_kfac",
    "KFACStats",
    "KFACFactors",
    "KFACError",
    "StaleStatisticsError",
    "cross_entropy",
    "gaussian_nll",
    "sample_categorical",
    "sample_gaussian",
]
