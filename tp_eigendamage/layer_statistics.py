"""Per-layer statistics keyed by module: the base of :class:`~tp_eigendamage.KFACStats` and
:class:`~tp_eigendamage.FisherDiagStats`.

Statistics are looked up with the module object they were collected on. Two rules keep a
lookup from silently returning numbers that describe something else:

* staleness: ``stats[module]`` raises :class:`~tp_eigendamage.errors.StaleStatisticsError`
  when the module's shape changed since collection (e.g. it was pruned); ``module in stats``
  never raises;
* other models: :meth:`LayerStatistics.for_model` re-keys the statistics by qualified module
  name onto another model with the same layers (a deep copy, a model reloaded from a
  checkpoint), so statistics collected once serve every copy; a layer whose shape differs
  there still raises on lookup.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Dict, Generic, Iterator, Optional, TypeVar

import torch.nn as nn

__all__ = ["LayerStatistics"]

Entry = TypeVar("Entry")


class LayerStatistics(Mapping, Generic[Entry]):
    """``stats[module]`` → this layer's statistics; see the module docstring.

    Attributes:
        model: the model the statistics are keyed on (``None`` if unknown).
    """

    #: What the entries are, for messages (e.g. "K-FAC factors").
    what = "statistics"
    #: The function that collects them, for messages.
    collector = "the collecting function"

    def __init__(self, entries: Dict[nn.Module, Entry], names: Dict[nn.Module, str],
                 model: Optional[nn.Module] = None):
        self._entries, self._names, self.model = entries, names, model

    # -- subclass hook --------------------------------------------------------------------------
    def _check(self, module: nn.Module, entry: Entry) -> None:
        """Raise :class:`StaleStatisticsError` unless ``entry`` still fits ``module``."""

    # -- Mapping ----------------------------------------------------------------------------------
    def __getitem__(self, module: nn.Module) -> Entry:
        try:
            entry = self._entries[module]
        except KeyError:
            raise KeyError(
                f"no {self.what} for {type(module).__name__} module; it was not covered by "
                f"{self.collector} (not a Conv2d/Linear, not in modules=, added later, or part of "
                "another model: use stats.for_model(model))") from None
        self._check(module, entry)
        return entry

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, module: object) -> bool:
        return module in self._entries

    # -- names and other models -----------------------------------------------------------------
    def name_of(self, module: nn.Module) -> str:
        """Qualified name of ``module`` in the model the statistics were collected on."""
        return self._names[module]

    def names(self) -> Dict[str, nn.Module]:
        """``{qualified name: module}`` of every covered layer."""
        return {name: m for m, name in self._names.items()}

    def for_model(self, model: nn.Module) -> "LayerStatistics[Entry]":
        """These statistics keyed by the modules of ``model`` with the same qualified names.

        ``model`` itself (or statistics without a model) gives ``self``. Layers missing from
        ``model`` are left out; a layer present under the same name with another shape keeps
        its entry, so looking it up raises :class:`StaleStatisticsError`.
        """
        if self.model is None or model is self.model:
            return self
        modules = dict(model.named_modules())
        entries, names = {}, {}
        for module, entry in self._entries.items():
            name = self._names[module]
            other = modules.get(name)
            if other is not None:
                entries[other], names[other] = entry, name
        view = copy.copy(self)
        view._entries, view._names, view.model = entries, names, model
        return view
