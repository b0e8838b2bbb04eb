"""Measured latency of pruned models: EigenDamage vs Kron-OBD vs Torch-Pruning's criteria.

For every model (timm, random init, 10 classes; fixed-size models built with
``img_size=--size``) ``tp_eigendamage.prune`` prunes a copy of the same model with the same
statistics batches:

* at every target in ``--targets`` (share of the unpruned FLOPs to keep; ``--target-kind
  params`` for parameters) with each method: ``eigendamage`` (KFE blocks in the form cheapest
  by the budgeted cost), ``eigendamage/lat-forms`` (the same budget, forms chosen by measured
  latency: ``form_cost="latency"``; tolerance 5 %, as a block changing form makes the FLOPs
  jump), ``eigendamage/lat-forms-bN`` (the same, forms timed on an input of the larger
  ``--batch``: what a user deploying at that batch size passes as ``example_inputs``),
  ``kron_obd``, and Torch-Pruning's ``magnitude`` and
  ``taylor`` (``prune(method="magnitude")`` / ``"taylor"``);
* at every target in ``--latency-targets`` (``target_latency``: share of the unpruned model's
  measured latency) and every batch size in ``--latency-batches`` (1 and/or ``--batch``) with
  ``eigendamage`` and ``kron_obd``, ``example_inputs`` of that batch size (so the latency
  budgeted is the one at that batch size).

``--trained``: instead of random-init models and random statistics batches, every model is
TRAINED on scikit-learn's digits at ``--size`` (once, cached under ``benchmarks/.cache/``;
SGD with momentum, cosine schedule, weight decay 1e-4, :data:`TRAIN_RECIPES`), the statistics
come from ``--stat-batches`` × ``--stat-batch-size`` training images (default 8 × 64), and the
table adds what pruning cost in quality, without fine-tuning: the mean cross entropy on the
statistics examples ("loss") and the accuracy on the held-out split; the checks add both
methods' loss increases at the same FLOPs, the latency targets' table the loss and accuracy at
the same latency.

timm ResNets are built with ``zero_init_last=False`` unless ``--zero-init-last``: with timm's
default (the last BatchNorm of every residual block starts at zero) no gradient reaches the
layers inside a residual branch, so every second-order damage there is exactly 0 and the
channels removed are decided by the weight-magnitude tie-break, not by the method (trained
models are built with timm's defaults: training moves those BatchNorms off zero).

Latency (:func:`tp_eigendamage.measure_latency`): eval mode, ``torch.inference_mode()``, batch
1 and batch ``--batch``; every model of one architecture (the unpruned one and all pruned
copies, each also after :func:`tp_eigendamage.fuse_for_inference`) is timed in ONE call:
warm-up passes, then ``--repeats`` interleaved samples per model (rotating order, each sample
at least ``--min-sample-ms``), the median per model divided by the unpruned model's. On the CPU
with one thread the clock is the process's CPU time (robust to other processes on a shared
machine), otherwise the wall clock (``torch.cuda.synchronize`` around every sample on CUDA).

Run (CPU defaults: 96 px, one thread):
    python benchmarks/latency.py
    python benchmarks/latency.py --models resnet18 --targets 0.5
    python benchmarks/latency.py --size 224 --batch 64 --device cuda
    python benchmarks/latency.py --trained --models resnet18 convnext_atto --latency-batches 1 8

Prints a markdown table (per model, target and method: params and FLOPs kept, latency at
batch 1 and at ``--batch`` relative to the unpruned model, as pruned and fused, the KFE block
forms, number of modules, status — the error if the model could not be pruned), then the
latency targets: eigendamage latency / kron_obd latency ≤ 1.05 at equal FLOPs, eigendamage's
latency ratio minus its FLOPs ratio ≤ 0.10 (FLOPs 0.5 on resnet18 / resnet50), and every
``target_latency`` model within 10 % of the latency it asked for (at the batch size it was
pruned for). ``--breakdown`` adds where the time goes: every leaf module of the unpruned,
eigendamage and kron_obd models timed alone on the input it reads, summed per kind of module
(1×1 convolutions, other convolutions, grouped convolutions, then by class).
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn

import tp_eigendamage as ted
from _common import (checked, create_model, digits_data, digits_model, error_text, example_input, markdown_table,
                     random_batches)
from tp_eigendamage.latency import latency_clock
from tp_eigendamage.training import evaluate

MODELS = ["resnet18", "resnet50", "convnext_atto", "mobilenetv3_small_100", "vit_tiny_patch16_224"]
#: label → (method, extra prune() options, example_inputs at the larger --batch), pruned at
#: every --targets value
BUDGET_METHODS = {"eigendamage": ("eigendamage", {}, False),
                  "eigendamage/lat-forms": ("eigendamage", {"form_cost": "latency", "tolerance": 0.05}, False),
                  "eigendamage/lat-forms-bN": ("eigendamage", {"form_cost": "latency", "tolerance": 0.05}, True),
                  "kron_obd": ("kron_obd", {}, False), "magnitude": ("magnitude", {}, False),
                  "taylor": ("taylor", {}, False)}
#: methods pruned at every --latency-targets value
LATENCY_METHODS = ("eigendamage", "kron_obd")
#: --trained: epochs and learning rate per model (others: :data:`DEFAULT_RECIPE`); at 96 px
#: ConvNeXt and ViT reach about 0.6 held-out accuracy with the default, 0.88 / 0.86 with these
TRAIN_RECIPES = {"convnext_atto": dict(epochs=20, lr=0.01), "vit_tiny_patch16_224": dict(epochs=20, lr=0.01)}
DEFAULT_RECIPE = dict(epochs=10, lr=0.05)
#: where the target "latency ratio ≤ FLOPs ratio + 0.10" for eigendamage applies
FLOPS_GAP_TARGET = dict(models=("resnet18", "resnet50"), target=0.5, bound=0.10)
SAME_COST_BOUND = 1.05
LANDING_BOUND = 0.10
#: the latency columns: (batch index, fused)
COLUMNS = ((0, False), (1, False), (0, True), (1, True))


@dataclass
class Variant:
    """One model of an architecture: unpruned (``label="unpruned"``) or pruned."""

    label: str
    kind: Optional[str]                 # "flops" / "params" / "latency": the target kind
    target: Optional[float]
    model: Optional[nn.Module]
    params: float = float("nan")
    flops: float = float("nan")
    forms: str = "–"
    error: str = ""
    at_batch: int = 1                   # latency targets: the batch size of example_inputs
    latency: Dict[tuple, float] = field(default_factory=dict)   # (batch index, fused) → seconds
    quality: Dict[str, float] = field(default_factory=dict)     # --trained: loss, held-out accuracy

    @property
    def target_text(self) -> str:
        if self.kind is None:
            return "–"
        return f"{self.kind} {self.target}" + (f" b={self.at_batch}" if self.kind == "latency" else "")

    @property
    def modules(self) -> int:
        return len(list(self.model.modules()))


def build(name: str, args) -> nn.Module:
    """The random-init model; ResNets with ``zero_init_last=False`` unless ``--zero-init-last``
    (module docstring)."""
    if not args.zero_init_last:
        try:
            return create_model(name, args.size, args.device, zero_init_last=False)
        except TypeError:   # the model has no such option
            pass
    return create_model(name, args.size, args.device)


def workload(name: str, args):
    """``(model, statistics batches, digits data or None)``: random init and random batches, or
    with ``--trained`` the model trained on the digits and batches of its training images."""
    if not args.trained:
        return (build(name, args), random_batches(args.stat_batches, args.stat_batch_size, args.size, args.device),
                None)
    data = digits_data(args.stat_batches * args.stat_batch_size, args.size, args.stat_batch_size)
    model = digits_model(name, name, data, **TRAIN_RECIPES.get(name, DEFAULT_RECIPE), weight_decay=1e-4,
                         size=args.size).to(args.device)
    return model, [(x.to(args.device), y.to(args.device)) for x, y in data.batches], data


def quality(model: nn.Module, data, device) -> Dict[str, float]:
    """Mean cross entropy on the statistics examples and held-out accuracy
    (:func:`tp_eigendamage.training.evaluate`)."""
    held_out = list(zip(*(t.split(64) for t in data.held_out)))
    with torch.no_grad():
        return {"loss": evaluate(model, data.batches, device)["loss"],
                "accuracy": evaluate(model, held_out, device)["accuracy"]}


def forms_text(report) -> str:
    """Kept KFE blocks as three-layer / rotate_in-merged / core-merged, and folded."""
    if not report.kfe_blocks_built:
        return "–"
    f = report.kfe_block_forms
    return f"{f.get('kfe', 0)}/{f.get('in_merged', 0)}/{f.get('out_merged', 0)}/{report.kfe_blocks_folded}"


def pruned_variants(args, name: str) -> List[Variant]:
    """The unpruned model, then one variant per target and method (``model=None`` on error)."""
    base, batches, data = workload(name, args)
    examples = (example_input(args.size, args.device), example_input(args.size, args.device, args.batch))
    variants = [Variant("unpruned", None, None, base, 1.0, 1.0)]
    jobs = [(label, method, dict(extra, **{f"target_{args.target_kind}": t}), args.target_kind, t, large)
            for t in args.targets for label, (method, extra, large) in BUDGET_METHODS.items()]
    jobs += [(method, method, {"target_latency": t}, "latency", t, b != 1)
             for t in args.latency_targets for b in args.latency_batches for method in LATENCY_METHODS]
    for label, method, options, kind, target, large in jobs:
        start = time.perf_counter()
        at_batch = args.batch if large and kind == "latency" else 1
        try:
            model, report = ted.prune(copy.deepcopy(base), batches, examples[large], method=method,
                                      progress=False, **options)
            variants.append(Variant(label, kind, target, model, report.params_fraction, report.flops_fraction,
                                    forms_text(report), at_batch=at_batch))
            status = "ok"
        except Exception as exc:   # the table records failures
            status = error_text(exc)
            variants.append(Variant(label, kind, target, None, error=status, at_batch=at_batch))
        print(f"{name:<24}{label:<26}{variants[-1].target_text:<16}{time.perf_counter() - start:7.1f} s  {status}",
              flush=True)
    if data is not None:
        for v in variants:
            if v.model is not None:
                v.quality = quality(v.model, data, args.device)
    return variants


def measure(args, variants: List[Variant]) -> None:
    """Fill ``variant.latency`` for every variant with a model: at batch 1 and ``--batch``, as
    pruned and fused, every model of the architecture in one interleaved measurement."""
    timed = [v for v in variants if v.model is not None]
    example = example_input(args.size, args.device)
    models = [v.model for v in timed] + [ted.fuse_for_inference(copy.deepcopy(v.model), example) for v in timed]
    for b, batch in enumerate((1, args.batch)):
        seconds = ted.measure_latency(models, example_input(args.size, args.device, batch), warmup=args.warmup,
                                      repeats=args.repeats, min_sample_s=args.min_sample_ms / 1e3)
        for i, v in enumerate(timed):
            v.latency[(b, False)], v.latency[(b, True)] = seconds[i], seconds[len(timed) + i]


def table(results: dict, args) -> str:
    head = ["model", "method", "target", "params kept", "FLOPs kept", "latency b=1",
            f"latency b={args.batch}", "fused b=1", f"fused b={args.batch}", "forms 3/in/out/folded",
            "modules"] + (["loss", "held-out acc"] if args.trained else []) + ["status"]
    rows = []
    for name, variants in results.items():
        base = variants[0]
        for v in variants:
            if v.model is None:
                rows.append([name, v.label, v.target_text] + ["–"] * (len(head) - 4) + [v.error])
                continue
            if v is base:
                row = ([name, v.label, v.target_text, "1.000", "1.000"]
                       + [f"1.000 ({v.latency[c] * 1e3:.1f} ms)" for c in COLUMNS] + ["–"])
            else:
                row = ([name, v.label, v.target_text, f"{v.params:.3f}", f"{v.flops:.3f}"]
                       + [f"{v.latency[c] / base.latency[c]:.3f}" for c in COLUMNS] + [v.forms])
            row.append(str(v.modules))
            if args.trained:
                row += [f"{v.quality['loss']:.4f}", f"{v.quality['accuracy']:.3f}"]
            rows.append(row + ["ok"])
    return markdown_table(head, rows)


def _ratio(a: Variant, b: Variant, column) -> float:
    return a.latency[column] / b.latency[column] if a.latency and b.latency else float("nan")


def _loss_increases(ed: Variant, obd: Variant, base: Variant) -> str:
    """``"ED / OBD"``: each model's loss increase over the unpruned model's (--trained)."""
    if not (ed.quality and obd.quality):
        return "–"
    return " / ".join(f"{v.quality['loss'] - base.quality['loss']:.4f}" for v in (ed, obd))


def checks(results: dict, args) -> str:
    """EigenDamage against Kron-OBD at the same budget, and its latency against its FLOPs."""
    cols = [f"b={1 if b == 0 else args.batch}{' fused' if fused else ''}" for b, fused in COLUMNS]
    head = (["model", f"target {args.target_kind}"]
            + [f"ED / OBD {c} (≤ {SAME_COST_BOUND})" for c in cols]
            + [f"ED lat-forms / OBD {c}" for c in cols[:2]]
            + [f"ED lat-forms-b{args.batch} / OBD {cols[1]}"]
            + [f"ED latency − FLOPs {c}" for c in cols[:2]]
            + (["loss increase ED / OBD"] if args.trained else []))
    rows = []
    for name, variants in results.items():
        base = variants[0]
        for target in args.targets:
            found = {v.label: v for v in variants if v.kind == args.target_kind and v.target == target}
            ed, ed_lat, obd = found["eigendamage"], found["eigendamage/lat-forms"], found["kron_obd"]
            ed_lat_large = found["eigendamage/lat-forms-bN"]
            gap_is_target = (args.target_kind == "flops" and name in FLOPS_GAP_TARGET["models"]
                             and target == FLOPS_GAP_TARGET["target"])
            gap_bound = FLOPS_GAP_TARGET["bound"] if gap_is_target else None
            rows.append([name, f"{target}"]
                        + [checked(_ratio(ed, obd, c), SAME_COST_BOUND, 3) for c in COLUMNS]
                        + [checked(_ratio(ed_lat, obd, c), None, 3) for c in COLUMNS[:2]]
                        + [checked(_ratio(ed_lat_large, obd, COLUMNS[1]), None, 3)]
                        + [checked(_ratio(ed, base, c) - ed.flops, gap_bound, 3) for c in COLUMNS[:2]]
                        + ([_loss_increases(ed, obd, base)] if args.trained else []))
    return markdown_table(head, rows)


def landing(results: dict, args) -> str:
    """Every ``target_latency`` model: its latency at the batch size it was pruned for (measured
    here, as pruned) against the target; with ``--trained`` also its loss and held-out accuracy."""
    head = (["model", "method", "target latency", "batch", "measured",
             f"|measured / target − 1| (≤ {LANDING_BOUND})", "params kept", "FLOPs kept"]
            + (["loss", "held-out acc"] if args.trained else []))
    rows = []
    for name, variants in results.items():
        for v in variants:
            if v.kind == "latency":
                measured = _ratio(v, variants[0], (int(v.at_batch != 1), False))
                rows.append([name, v.label, f"{v.target}", str(v.at_batch), checked(measured, None, 3),
                             checked(abs(measured / v.target - 1), LANDING_BOUND, 3),
                             f"{v.params:.3f}", f"{v.flops:.3f}"]
                            + ([checked(v.quality.get("loss", float("nan")), None, 4),
                                checked(v.quality.get("accuracy", float("nan")), None, 3)] if args.trained else []))
    return markdown_table(head, rows)


def layer_kind(layer: nn.Module) -> str:
    """What a leaf module is, for the time breakdown."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups > 1:
            return "grouped conv"
        return "1×1 conv" if layer.kernel_size == (1, 1) and layer.stride == (1, 1) else "other conv"
    return type(layer).__name__


def time_by_layer_kind(model: nn.Module, x: torch.Tensor, args) -> Dict[str, float]:
    """Seconds per forward spent in each kind of leaf module (each leaf timed alone on the input
    it reads), and ``"total"`` (the whole model, timed the same way)."""
    seen: Dict[str, tuple] = {}
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]

    def keep_inputs(name):
        def hook(module, inputs, output):
            seen.setdefault(name, inputs)
        return hook

    hooks = [m.register_forward_hook(keep_inputs(n)) for n, m in leaves]
    with torch.inference_mode():
        model.eval()(x)
    for h in hooks:
        h.remove()
    spent = {"total": ted.measure_latency([model], x, repeats=args.repeats)[0]}
    for n, m in leaves:
        if n in seen:
            kind = layer_kind(m)
            alone = ted.measure_latency([m], seen[n], repeats=5, min_sample_s=0.002)[0]
            spent[kind] = spent.get(kind, 0.0) + alone
    return spent


def breakdown(results: dict, args) -> str:
    """Where the time goes: the unpruned model, eigendamage and kron_obd at the first target."""
    head = ["model", "batch", "model variant", "total ms", "time per leaf-module kind (ms; the rest is "
            "outside modules: residual sums, reshapes, ...)"]
    rows = []
    for name, variants in results.items():
        chosen = [v for v in variants if v.kind is None or (
            v.kind == args.target_kind and v.target == args.targets[0] and v.label in ("eigendamage", "kron_obd"))]
        for b, batch in enumerate((1, args.batch)):
            x = example_input(args.size, args.device, batch)
            for v in chosen:
                if v.model is None:
                    continue
                spent = time_by_layer_kind(v.model, x, args)
                kinds = sorted((k for k in spent if k != "total"), key=lambda k: -spent[k])
                shown = [f"{k} {spent[k] * 1e3:.2f}" for k in kinds if spent[k] >= 0.02 * spent["total"]]
                rows.append([name, str(batch), v.label if v.kind is None else f"{v.label} {v.kind} {v.target}",
                             f"{spent['total'] * 1e3:.2f}", ", ".join(shown)])
    return markdown_table(head, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS, help="timm model names")
    p.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.25],
                   help="shares of the unpruned cost to keep")
    p.add_argument("--target-kind", choices=("flops", "params"), default="flops",
                   help="which cost --targets are shares of (prune's target_<kind>)")
    p.add_argument("--latency-targets", nargs="*", type=float, default=[0.5],
                   help="shares of the unpruned latency to keep (prune's target_latency)")
    p.add_argument("--latency-batches", nargs="+", type=int, default=[1],
                   help="batch sizes of example_inputs the latency targets are pruned at (1 and/or --batch)")
    p.add_argument("--trained", action="store_true",
                   help="train every model on the digits first (cached) and report loss and held-out accuracy")
    p.add_argument("--zero-init-last", action="store_true",
                   help="build timm ResNets with their default zero-initialised last BatchNorm")
    p.add_argument("--size", type=int, default=96, help="image side (img_size of fixed-size models)")
    p.add_argument("--batch", type=int, default=8, help="the larger latency batch (besides 1)")
    p.add_argument("--stat-batches", type=int, default=None,
                   help="statistics (and gradient) batches (default 2, with --trained 8)")
    p.add_argument("--stat-batch-size", type=int, default=None, help="(default 8, with --trained 64)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forward passes per model")
    p.add_argument("--repeats", type=int, default=9, help="interleaved timed samples per model (median)")
    p.add_argument("--min-sample-ms", type=float, default=5.0, help="shortest timed sample")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--breakdown", action="store_true",
                   help="also time every leaf module of the unpruned, eigendamage and kron_obd models "
                        "(first target) alone and print the time per kind of module")
    args = p.parse_args()
    args.stat_batches = args.stat_batches or (8 if args.trained else 2)
    args.stat_batch_size = args.stat_batch_size or (64 if args.trained else 8)
    if not set(args.latency_batches) <= {1, args.batch}:
        p.error(f"--latency-batches {args.latency_batches}: each must be 1 or --batch ({args.batch})")
    torch.set_num_threads(args.threads)

    clock = latency_clock(example_input(args.size, args.device))
    print(f"{args.size}×{args.size}, target_{args.target_kind} {args.targets}, target_latency "
          f"{args.latency_targets}, statistics {args.stat_batches} × {args.stat_batch_size}, {args.device}, "
          f"torch {torch.__version__}, {args.threads} thread(s), latency: median of {args.repeats} "
          f"samples, {clock} clock, "
          + ("trained on the digits" if args.trained else f"random init, zero_init_last={args.zero_init_last}"),
          flush=True)
    results = {}
    for name in args.models:
        results[name] = pruned_variants(args, name)
        measure(args, results[name])
    print()
    print(table(results, args))
    print()
    print(checks(results, args))
    gap = FLOPS_GAP_TARGET
    print(f"ED: eigendamage, OBD: kron_obd at the same target. The latency − FLOPs target "
          f"(≤ {gap['bound']}) applies to eigendamage at FLOPs {gap['target']} on "
          f"{' and '.join(gap['models'])} (✓/✗ there).")
    if args.latency_targets:
        print()
        print(landing(results, args))
    if args.breakdown:
        print()
        print(breakdown(results, args))


if __name__ == "__main__":
    main()
