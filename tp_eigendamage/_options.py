"""String options accepted by the public API, validated in one place.

Each option is a ``Literal`` type (for readers and type checkers) and a tuple of its values
(for :func:`check_choice`).
"""
from __future__ import annotations

from typing import Literal, Sequence, Type, get_args

from .errors import InvalidArgumentError

__all__ = ["FisherType", "FactorMode", "Side", "FISHER_TYPES", "FACTOR_MODES", "SIDES", "check_choice"]

FisherType = Literal["true", "empirical"]
"""``"true"``: labels drawn from the model's predictive distribution; ``"empirical"``: data labels."""

FactorMode = Literal["channel", "patch"]
"""Conv input factor over channels pooled across kernel offsets, or over im2col patches."""

Side = Literal["producer", "consumer"]
"""Which members of a coupled channel group carry its damage (docs/method.md §9)."""

FISHER_TYPES = get_args(FisherType)
FACTOR_MODES = get_args(FactorMode)
SIDES = get_args(Side)


def check_choice(value, name: str, choices: Sequence, error: Type[Exception] = InvalidArgumentError,
                 hint: str = "") -> None:
    """Raise ``error`` naming ``name``, the bad ``value`` and the valid ``choices``."""
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise error(f"{name}={value!r}; choose one of {listed}{'. ' + hint if hint else ''}")
