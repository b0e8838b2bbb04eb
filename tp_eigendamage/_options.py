"""String options accepted by the public API, validated in one place.

Each option is a ``Literal`` type (for readers and type checkers) and a tuple of its values
(for :func:`check_choice`).
"""
from __future__ import annotations

import difflib
from typing import Iterable, Literal, Sequence, Type, get_args

from .errors import InvalidArgumentError

__all__ = ["FisherType", "FactorMode", "Side", "Ranking", "FirstOrder", "FISHER_TYPES", "FACTOR_MODES", "SIDES",
           "RANKINGS", "FIRST_ORDERS",
           "check_choice", "did_you_mean"]

FisherType = Literal["true", "empirical"]
"""``"true"``: labels drawn from the model's predictive distribution; ``"empirical"``: data labels."""

FactorMode = Literal["channel", "patch"]
"""Conv input factor over channels pooled across kernel offsets, or over im2col patches."""

Side = Literal["producer", "consumer"]
"""Which members of a coupled channel group carry its damage (docs/method.md §9)."""

Ranking = Literal["damage", "damage_per_cost"]
"""How :func:`~tp_eigendamage.prune` ranks channels globally: by damage, or by damage per unit of
the budgeted cost a channel's removal saves (docs/method.md §7)."""

FirstOrder = Literal["positive", "signed", "off"]
"""The damages' first-order term ``−Ḡ·w`` of a removal (docs/method.md §4): its positive part
(a removal is never credited with a loss decrease), as it is, or left out (the paper's damage)."""

FISHER_TYPES = get_args(FisherType)
FACTOR_MODES = get_args(FactorMode)
SIDES = get_args(Side)
RANKINGS = get_args(Ranking)
FIRST_ORDERS = get_args(FirstOrder)


def did_you_mean(word, choices: Iterable) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to ``word``, or ``""``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(value, name: str, choices: Sequence, error: Type[Exception] = InvalidArgumentError,
                 hint: str = "") -> None:
    """Raise ``error`` naming ``name``, the bad ``value``, the closest and all valid ``choices``."""
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise error(f"{name}={value!r}{did_you_mean(value, choices)}; choose one of {listed}"
                    f"{'. ' + hint if hint else ''}")
