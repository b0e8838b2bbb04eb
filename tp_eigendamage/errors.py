"""The package's error family: catch :class:`TPEigenDamageError` to catch any of them.

Every error raised by tp_eigendamage on bad input or an impossible request derives from
:class:`TPEigenDamageError`. The specific classes also derive from the built-in exception a
caller would expect (``ValueError`` / ``TypeError`` for bad arguments, ``RuntimeError`` for
state that no longer fits), so ``except ValueError`` keeps working::

    TPEigenDamageError
    ├── InvalidArgumentError (ValueError, TypeError)   bad argument values or types
    │   ├── KFACError                                   bad input to a statistics pass
    │   │   └── FisherInputError                         outputs that do not fit the Fisher / loss
    │   ├── KFEError                                    bad input to the KFE rewrite / fold
    │   │   └── StaleBasisError                          a block's basis can no longer be matched
    │   ├── PruneArgumentError                          bad arguments to prune()
    │   └── ModelFileError (FileNotFoundError)          a model file that is missing or not ours
    ├── StaleStatisticsError (RuntimeError)            statistics of another / a changed model
    ├── PruningError (RuntimeError)                    Torch-Pruning failed, or the result does not run
    ├── TargetUnreachableError (RuntimeError)          no pruning amount meets the target
    └── TrainingDivergedError (FloatingPointError)     the training / fine-tuning loss went non-finite
"""
from __future__ import annotations

__all__ = [
    "TPEigenDamageError", "InvalidArgumentError", "KFACError", "FisherInputError", "KFEError",
    "StaleBasisError", "PruneArgumentError", "ModelFileError", "StaleStatisticsError", "PruningError",
    "TargetUnreachableError", "TrainingDivergedError",
]


class TPEigenDamageError(Exception):
    """Base class of every error raised by tp_eigendamage."""


class InvalidArgumentError(TPEigenDamageError, ValueError, TypeError):
    """An argument has a bad value or type; the message names it and the fix."""


class KFACError(InvalidArgumentError):
    """Bad input to a statistics pass (:func:`~tp_eigendamage.collect_kfac` and friends);
    the model is left unchanged."""


class FisherInputError(KFACError):
    """The model's outputs do not fit the chosen Fisher / loss."""


class KFEError(InvalidArgumentError):
    """Bad input to :func:`~tp_eigendamage.to_kfe` / :func:`~tp_eigendamage.fold_kfe` / a KFE
    block; the model is left unchanged."""


class StaleBasisError(KFEError):
    """A block's rotation weights no longer match its stored bases AND its outer channels were
    pruned, so neither its directions nor its outer channels can be identified."""


class PruneArgumentError(InvalidArgumentError):
    """Bad arguments to :func:`~tp_eigendamage.prune`; raised before any work starts."""


class ModelFileError(InvalidArgumentError, FileNotFoundError):
    """A model file (or its folder) that does not exist or was not written by
    :func:`~tp_eigendamage.save`."""


class StaleStatisticsError(TPEigenDamageError, RuntimeError):
    """Statistics no longer describe the module they are asked for (its shape changed, or
    they were collected on a model without that layer)."""


class PruningError(TPEigenDamageError, RuntimeError):
    """Torch-Pruning could not trace or prune the model, or the pruned model no longer runs."""


class TargetUnreachableError(TPEigenDamageError, RuntimeError):
    """No pruning amount within the per-layer caps meets the target."""


class TrainingDivergedError(TPEigenDamageError, FloatingPointError):
    """The loss of :func:`~tp_eigendamage.training.train` became non-finite; the model was
    restored to its values before training."""
