"""Per-layer tables and before/after totals of a pruning run.

A "layer" is a plain ``nn.Conv2d`` / ``nn.Linear`` or a whole KFE block (its rotation layers
are charged to it). Parameters and FLOPs come from ``torch_pruning.utils.count_ops_and_params``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch.nn as nn
import torch_pruning as tp

from .budget import Cost
from .kfe import KFEBlock
from .layers import adapter_for


@dataclass
class LayerStats:
    """Shape and cost of one layer at one moment."""

    kind: str
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
    total_flops, total_params, flops, params = tp.utils.count_ops_and_params(
        model, example_inputs, layer_wise=True)
    cost = lambda mods, table: int(sum(table.get(m) or 0 for m in mods))  # noqa: E731
    rows: Dict[str, LayerStats] = {}
    inside_blocks = set()
    for name, module in model.named_modules():
        if isinstance(module, KFEBlock):
            parts = [module.rotate_in, module.core, module.rotate_out]
            inside_blocks.update(id(p) for p in parts)
            a = adapter_for(module.core)
            rows[name] = LayerStats(
                kind=f"kfe-{a.kind}", in_channels=adapter_for(module.rotate_in).in_features(module.rotate_in),
                out_channels=adapter_for(module.rotate_out).out_features(module.rotate_out),
                params=cost(parts, params), flops=cost(parts, flops),
                directions=(a.in_features(module.core), a.out_features(module.core)))
        elif id(module) not in inside_blocks and adapter_for(module) is not None:
            a = adapter_for(module)
            rows[name] = LayerStats(kind=a.kind, in_channels=a.in_features(module),
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
    """What :func:`tp_eigendamage.prune` did: per-layer rows, totals, rounds."""

    method: str
    before: Cost
    after: Cost
    rows: List[LayerRow]
    rounds: List[dict] = field(default_factory=list)
    kfe_blocks_built: int = 0

    @property
    def kfe_blocks_kept(self) -> int:
        """KFE blocks still in the pruned model (their bottleneck pays)."""
        return sum(1 for r in self.rows if r.after is not None and r.after.directions is not None)

    @property
    def kfe_blocks_folded(self) -> int:
        """KFE blocks built during pruning and folded back into one dense layer."""
        return self.kfe_blocks_built - self.kfe_blocks_kept

    @property
    def params_fraction(self) -> float:
        return self.after.params / self.before.params

    @property
    def flops_fraction(self) -> float:
        return self.after.flops / self.before.flops

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "before": asdict(self.before),
            "after": asdict(self.after),
            "params_fraction": self.params_fraction,
            "flops_fraction": self.flops_fraction,
            "rounds": self.rounds,
            "kfe_blocks": {"built": self.kfe_blocks_built, "kept": self.kfe_blocks_kept,
                           "folded": self.kfe_blocks_folded},
            "layers": [
                {"name": r.name, "before": asdict(r.before),
                 "after": None if r.after is None else asdict(r.after),
                 "predicted_damage": r.predicted_damage}
                for r in self.rows
            ],
        }

    def __str__(self) -> str:
        head = ("layer", "kind", "shape before", "shape after", "params", "FLOPs", "pred. damage")
        lines = []
        for r in self.rows:
            after = r.after
            lines.append((
                r.name, after.kind if after else r.before.kind, r.before.shape_text(),
                after.shape_text() if after else "removed",
                f"{r.before.params:,}→{after.params if after else 0:,}",
                f"{_si(r.before.flops)}→{_si(after.flops if after else 0)}",
                f"{r.predicted_damage:.3g}"))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        out = [f"method: {self.method}", fmt.format(*head), rule]
        out += [fmt.format(*line) for line in lines]
        out += [rule,
                f"params {self.before.params:,} → {self.after.params:,} ({self.params_fraction:.1%}); "
                f"FLOPs {_si(self.before.flops)} → {_si(self.after.flops)} ({self.flops_fraction:.1%})"]
        if self.kfe_blocks_built:
            out.append(f"KFE blocks: {self.kfe_blocks_built} built, {self.kfe_blocks_kept} kept, "
                       f"{self.kfe_blocks_folded} folded back")
        return "\n".join(out)


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def build_report(method: str, before_layers: Dict[str, LayerStats], after_layers: Dict[str, LayerStats],
                 before: Cost, after: Cost, damages: Dict[str, float], rounds: List[dict],
                 kfe_blocks_built: int = 0) -> PruneReport:
    rows = [LayerRow(name, stats, after_layers.get(name), damages.get(name, 0.0))
            for name, stats in before_layers.items()]
    return PruneReport(method=method, before=before, after=after, rows=rows, rounds=rounds,
                       kfe_blocks_built=kfe_blocks_built)
