"""Per-layer tables and before/after totals of a pruning run.

A "layer" is a plain ``nn.Conv2d`` / ``nn.Linear`` or a whole KFE block, in three layers or
stored as two (:class:`~tp_eigendamage.forms.TwoLayerForm`); its layers are charged to it.
Parameters and FLOPs come from Torch-Pruning's counter; latency is measured
(:mod:`tp_eigendamage.latency`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from ._tp import count_ops_and_params
from .budget import Cost
from .forms import TwoLayerForm
from .kfe_block import KFEBlock
from .layers import adapter_for

__all__ = ["PruneReport", "LayerStats", "LayerRow", "layer_stats", "build_report", "format_table"]


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: left-aligned columns, a rule under the header."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    return "\n".join(lines + [fmt.format(*r) for r in rows])


@dataclass
class LayerStats:
    """Shape and cost of one layer at one moment."""

    layer_kind: str
    in_channels: int
    out_channels: int
    params: int
    flops: int
    directions: Optional[tuple] = None   # (r_in, r_out) of a block; (width,) of a two-layer form
    form: Optional[str] = None           # a block's form (tp_eigendamage.forms.FORMS); None: plain

    def shape_text(self) -> str:
        if self.directions is None:
            return f"{self.in_channels}→{self.out_channels}"
        return f"{self.in_channels}→[{'→'.join(map(str, self.directions))}]→{self.out_channels}"


def _block_layers(module: nn.Module) -> Optional[Tuple[List[nn.Module], tuple, str]]:
    """``(layers, directions, form)`` of a KFE block in three or two layers, else ``None``."""
    if isinstance(module, KFEBlock):
        core = adapter_for(module.core)
        return ([module.rotate_in, module.core, module.rotate_out],
                (core.in_features(module.core), core.out_features(module.core)), "kfe")
    if isinstance(module, TwoLayerForm):
        return [module.first, module.second], (module.width,), module.form
    return None


def layer_stats(model: nn.Module, example_inputs) -> Tuple[Dict[str, LayerStats], Cost]:
    """Every Conv2d/Linear outside KFE blocks, and every KFE block (three or two layers), by
    qualified name; and the model's total :class:`Cost` (from the same count)."""
    total_flops, total_params, flops, params = count_ops_and_params(model, example_inputs, layer_wise=True)
    cost = lambda mods, table: int(sum(table.get(m) or 0 for m in mods))  # noqa: E731
    rows: Dict[str, LayerStats] = {}
    inside_blocks = set()
    for name, module in model.named_modules():
        composite = _block_layers(module)
        if composite is not None:
            parts, directions, form = composite
            first, last = adapter_for(parts[0]), adapter_for(parts[-1])
            inside_blocks.update(id(p) for p in parts)
            rows[name] = LayerStats(
                layer_kind=f"{'kfe' if form == 'kfe' else 'kfe2'}-{last.layer_kind}",
                in_channels=first.in_features(parts[0]), out_channels=last.out_features(parts[-1]),
                params=cost(parts, params), flops=cost(parts, flops), directions=directions, form=form)
        elif id(module) not in inside_blocks and adapter_for(module) is not None:
            a = adapter_for(module)
            rows[name] = LayerStats(layer_kind=a.layer_kind, in_channels=a.in_features(module),
                                    out_channels=a.out_features(module),
                                    params=cost([module], params), flops=cost([module], flops))
    return rows, Cost(params=int(total_params), flops=int(total_flops))


@dataclass
class LayerRow:
    name: str
    before: LayerStats
    after: Optional[LayerStats]
    predicted_damage: float = 0.0


@dataclass
class PruneReport:
    """What :func:`tp_eigendamage.prune` did.

    Attributes:
        method: the method's name.
        before, after: the model's :class:`~tp_eigendamage.budget.Cost` before / after.
        rows: one :class:`LayerRow` per layer of the unpruned model.
        rounds: per round: channel ratio, params / FLOPs fractions reached, predicted damage,
            search trials, the fraction the search reached; for a latency target, the measured
            latency fraction after every round but the last (the last is ``latency_fraction``).
        kfe_blocks_built: KFE blocks created during pruning.
        timings: wall seconds per stage (:data:`tp_eigendamage.prune.STAGES`).
        target: the budget asked for, e.g. ``{"target_params": 0.5}`` (share KEPT) or
            ``{"pruning_ratio": 0.3}`` (share of channels REMOVED, Torch-Pruning's meaning).
        loss_units: the method's scores are predicted loss increases (the second-order
            methods); otherwise ``predicted_damage`` holds the criterion's raw scores.
        latency_before, latency_after: measured seconds per forward pass on the example inputs
            (eval mode, the model's device) of the unpruned and the pruned model, timed side by
            side at the end (:func:`~tp_eigendamage.latency.measure_latency`), with
            ``latency_clock`` (``"cpu"`` or ``"wall"``, :func:`~tp_eigendamage.latency.latency_clock`).
    """

    method: str
    before: Cost
    after: Cost
    rows: List[LayerRow]
    rounds: List[dict] = field(default_factory=list)
    kfe_blocks_built: int = 0
    timings: Dict[str, float] = field(default_factory=dict)
    target: Dict[str, float] = field(default_factory=dict)
    loss_units: bool = True
    latency_before: Optional[float] = None
    latency_after: Optional[float] = None
    latency_clock: Optional[str] = None

    @property
    def kfe_blocks_kept(self) -> int:
        """KFE blocks still in the pruned model, in three or two layers (their bottleneck pays)."""
        return sum(self.kfe_block_forms.values())

    @property
    def kfe_block_forms(self) -> Dict[str, int]:
        """How many kept blocks are in each multi-layer form (``kfe``: three layers;
        ``in_merged`` / ``out_merged``: two, :mod:`tp_eigendamage.forms`)."""
        forms = [r.after.form for r in self.rows if r.after is not None and r.after.form is not None]
        return {f: forms.count(f) for f in ("kfe", "in_merged", "out_merged") if f in forms}

    @property
    def kfe_blocks_folded(self) -> int:
        """KFE blocks built during pruning and folded back into one dense layer."""
        return self.kfe_blocks_built - self.kfe_blocks_kept

    @property
    def predicted_damage(self) -> float:
        """Σ of the removed channels' scores: with ``loss_units``, the predicted increase of the
        loss on the statistics data."""
        return sum(r.predicted_damage for r in self.rows)

    @property
    def params_fraction(self) -> float:
        return self.after.params / self.before.params

    @property
    def flops_fraction(self) -> float:
        return self.after.flops / self.before.flops

    @property
    def latency_fraction(self) -> Optional[float]:
        """Measured latency after / before (``None`` if not measured)."""
        if self.latency_before is None or self.latency_after is None:
            return None
        return self.latency_after / self.latency_before

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "target": dict(self.target),
            "loss_units": self.loss_units,
            "predicted_damage": self.predicted_damage,
            "before": asdict(self.before),
            "after": asdict(self.after),
            "params_fraction": self.params_fraction,
            "flops_fraction": self.flops_fraction,
            "rounds": self.rounds,
            "latency": {"before_s": self.latency_before, "after_s": self.latency_after,
                        "fraction": self.latency_fraction, "clock": self.latency_clock},
            "kfe_blocks": {"built": self.kfe_blocks_built, "kept": self.kfe_blocks_kept,
                           "folded": self.kfe_blocks_folded, "forms": self.kfe_block_forms},
            "timings": dict(self.timings),
            "layers": [
                {"name": r.name, "before": asdict(r.before),
                 "after": None if r.after is None else asdict(r.after),
                 "predicted_damage": r.predicted_damage}
                for r in self.rows
            ],
        }

    def target_text(self) -> str:
        """The budget in words (which share is kept and which removed)."""
        words = {"target_params": "keep {:.0%} of the parameters", "target_flops": "keep {:.0%} of the FLOPs",
                 "target_latency": "keep {:.0%} of the measured latency",
                 "pruning_ratio": "remove {:.0%} of the channels (Torch-Pruning's pruning_ratio)"}
        return "; ".join(words[k].format(v) for k, v in self.target.items() if k in words)

    def __str__(self) -> str:
        damage = "pred. Δloss" if self.loss_units else "score removed"
        head = ("layer", "kind", "shape before", "shape after", "params", "FLOPs", damage)
        lines = []
        for r in self.rows:
            after = r.after
            lines.append((
                r.name, after.layer_kind if after else r.before.layer_kind, r.before.shape_text(),
                after.shape_text() if after else "removed",
                f"{r.before.params:,}→{after.params if after else 0:,}",
                f"{_si(r.before.flops)}→{_si(after.flops if after else 0)}",
                f"{r.predicted_damage:.3g}"))
        table = format_table(head, lines)
        rule = table.split("\n")[1]
        target = self.target_text()
        out = [f"method: {self.method}" + (f"; target: {target}" if target else ""), table, rule,
               f"params {self.before.params:,} → {self.after.params:,} ({self.params_fraction:.1%}); "
               f"FLOPs {_si(self.before.flops)} → {_si(self.after.flops)} ({self.flops_fraction:.1%})"]
        if self.latency_fraction is not None:
            out.append(f"latency on example_inputs {1e3 * self.latency_before:.3g} ms → "
                       f"{1e3 * self.latency_after:.3g} ms ({self.latency_fraction:.1%}; measured side by side, "
                       f"{self.latency_clock} clock)")
        if self.kfe_blocks_built:
            forms = self.kfe_block_forms
            out.append(f"KFE blocks: {self.kfe_blocks_built} built, {self.kfe_blocks_kept} kept "
                       f"({forms.get('kfe', 0)} as three layers, {forms.get('in_merged', 0)} with rotate_in "
                       f"merged into the core, {forms.get('out_merged', 0)} with the core merged into "
                       f"rotate_out), {self.kfe_blocks_folded} folded back into one layer")
        out += ["shape: input→output channels; a KFE block (kfe-) is shown as in→[r_in→r_out]→out, its "
                "eigen-directions between the two rotations; one stored as two layers (kfe2-) as "
                "in→[r]→out."]
        if self.loss_units:
            out.append(f"pred. Δloss: predicted increase of the training loss (mean per-example loss "
                       f"on the statistics data) from what was removed in the layer; total "
                       f"{self.predicted_damage:.4g}.")
        else:
            out.append(f"score removed: the criterion's own scores of what was removed (not a loss); "
                       f"total {self.predicted_damage:.4g}.")
        return "\n".join(out)


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def build_report(method: str, before_layers: Dict[str, LayerStats], after_layers: Dict[str, LayerStats],
                 before: Cost, after: Cost, damages: Dict[str, float], rounds: List[dict],
                 kfe_blocks_built: int = 0, timings: Optional[Dict[str, float]] = None,
                 target: Optional[Dict[str, float]] = None, loss_units: bool = True,
                 latency: Sequence[Optional[float]] = (None, None), latency_clock: Optional[str] = None
                 ) -> PruneReport:
    """One row per layer of the unpruned model, with its state after pruning; ``latency`` is
    ``(seconds before, seconds after)`` measured with ``latency_clock``."""
    rows = [LayerRow(name, stats, after_layers.get(name), damages.get(name, 0.0))
            for name, stats in before_layers.items()]
    return PruneReport(method=method, before=before, after=after, rows=rows, rounds=rounds,
                       kfe_blocks_built=kfe_blocks_built, timings=dict(timings or {}),
                       target=dict(target or {}), loss_units=loss_units, latency_before=latency[0],
                       latency_after=latency[1], latency_clock=latency_clock)
