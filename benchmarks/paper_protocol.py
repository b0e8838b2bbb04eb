"""The EigenDamage paper's protocol in miniature: high compression, equal budgets, iterative.

Two network families as in the paper, written here and trained from scratch on the embedded
scikit-learn digits at 32×32 (or on an image folder with ``--data-dir``):

* ``vgg19``: the CIFAR VGG-19 with BatchNorm — 16 3×3 conv + BN + ReLU layers in 5 stages
  (base widths 64-128-256-512-512, times ``--width``), 2×2 max-pooling between stages,
  global average pooling and one linear classifier;
* ``resnet32``: the CIFAR ResNet-32 — a 3×3 stem, 3 stages of 5 basic blocks (base widths
  16-32-64, times ``--width``), option-B shortcuts (1×1 conv + BN) where the shape changes,
  global average pooling and one linear classifier.

Each (family, width, seed) is trained once (SGD momentum 0.9, cosine schedule) and cached
under ``benchmarks/.cache/``, so reruns and ablations skip training. Every cell
(family × budget × schedule × method × seed) then prunes a copy of the trained model to a
budget — the share of the original parameters (``params:f``) or FLOPs (``flops:f``) kept —
and fine-tunes it:

* ``oneshot``: prune once, fine-tune ``--finetune-epochs`` (E) epochs;
* ``iterative``: ``--iterative-steps`` (k) rounds of prune → fine-tune E/k epochs, via
  ``prune(iterative_steps=k, finetune=...)`` (round r reaches ``f^(r/k)`` of the original).

Every method sees the same statistics batches (``--stat-batches``, fixed per seed), the same
fine-tuning and the same classifier exemption. Methods:

* ``prune(method=name)``: ``eigendamage``, ``kron_obd``, ``kron_obs``, ``fisher_diag`` (C-OBD),
  and Torch-Pruning's ``magnitude`` (``GroupMagnitudeImportance(p=2)``), ``taylor``
  (``GroupTaylorImportance``; ``prune()`` refills the gradients of the mean loss over the
  statistics batches every round) and ``bn_scale`` (``BNScaleImportance``). The model enters
  ``prune()`` in eval mode, so no statistics pass changes BatchNorm running statistics;
* ``eigendamage_ekfac``: EigenDamage with the EK-FAC refit of the eigenbasis Fisher diagonal,
  built here from the public API (``prune()`` has no EK-FAC switch yet): before each round the
  model is rewritten in the KFE (``collect_kfac`` → ``to_kfe`` → ``fit_eigen_correction``) and
  ``prune()`` gets an ``EigenDamageImportance``. The target is rescaled by
  ``cost(dense) / cost(KFE)`` so it is a share of the ORIGINAL model like the other methods'.

A target the per-layer caps cannot reach is reported as ``unreachable``. Reported per (family,
budget, schedule, method): test accuracy and test loss (mean ± sample std over seeds), the test
accuracy right after the last round's pruning (before its fine-tuning: how much of the model
the criterion kept by itself), and the
parameters / FLOPs actually kept (fractions of the trained dense model, KFE rotations counted).
Output: a plain-text table on stdout, ``results.json`` (config, every cell with its per-layer
widths and, per round, the test metrics right after pruning, before fine-tuning; the summary) and
``accuracy.png`` / ``loss.png`` (metric vs FLOPs kept, one line per method, one panel per
family × schedule) in ``--out``; ``results.json`` is rewritten after every cell.

Defaults are reduced to fit one CPU core in about 1.3 h (the paper: full-width networks on
CIFAR, 3 seeds, the whole budget set): narrow networks (``--width vgg19=0.25,resnet32=0.5``,
i.e. VGG-19 16-32-64-128-128 and ResNet-32 8-16-32), 30 training epochs, E=6 fine-tuning epochs
(k=3 iterative rounds of 2), 4 statistics batches of 64, and two budgets, FLOPs 0.1 and params
0.1 (``--budgets paper`` runs params 0.25/0.1/0.05 and FLOPs 0.25/0.1/0.05/(1/8.8)). Measured on
one thread: training ~100 CPU s (VGG-19) / ~130 CPU s (ResNet-32) per seed, a cell ~10-30 CPU s
(VGG-19) / ~20-50 CPU s (ResNet-32), so the default 96 cells take ~1.3 h and each further
budget ~0.5 h. Same seed ⇒ same numbers on the same machine and thread count.

    python benchmarks/paper_protocol.py --quick             # smoke test, ~1 CPU minute
    python benchmarks/paper_protocol.py                     # the default run
    python benchmarks/paper_protocol.py --seeds 0 --methods eigendamage,kron_obd,fisher_diag,magnitude,taylor
    python benchmarks/paper_protocol.py --prune-kwargs '{"fisher_type": "empirical"}'
    python benchmarks/paper_protocol.py --data-dir cifar10_folders --device cuda \\
        --width 1 --train-epochs 160 --finetune-epochs 30 --budgets paper
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import math
import os
import platform
import random
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

import tp_eigendamage
from tp_eigendamage import (EigenDamageImportance, TargetUnreachableError, collect_kfac,
                            fit_eigen_correction, to_kfe)
from tp_eigendamage.data import digits_datasets, image_folder_datasets, make_loaders, num_classes
from tp_eigendamage.training import evaluate, finetune_callback, train

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
FAMILIES = ("vgg19", "resnet32")
METHODS = ("eigendamage", "eigendamage_ekfac", "kron_obd", "kron_obs", "fisher_diag",
           "magnitude", "taylor", "bn_scale")
SCHEDULES = ("oneshot", "iterative")
DEFAULT_BUDGETS = "flops:0.1,params:0.1"
PAPER_BUDGETS = "params:0.25,params:0.1,params:0.05,flops:0.25,flops:0.1,flops:0.05,flops:1/8.8"
DEFAULT_WIDTH = "vgg19=0.25,resnet32=0.5"


# -- the two network families -----------------------------------------------------------------
VGG19_STAGES = ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512))


def _scaled(width: float, channels: int) -> int:
    return max(1, round(width * channels))


class VGG19(nn.Module):
    """CIFAR VGG-19 with BatchNorm: 16 conv layers in 5 stages, max-pooling between stages."""

    def __init__(self, num_classes: int, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        layers, c_in = [], in_channels
        for stage, widths in enumerate(VGG19_STAGES):
            if stage > 0:
                layers.append(nn.MaxPool2d(2))
            for channels in widths:
                c_out = _scaled(width, channels)
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                           nn.ReLU(inplace=True)]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """Two 3×3 conv + BN; option-B shortcut (1×1 conv + BN) where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(c_out)))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet32(nn.Module):
    """CIFAR ResNet-32: a 3×3 stem and 3 stages of 5 basic blocks (widths 16-32-64 × width)."""

    def __init__(self, num_classes: int, width: float = 1.0, in_channels: int = 3, blocks: int = 5):
        super().__init__()
        c = _scaled(width, 16)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        stages, c_in = [], c
        for stage, channels in enumerate((16, 32, 64)):
            c_out = _scaled(width, channels)
            stages += [BasicBlock(c_in if i == 0 else c_out, c_out, 2 if stage > 0 and i == 0 else 1)
                       for i in range(blocks)]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def build_model(family: str, classes: int, width: float) -> nn.Module:
    model = {"vgg19": VGG19, "resnet32": ResNet32}[family](classes, width)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


# -- helpers ----------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cost(model: nn.Module, example_inputs) -> Dict[str, int]:
    flops, params = tp.utils.count_ops_and_params(model, example_inputs)
    return {"params": int(params), "flops": int(flops)}


def parse_fraction(text: str) -> float:
    """``0.1`` or ``1/8.8``."""
    num, _, den = text.partition("/")
    value = float(num) / float(den) if den else float(num)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"budget fraction {text!r} must be strictly between 0 and 1")
    return value


def parse_budgets(text: str) -> List[dict]:
    """``params:F`` / ``flops:F`` items, comma-separated; ``paper`` is the paper's whole set."""
    text = PAPER_BUDGETS if text.strip() == "paper" else text
    budgets = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        kind, sep, fraction = item.partition(":")
        if not sep or kind not in ("params", "flops"):
            raise argparse.ArgumentTypeError(f"budget {item!r}: write params:F or flops:F (F like 0.1 or 1/8.8)")
        budgets.append({"label": item, "kind": kind, "value": parse_fraction(fraction)})
    if not budgets:
        raise argparse.ArgumentTypeError("--budgets is empty")
    return budgets


def parse_choices(text: str, allowed, what: str) -> List[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [c for c in chosen if c not in allowed]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"--{what}: {unknown or 'nothing'} not in {list(allowed)}")
    return chosen


def parse_widths(text: str) -> Dict[str, float]:
    """``0.25`` (every family) or ``vgg19=0.25,resnet32=0.5``."""
    if "=" not in text:
        return {f: float(text) for f in FAMILIES}
    widths = dict((k.strip(), float(v)) for k, v in (item.split("=") for item in text.split(",")))
    missing = [f for f in FAMILIES if f not in widths]
    if missing:
        raise argparse.ArgumentTypeError(f"--width: no width for {missing}")
    return widths


def rewrite_in_kfe_with_ekfac(model: nn.Module, batches, skip, fisher_type: str) -> None:
    """K-FAC → KFE rewrite (or re-rotation) → EK-FAC refit of every block's Fisher diagonal."""
    stats = collect_kfac(model, batches, fisher_type=fisher_type, progress=False)
    to_kfe(model, stats, skip=skip)
    fit_eigen_correction(model, batches, fisher_type=fisher_type, progress=False)


# -- one cell -----------------------------------------------------------------------------------
class EigenDamageEKFAC:
    """EigenDamage with the EK-FAC refit, on top of ``prune(method=<Importance>)``.

    For an ``Importance`` instance ``prune()`` neither collects statistics nor rewrites layers,
    so the model is rewritten in the KFE and refit here: before round 1 (on construction) and
    after every round's fine-tuning but the last (:meth:`finetune`), as ``prune()`` does for
    ``"eigendamage"`` at the start of each round. ``prune()`` then measures its budget from the
    rewritten model, which carries the rotation layers: ``target_scale`` turns a share of the
    dense model into a share of the rewritten one.
    """

    def __init__(self, model: nn.Module, batches, example_inputs, fisher_type: str):
        skip = [model.classifier]
        self.rewrite = lambda: rewrite_in_kfe_with_ekfac(model, batches, skip, fisher_type)
        dense = cost(model, example_inputs)
        self.rewrite()
        rewritten = cost(model, example_inputs)
        self.target_scale = {k: dense[k] / rewritten[k] for k in dense}
        self.importance = EigenDamageImportance(
            lambda: collect_kfac(model, batches, fisher_type=fisher_type, progress=False))

    def finetune(self, finetune: Callable, rounds: int) -> Callable:
        def run(model, round_index):
            finetune(model, round_index)
            if round_index < rounds:
                self.rewrite()
        return run


def measured_before(finetune: Callable, loader, device, log: List[dict]) -> Callable:
    """``finetune`` that first appends the pruned model's test accuracy and loss to ``log``."""
    def run(model, round_index):
        log.append(evaluate(model, loader, device=device))
        finetune(model, round_index)
    return run


def run_cell(trained: nn.Module, family: str, budget: dict, schedule: str, method: str, seed: int,
             ctx: dict, args) -> dict:
    model = copy.deepcopy(trained).eval()   # statistics and Taylor gradients in eval mode
    seed_everything(seed)
    rounds = 1 if schedule == "oneshot" else args.iterative_steps
    fisher_type = args.prune_kwargs.get("fisher_type", "true")
    start, cpu_start = time.perf_counter(), time.process_time()
    finetune = finetune_callback(ctx["train_loader"], epochs=args.finetune_epochs // rounds,
                                 lr=args.finetune_lr, seed=seed, weight_decay=args.weight_decay,
                                 device=args.device, progress=False, max_batches=args.max_batches)
    after_pruning = []   # test metrics of each round's pruned model, before its fine-tuning
    finetune = measured_before(finetune, ctx["test_loader"], args.device, after_pruning)
    criterion, scale = method, 1.0
    if method == "eigendamage_ekfac":
        ekfac = EigenDamageEKFAC(model, ctx["stat_batches"], ctx["example_inputs"], fisher_type)
        criterion, scale = ekfac.importance, ekfac.target_scale[budget["kind"]]
        finetune = ekfac.finetune(finetune, rounds)
    target = {f"target_{budget['kind']}": budget["value"] * scale}
    row = {"family": family, "budget": budget["label"], "schedule": schedule, "method": method, "seed": seed}
    try:
        _, report = tp_eigendamage.prune(
            model, ctx["stat_batches"], ctx["example_inputs"], method=criterion, iterative_steps=rounds,
            finetune=finetune, ignored_layers=[model.classifier], progress=False, **target,
            **args.prune_kwargs)
    except TargetUnreachableError as exc:
        return {**row, "status": "unreachable", "message": str(exc), "seconds": time.perf_counter() - start,
                "cpu_seconds": time.process_time() - cpu_start}
    metrics = evaluate(model, ctx["test_loader"], device=args.device)
    reached = cost(model, ctx["example_inputs"])
    dense = ctx["dense_cost"]
    return {**row, "status": "ok", "accuracy": metrics["accuracy"], "loss": metrics["loss"],
            "params_fraction": reached["params"] / dense["params"],
            "flops_fraction": reached["flops"] / dense["flops"],
            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
            "rounds": [{**r, "test_before_finetune": m} for r, m in zip(report.rounds, after_pruning)],
            "layers": {r.name: r.after.shape_text() if r.after else "removed" for r in report.rows}}


# -- data and trained models --------------------------------------------------------------------
def datasets(args, seed: int):
    if args.data_dir:
        return image_folder_datasets(args.data_dir, image_size=args.image_size, seed=seed)
    return digits_datasets(image_size=args.image_size, seed=seed)


def data_key(args) -> str:
    if not args.data_dir:
        return f"digits{args.image_size}"
    path = os.path.abspath(args.data_dir)
    return f"{os.path.basename(path)}-{hashlib.sha1(path.encode()).hexdigest()[:8]}-{args.image_size}"


def trained_model(family: str, seed: int, classes: int, train_loader,
                  args) -> Tuple[nn.Module, Optional[dict]]:
    """The trained dense model, and the wall / CPU seconds its training took (None: from the cache)."""
    width = args.width[family]
    key = (f"{family}_w{width:g}_s{seed}_{data_key(args)}_e{args.train_epochs}_lr{args.lr:g}"
           f"_wd{args.weight_decay:g}_b{args.batch_size}" + (f"_m{args.max_batches}" if args.max_batches else ""))
    path = os.path.join(CACHE, key + ".pt")
    seed_everything(seed)
    model = build_model(family, classes, width).to(args.device)
    if os.path.isfile(path):
        model.load_state_dict(torch.load(path, map_location=args.device))
        return model, None
    start, cpu_start = time.perf_counter(), time.process_time()
    train(model, train_loader, epochs=args.train_epochs, lr=args.lr, weight_decay=args.weight_decay,
          seed=seed, device=args.device, progress=False, max_batches=args.max_batches)
    timing = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start}
    os.makedirs(CACHE, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, timing


# -- summary, table, plots ------------------------------------------------------------------------
def _mean_std(values: List[float]) -> Tuple[float, float]:
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else float("nan"))


def summarize(cells: List[dict]) -> List[dict]:
    groups: Dict[tuple, List[dict]] = {}
    for c in cells:
        groups.setdefault((c["family"], c["budget"], c["schedule"], c["method"]), []).append(c)
    summary = []
    for (family, budget, schedule, method), rows in groups.items():
        ok = [r for r in rows if r["status"] == "ok"]
        entry = {"family": family, "budget": budget, "schedule": schedule, "method": method,
                 "seeds": len(rows), "ok": len(ok), "unreachable": len(rows) - len(ok),
                 "seconds_per_cell": float(np.mean([r["seconds"] for r in rows])),
                 "cpu_seconds_per_cell": float(np.mean([r["cpu_seconds"] for r in rows]))}
        for key in ("accuracy", "loss", "params_fraction", "flops_fraction"):
            if ok:
                entry[key], entry[key + "_std"] = _mean_std([r[key] for r in ok])
        if ok:   # right after the last round's pruning, before its fine-tuning
            entry["pruned_accuracy"], entry["pruned_accuracy_std"] = _mean_std(
                [r["rounds"][-1]["test_before_finetune"]["accuracy"] for r in ok])
        summary.append(entry)
    return summary


def _pm(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    spread = "—" if math.isnan(std) else f"{scale * std:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {spread}"


def table(summary: List[dict], baselines: List[dict]) -> str:
    header = ["family", "budget", "schedule", "method", "test acc %", "test loss", "before FT acc %",
              "params kept", "FLOPs kept", "ok/seeds", "CPU s/cell"]
    rows = []
    for b in summarize_baselines(baselines):
        rows.append([b["family"], "dense", "-", "-", _pm(b["accuracy"], b["accuracy_std"], 100),
                     _pm(b["loss"], b["loss_std"], digits=4), "-", "1", "1", f"{b['seeds']}/{b['seeds']}", "-"])
    for s in summary:
        if s["ok"]:
            cols = [_pm(s["accuracy"], s["accuracy_std"], 100), _pm(s["loss"], s["loss_std"], digits=4),
                    _pm(s["pruned_accuracy"], s["pruned_accuracy_std"], 100, digits=1),
                    f"{s['params_fraction']:.3f}", f"{s['flops_fraction']:.3f}"]
        else:
            cols = ["unreachable", "-", "-", "-", "-"]
        rows.append([s["family"], s["budget"], s["schedule"], s["method"], *cols,
                     f"{s['ok']}/{s['seeds']}", f"{s['cpu_seconds_per_cell']:.0f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), "-" * (sum(widths) + 2 * (len(widths) - 1))]
                     + [fmt.format(*r) for r in rows])


def summarize_baselines(baselines: List[dict]) -> List[dict]:
    out = []
    for family in dict.fromkeys(b["family"] for b in baselines):
        rows = [b for b in baselines if b["family"] == family]
        acc, acc_std = _mean_std([b["accuracy"] for b in rows])
        loss, loss_std = _mean_std([b["loss"] for b in rows])
        out.append({"family": family, "seeds": len(rows), "accuracy": acc, "accuracy_std": acc_std,
                    "loss": loss, "loss_std": loss_std})
    return out


STYLE = {method: (marker, f"C{i}") for i, (method, marker) in
         enumerate(zip(METHODS, ("o", "D", "s", "^", "v", "P", "X", "*")))}


def plot(summary: List[dict], metric: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    families = list(dict.fromkeys(s["family"] for s in summary))
    schedules = list(dict.fromkeys(s["schedule"] for s in summary))
    fig, axes = plt.subplots(len(families), len(schedules), squeeze=False,
                             figsize=(5.5 * len(schedules), 4 * len(families)))
    for i, family in enumerate(families):
        for j, schedule in enumerate(schedules):
            ax = axes[i][j]
            rows = [s for s in summary if s["family"] == family and s["schedule"] == schedule and s["ok"]]
            for k, method in enumerate(METHODS):
                points = sorted((s["flops_fraction"], s[metric], s[metric + "_std"]) for s in rows
                                if s["method"] == method)
                if not points:
                    continue
                marker, color = STYLE[method]
                x = [p[0] * (1 + 0.01 * (k - len(METHODS) / 2)) for p in points]  # dodge overlaps
                ax.errorbar(x, [p[1] for p in points], yerr=[0 if math.isnan(p[2]) else p[2] for p in points],
                            marker=marker, color=color, markersize=6, capsize=3, alpha=0.85,
                            linewidth=1.2, label=method)
            ax.set_xscale("log")
            if rows:
                lo, hi = min(s["flops_fraction"] for s in rows), max(s["flops_fraction"] for s in rows)
                ax.set_xlim(lo / 1.3, hi * 1.3)
                ax.legend(fontsize=7)
            ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{family}, {schedule}")
            ax.set_xlabel("FLOPs kept (fraction of the dense model)")
            ax.set_ylabel(f"test {metric}")
            ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", type=lambda t: parse_choices(t, FAMILIES, "families"), default=list(FAMILIES))
    p.add_argument("--methods", type=lambda t: parse_choices(t, METHODS, "methods"), default=list(METHODS))
    p.add_argument("--budgets", type=parse_budgets, default=None,
                   help=f"comma-separated params:F / flops:F (default {DEFAULT_BUDGETS}); "
                        f"'paper' = the paper's high-compression set {PAPER_BUDGETS}")
    p.add_argument("--schedules", type=lambda t: parse_choices(t, SCHEDULES, "schedules"), default=list(SCHEDULES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--width", type=parse_widths, default=None,
                   help=f"width multiplier, one number or per family (default {DEFAULT_WIDTH})")
    p.add_argument("--train-epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.05, help="training learning rate")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--finetune-epochs", type=int, default=6, help="total fine-tuning epochs E per cell")
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--iterative-steps", type=int, default=3, help="rounds k of the iterative schedule")
    p.add_argument("--stat-batches", type=int, default=4, help="statistics batches (all methods)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--data-dir", default=None, help="image folder (train/ + val/) instead of the digits")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--prune-kwargs", type=json.loads, default={},
                   help="JSON object of extra keyword arguments for tp_eigendamage.prune()")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of about a minute")
    p.add_argument("--max-batches", type=int, default=None, help="cap on batches per epoch")
    p.add_argument("--out", default="paper_protocol_out")
    return p


def apply_quick(args) -> None:
    """Tiny networks, a few batches per epoch, one seed and one budget."""
    args.width = args.width or {"vgg19": 0.125, "resnet32": 0.25}
    args.train_epochs, args.max_batches = 2, 3
    args.finetune_epochs, args.iterative_steps = 2, 2
    args.seeds = args.seeds[:1]
    args.budgets = args.budgets or parse_budgets("flops:0.25")
    args.stat_batches = 2


def check_args(args, parser) -> None:
    if args.iterative_steps < 1 or args.finetune_epochs < 0:
        parser.error("--iterative-steps must be >= 1 and --finetune-epochs >= 0")
    if "iterative" in args.schedules and args.finetune_epochs % args.iterative_steps:
        parser.error(f"--finetune-epochs {args.finetune_epochs} is not a multiple of --iterative-steps "
                     f"{args.iterative_steps}: every schedule must fine-tune the same number of epochs")
    if not isinstance(args.prune_kwargs, dict):
        parser.error("--prune-kwargs must be a JSON object")
    clash = sorted(set(args.prune_kwargs) & {"method", "iterative_steps", "finetune", "ignored_layers",
                                             "target_params", "target_flops", "pruning_ratio", "progress"})
    if clash:
        parser.error(f"--prune-kwargs may not set {clash}: the protocol sets them")


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        apply_quick(args)
    args.width = args.width or parse_widths(DEFAULT_WIDTH)
    args.budgets = args.budgets or parse_budgets(DEFAULT_BUDGETS)
    check_args(args, parser)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    config = {k: v for k, v in vars(args).items()}
    config["versions"] = {"tp_eigendamage": tp_eigendamage.__version__, "torch": torch.__version__,
                          "torch_pruning": tp.__version__, "python": platform.python_version()}
    cells, baselines, trainings = [], [], []
    total = (len(args.families) * len(args.budgets) * len(args.schedules) * len(args.methods) * len(args.seeds))
    done = 0

    def write():
        summary = summarize(cells)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"config": config, "trainings": trainings, "baselines": baselines,
                       "cells": cells, "summary": summary}, f, indent=1)
        return summary

    for seed in args.seeds:
        train_set, test_set = datasets(args, seed)
        train_loader, test_loader = make_loaders(train_set, test_set, batch_size=args.batch_size, seed=seed)
        stat_loader = make_loaders(train_set, test_set, batch_size=args.batch_size, seed=10_000 + seed)[0]
        stat_batches = [(x.to(args.device), y.to(args.device))
                        for x, y in itertools.islice(stat_loader, args.stat_batches)]
        example_inputs = train_set[0][0][None].to(args.device)
        for family in args.families:
            model, timing = trained_model(family, seed, num_classes(train_set), train_loader, args)
            dense = evaluate(model, test_loader, device=args.device)
            baselines.append({"family": family, "seed": seed, "accuracy": dense["accuracy"], "loss": dense["loss"],
                              **cost(model, example_inputs)})
            trainings.append({"family": family, "seed": seed, "cached": timing is None, **(timing or {})})
            print(f"{family} seed {seed}: dense test acc {100 * dense['accuracy']:.2f} %, loss "
                  f"{dense['loss']:.4f}, {baselines[-1]['params']} params, {baselines[-1]['flops']} FLOPs"
                  + (f" (trained in {timing['seconds']:.0f} s, {timing['cpu_seconds']:.0f} CPU s)"
                     if timing else " (cached)"), flush=True)
            ctx = {"train_loader": train_loader, "test_loader": test_loader, "stat_batches": stat_batches,
                   "example_inputs": example_inputs, "dense_cost": cost(model, example_inputs)}
            for budget in args.budgets:
                for schedule in args.schedules:
                    for method in args.methods:
                        cell = run_cell(model, family, budget, schedule, method, seed, ctx, args)
                        cells.append(cell)
                        done += 1
                        result = (f"acc {100 * cell['accuracy']:.2f} % loss {cell['loss']:.4f} params "
                                  f"{cell['params_fraction']:.3f} FLOPs {cell['flops_fraction']:.3f}"
                                  if cell["status"] == "ok" else "unreachable")
                        print(f"[{done}/{total}] {family} {budget['label']} {schedule} {method} seed {seed}: "
                              f"{result} ({cell['seconds']:.0f} s, {cell['cpu_seconds']:.0f} CPU s)", flush=True)
                        write()
    summary = write()
    print()
    print(table(summary, baselines))
    for metric in ("accuracy", "loss"):
        plot(summary, metric, os.path.join(args.out, f"{metric}.png"))
    print(f"\nwrote {os.path.join(args.out, 'results.json')}, accuracy.png, loss.png")
    return {"summary": summary, "cells": cells, "baselines": baselines}


if __name__ == "__main__":
    main()
