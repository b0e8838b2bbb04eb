"""Per-layer tables and before/after totals of a pruning run.

A "layer" is a plain ``nn.Conv2d`` / ``nn.Linear`` or a whole KFE block (its rotation layers
are charged to it). Parameters and FLOPs come from Torch-Pruning's counter.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from ._tp import count_ops_and_params
from .budget import Cost
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
    directions: Optional[tuple] = None

    def shape_text(self) -> str:
        if self.directions is None:
            return f"{self.in_channels}→{self.out_channels}"
        return f"{self.in_channels}→[{self.directions[0]}→{self.directions[1]}]→{self.out_channels}"


def layer_stats(model: nn.Module, example_inputs) -> Tuple[Dict[str, LayerStats], Cost]:
    """Every Conv2d/Linear outside KFE blocks, and every KFE block, by qualified name; and the
    model's total :class:`Cost` (from the same count)."""
    total_flops, total_params, flops, params = count_ops_and_params(model, example_inputs, layer_wise=True)
    cost = lambda mods, table: int(sum(table.get(m) or 0 for m in mods))  # noqa: E731
    rows: Dict[str, LayerStats] = {}
    inside_blocks = set()
    for name, module in model.named_modules():
        if isinstance(module, KFEBlock):
            parts = [module.rotate_in, module.core, module.rotate_out]
            inside_blocks.update(id(p) for p in parts)
            a = adapter_for(module.core)
            rows[name] = LayerStats(
                layer_kind=f"kfe-{a.layer_kind}", in_channels=adapter_for(module.rotate_in).in_features(module.rotate_in),
                out_channels=adapter_for(module.rotate_out).out_features(module.rotate_out),
                params=cost(parts, params), flops=cost(parts, flops),
                directions=(a.in_features(module.core), a.out_features(module.core)))
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
            search trials.
        kfe_blocks_built: KFE blocks created during pruning.
        timings: wall seconds per stage (:data:`tp_eigendamage.prune.STAGES`).
        target: the budget asked for, e.g. ``{"target_params": 0.5}`` (share KEPT) or
            ``{"pruning_ratio": 0.3}`` (share of channels REMOVED, Torch-Pruning's meaning).
        loss_units: the method's scores are predicted loss increases (the second-order
            methods); otherwise ``predicted_damage`` holds the criterion's raw scores.
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

    @property
    def kfe_blocks_kept(self) -> int:
        """KFE blocks still in the pruned model (their bottleneck pays)."""
        return sum(1 for r in self.rows if r.after is not None and r.after.directions is not None)

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
            "kfe_blocks": {"built": self.kfe_blocks_built, "kept": self.kfe_blocks_kept,
                           "folded": self.kfe_blocks_folded},
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
        if self.kfe_blocks_built:
            out.append(f"KFE blocks: {self.kfe_blocks_built} built, {self.kfe_blocks_kept} kept, "
                       f"{self.kfe_blocks_folded} folded back")
        out += ["shape: input→output channels; a KFE block is shown as in→[r_in→r_out]→out, its "
                "eigen-directions between the two rotations."]
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
                 target: Optional[Dict[str, float]] = None, loss_units: bool = True) -> PruneReport:
    """One row per layer of the unpruned model, with its state after pruning."""
    rows = [LayerRow(name, stats, after_layers.get(name), damages.get(name, 0.0))
            for name, stats in before_layers.items()]
    return PruneReport(method=method, before=before, after=after, rows=rows, rounds=rounds,
                       kfe_blocks_built=kfe_blocks_built, timings=dict(timings or {}),
                       target=dict(target or {}), loss_units=loss_units)
