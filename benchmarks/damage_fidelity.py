"""Do predicted damages match the measured loss increase, in every layer? (docs/fidelity.md)

Trained models (trained once, cached under ``benchmarks/.cache/``; scikit-learn digits at
32×32, SGD with momentum, cosine schedule, :func:`tp_eigendamage.training.train`):

* ``resnet18-wd``   — timm resnet18, 10 epochs, weight decay 1e-4;
* ``resnet18-nowd`` — the same without weight decay;
* ``mobilenetv2-wd`` — timm mobilenetv2_050, 40 epochs, weight decay 1e-4.

Statistics come from ``--stat-examples`` training images (a fixed random subset, batches of 64,
true Fisher). For every prunable layer, ``--samples`` single removals are drawn at random
(seeded) and MEASURED: the increase of the mean cross entropy, in float64, on the statistics
examples ("stat") and on the held-out test split ("held-out"), after

* removing one eigen-direction: input direction j of the layer's KFE block (every Conv2d /
  Linear but the classifier and depthwise convs), i.e. ``W_k ← W_k − W_k q_j q_jᵀ`` with
  ``q_j`` the j-th eigenvector of ``A`` (drawn among directions with ``λ_A > 1e-6 λ_max``);
* removing one channel of a Torch-Pruning group (every group rooted at a Conv2d / Linear but
  the classifier): the channel's column is zeroed in every non-depthwise layer that reads it,
  which is what removing it does to the network.

Predictions come from the library's importances on the same groups (eigen-directions: on the
model after ``to_kfe``; channels: on the plain model):

* ``eigendamage``      — EigenDamageImportance, K-FAC, first-order term as it is
  (``first_order="signed"``: the predicted change of the loss);
* ``eigendamage-positive`` — its positive part only (``first_order="positive"``, the default,
  which ``prune()`` ranks by: a removal is never credited with a loss decrease);
* ``eigendamage-2nd``  — the same with ``first_order="off"`` (the paper's damage);
* ``eigendamage-ekfac``— after ``fit_eigen_correction`` (EK-FAC diagonal and mean gradient);
* ``kron_obd``         — KroneckerOBDImportance (consumer side for channels; directions: on the
  KFE model with statistics collected on it);
* ``kron_obd-positive``— the consumer side with the positive part of the first-order term (channels);
* ``kron_obd-producer``— the producer side (channels only);
* ``fisher_diag``      — FisherDiagImportance (C-OBD), consumer side;
* ``taylor``           — Torch-Pruning's GroupTaylorImportance (``Σ |w ⊙ ∂L/∂w|``, mean loss
  gradient of the same batches, no normalizer), on the same groups;
* ``exact`` (``--exact``) — the measured first-order change plus the exact Gauss-Newton term,
  both by central differences (step 1e-3) on the statistics examples: the best any quadratic
  model of the loss can do.
* ``--factor-variants``: other Kronecker models of a conv's patch factor for the eigen-direction
  damages, computed here from ``factor_mode="patch"`` statistics (im2col ``A_patch`` with
  ``C×C`` blocks ``B_kk'`` per pair of kernel offsets), each with the first-order term:
  ``tap`` — ``B_kk' ≈ P_kk' A`` with ``P_kk' = tr B_kk' / tr A`` (a K×K tap factor: coverage
  and correlation of kernel offsets), ``coverage`` — its diagonal only, ``patch`` — KFC's full
  ``A_patch ⊗ S`` (``½ Σ_kk' (qᵀ B_kk' q)(W_k q)ᵀ S (W_k' q)`` for direction ``q``).

* ``--shrink LAYER ...`` (instead of the above): for the sampled directions of the named layers
  of the first model, the removal is scaled by ``ε`` (``W_k ← W_k − ε W_k q qᵀ``) and the
  measured loss change divided by the exact local model (measured first-order change plus the
  exact Gauss-Newton term, central differences) and by the K-FAC prediction
  ``ε·first + ε²·quadratic``, at ``ε = 1, 0.3, 0.1, 0.03``: ratios that approach 1 as ``ε → 0``
  mean the damage model is right locally and the removal is too large a step for it.

Printed per model: pooled Spearman ρ of predicted vs measured (stat / held-out), the number of
layers whose median measured/predicted ratio lies in [0.5, 2], then per layer the median ratio
and Spearman of the default criterion and of the paper's.

    python benchmarks/damage_fidelity.py                      # all three models
    python benchmarks/damage_fidelity.py --quick              # resnet18-wd, 3 samples, 256 examples
    python benchmarks/damage_fidelity.py --models resnet18-nowd --samples 4 --exact
    python benchmarks/damage_fidelity.py --models mobilenetv2-wd --shrink conv_stem blocks.0.0.conv_pw
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from scipy.stats import spearmanr

import tp_eigendamage as ted
from _common import digits_data, digits_model

MODELS = {
    "resnet18-wd": dict(arch="resnet18", epochs=10, lr=0.05, weight_decay=1e-4),
    "resnet18-nowd": dict(arch="resnet18", epochs=10, lr=0.05, weight_decay=0.0),
    "mobilenetv2-wd": dict(arch="mobilenetv2_050", epochs=40, lr=0.02, weight_decay=1e-4),
}
DIRECTION_CRITERIA = ["eigendamage", "eigendamage-positive", "eigendamage-2nd", "eigendamage-ekfac", "kron_obd", "fisher_diag", "taylor"]
FACTOR_VARIANTS = ["coverage", "tap", "patch"]
CHANNEL_CRITERIA = ["kron_obd", "kron_obd-positive", "kron_obd-2nd", "kron_obd-producer", "fisher_diag", "taylor"]
STEP = 1e-3  # central-difference step of --exact


# -- models and data -----------------------------------------------------------------------------
def trained_model(key: str, data) -> nn.Module:
    recipe = dict(MODELS[key])
    return digits_model(key, recipe.pop("arch"), data, **recipe)


# -- measurement: float64 loss after a weight change, recomputed from the first stage touched -----
def stages(model: nn.Module):
    """``(stage functions, {module: stage index})``: the model as a chain of stages (timm ResNet
    and EfficientNet-family layouts), so a change inside stage s is measured from s on."""
    if hasattr(model, "layer1"):
        stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
        body = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    else:
        stem = nn.Sequential(model.conv_stem, model.bn1)
        body = [b for stage in model.blocks for b in stage] + [nn.Sequential(model.conv_head, model.bn2)]
    chain = [stem, *body, model.forward_head]
    owner = {}
    for index, part in enumerate(chain[:-1]):
        for m in part.modules():
            owner[m] = index
    for m in model.modules():
        owner.setdefault(m, len(chain) - 1)
    return chain, owner


class LossMeter:
    """Float64 copy of a model with each stage's input cached for a fixed set of examples."""

    def __init__(self, model: nn.Module, sets: Dict[str, tuple]):
        self.model = copy.deepcopy(model).double().eval()
        self.chain, self.owner = stages(self.model)
        self.names = dict(self.model.named_modules())
        self.cache = {}
        with torch.no_grad():
            for key, (x, y) in sets.items():
                inputs, h = [], x.double()
                for stage in self.chain:
                    inputs.append(h)
                    h = stage(h)
                torch.testing.assert_close(h, self.model(x.double()))
                self.cache[key] = (inputs, y, h)
        self.base = {key: F.cross_entropy(c[2], c[1]).item() for key, c in self.cache.items()}

    @torch.no_grad()
    def logits(self, deltas: Dict[str, torch.Tensor], key: str, scale: float = 1.0) -> torch.Tensor:
        """Logits with every named layer's weight changed by ``scale · Δ``."""
        layers = [(self.names[n], d.double().reshape(self.names[n].weight.shape)) for n, d in deltas.items()]
        start = min(self.owner[m] for m, _ in layers)
        saved = [m.weight.clone() for m, _ in layers]
        try:
            for m, d in layers:
                m.weight.add_(scale * d)
            inputs, _, _ = self.cache[key]
            h = inputs[start]
            for stage in self.chain[start:]:
                h = stage(h)
            return h
        finally:
            for (m, _), w in zip(layers, saved):
                m.weight.copy_(w)

    def measure(self, deltas, exact: bool) -> Dict[str, float]:
        out = {k: F.cross_entropy(self.logits(deltas, k), self.cache[k][1]).item() - self.base[k]
               for k in self.cache}
        if exact:
            _, y, logits = self.cache["stat"]
            plus, minus = self.logits(deltas, "stat", STEP), self.logits(deltas, "stat", -STEP)
            first = (F.cross_entropy(plus, y).item() - F.cross_entropy(minus, y).item()) / (2 * STEP)
            change = (plus - minus) / (2 * STEP)
            p = torch.softmax(logits, dim=-1)
            gauss_newton = 0.5 * ((p * change ** 2).sum(-1) - (p * change).sum(-1) ** 2).mean().item()
            out["exact"] = first + gauss_newton
        return out


# -- predictions: the library's importances on Torch-Pruning groups -------------------------------
def with_mean_gradient(model: nn.Module, batches) -> nn.Module:
    """``model`` with ``.grad`` = gradient of the mean loss over ``batches`` (for Taylor)."""
    model.zero_grad(set_to_none=True)
    count = sum(len(y) for _, y in batches)
    for x, y in batches:
        (F.cross_entropy(model(x), y, reduction="sum") / count).backward()
    return model


def direction_scores(model, batches, example, names: List[str]) -> Dict[str, Dict[str, torch.Tensor]]:
    """``{layer name: {criterion: damage of every input direction (core input channel)}}``."""
    kfe = copy.deepcopy(model)
    ted.to_kfe(kfe, ted.collect_kfac(kfe, batches, progress=False))
    ekfac = copy.deepcopy(kfe)
    ted.fit_eigen_correction(ekfac, batches, progress=False)
    on_kfe = ted.collect_kfac(kfe, batches, progress=False)
    cores = [blk.core for _, blk in ted.kfe_blocks(kfe)]
    fisher = ted.collect_fisher_diag(kfe, batches, modules=cores, progress=False)
    with_mean_gradient(kfe, batches)
    criteria = {
        "eigendamage": (kfe, ted.EigenDamageImportance(on_kfe, first_order="signed")),
        "eigendamage-positive": (kfe, ted.EigenDamageImportance(on_kfe)),
        "eigendamage-2nd": (kfe, ted.EigenDamageImportance(on_kfe, first_order="off")),
        "eigendamage-ekfac": (ekfac, ted.EigenDamageImportance(on_kfe, first_order="signed")),
        "kron_obd": (kfe, ted.KroneckerOBDImportance(on_kfe, side="consumer", first_order="signed")),
        "fisher_diag": (kfe, ted.FisherDiagImportance(fisher, side="consumer", first_order="signed")),
        "taylor": (kfe, tp.importance.GroupTaylorImportance(normalizer=None, group_reduction="sum")),
    }
    scores = {n: {} for n in names}
    for criterion, (net, imp) in criteria.items():
        DG = tp.DependencyGraph().build_dependency(net, example_inputs=example)
        modules = dict(net.named_modules())
        for n in names:
            core = modules[n].core
            fn = tp.prune_conv_in_channels if isinstance(core, nn.Conv2d) else tp.prune_linear_in_channels
            group = DG.get_pruning_group(core, fn, idxs=list(range(core.weight.shape[1])))
            scores[n][criterion] = imp(group).double()
    return scores


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def channel_groups(model, example, classifier):
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    return DG, list(DG.get_all_groups(ignored_layers=[classifier], root_module_types=[nn.Conv2d, nn.Linear]))


def channel_scores(model, batches, example, classifier) -> Dict[str, Dict[str, torch.Tensor]]:
    stats = ted.collect_kfac(model, batches, progress=False)
    fisher = ted.collect_fisher_diag(model, batches, progress=False)
    criteria = {
        "kron_obd": ted.KroneckerOBDImportance(stats, side="consumer", first_order="signed"),
        "kron_obd-positive": ted.KroneckerOBDImportance(stats, side="consumer"),
        "kron_obd-2nd": ted.KroneckerOBDImportance(stats, side="consumer", first_order="off"),
        "kron_obd-producer": ted.KroneckerOBDImportance(stats, side="producer", first_order="signed"),
        "fisher_diag": ted.FisherDiagImportance(fisher, side="consumer", first_order="signed"),
        "taylor": tp.importance.GroupTaylorImportance(normalizer=None, group_reduction="sum"),
    }
    with_mean_gradient(model, batches)
    _, groups = channel_groups(model, example, dict(model.named_modules())[classifier])
    names = {m: n for n, m in model.named_modules()}
    scores = {names[g[0].dep.layer]: {c: imp(g).double() for c, imp in criteria.items()} for g in groups}
    model.zero_grad(set_to_none=True)
    return scores


def factor_variant_scores(factors, patch_factors, weight, q, lam) -> Dict[str, float]:
    """Damage of removing direction ``q`` (eigenvalue ``lam`` of ``A``) under the tap / coverage /
    patch models of the module docstring, first-order term included."""
    w3 = weight.reshape(weight.shape[0], weight.shape[1], -1)
    K = w3.shape[-1]
    A = factors.input_factor.double()
    blocks = patch_factors.input_factor.double().view(w3.shape[1], K, w3.shape[1], K).permute(1, 3, 0, 2)
    taps = torch.einsum("klcc->kl", blocks) / torch.trace(A)
    wq = torch.einsum("oik,i->ok", w3, q)
    quad = wq.T @ factors.grad_factor.double() @ wq                   # (W_k q)ᵀ S (W_k' q)
    first = -(torch.einsum("oik,i->ok", factors.mean_grad[0].double(), q) * wq).sum().item()
    return {"tap": 0.5 * lam * (taps * quad).sum().item() + first,
            "coverage": 0.5 * lam * (taps.diagonal() * quad.diagonal()).sum().item() + first,
            "patch": 0.5 * (torch.einsum("klab,a,b->kl", blocks, q, q) * quad).sum().item() + first}


def shrink_probe(key: str, layers: List[str], args) -> None:
    """The ``--shrink`` table of the module docstring."""
    data = digits_data(args.stat_examples)
    stat, batches = data.stat, data.batches
    model = trained_model(key, data)
    meter = LossMeter(model, {"stat": stat})
    torch.manual_seed(args.seed)
    stats = ted.collect_kfac(model, batches, progress=False)
    modules = dict(model.named_modules())
    names = prunable_layers(model)
    steps = (1.0, 0.3, 0.1, 0.03)
    print(f"\n== {key}: measured / local model and measured / K-FAC prediction at ε = {steps} ==")
    for n in layers:
        f = stats[modules[n]]
        lam_a, q_a, _, _ = f.eigen()
        w3 = modules[n].weight.detach().double().reshape(*modules[n].weight.shape[:2], -1)
        for j in sample((lam_a > 1e-6 * lam_a.max()).nonzero().squeeze(1), args.samples,
                        args.seed + names.index(n)):
            q = q_a[:, j].double()
            delta = -torch.einsum("oik,i,j->ojk", w3, q, q)
            wq = torch.einsum("oik,i->ok", w3, q)
            first = (f.mean_grad[0].double() * delta).sum().item()
            quad = 0.5 * lam_a[j].item() * torch.einsum("ok,op,pk->", wq, f.grad_factor.double(), wq).item()
            cells = []
            for eps in steps:
                m = meter.measure({n: eps * delta}, exact=True)
                cells.append(f"{m['stat'] / m['exact']:>7.3g} {m['stat'] / (eps * first + eps ** 2 * quad):>7.3g}")
            print(f"   {n:<24} j={j:<4} first={first:>9.2e} quad={quad:>9.2e} | " + " | ".join(cells), flush=True)


def prunable_layers(model: nn.Module) -> List[str]:
    """Every Conv2d / Linear but the classifier and depthwise convs (the layers of the direction rows)."""
    classifier = model.get_classifier()
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            and m is not classifier and not is_depthwise(m)]


# -- the run --------------------------------------------------------------------------------------
def sample(candidates: torch.Tensor, k: int, seed: int) -> List[int]:
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    return candidates[order[:k]].tolist()


def run_model(key: str, args) -> Dict[str, list]:
    data = digits_data(args.stat_examples)
    stat, held_out, batches = data.stat, data.held_out, data.batches
    model = trained_model(key, data)
    classifier = next(n for n, m in model.named_modules() if m is model.get_classifier())
    example = stat[0][:1]
    meter = LossMeter(model, {"stat": stat, "held-out": held_out})
    torch.manual_seed(args.seed)
    stats = ted.collect_kfac(model, batches, progress=False)
    modules = dict(model.named_modules())
    names = prunable_layers(model)
    patch = ted.collect_kfac(model, batches, factor_mode="patch", progress=False) if args.factor_variants else None
    torch.manual_seed(args.seed)
    dir_scores = direction_scores(model, batches, example, names)
    rows = {"directions": [], "channels": []}
    for index, n in enumerate(names):
        lam_a, q_a, _, _ = stats[modules[n]].eigen()
        weight = modules[n].weight.detach().double()
        w3 = weight.reshape(weight.shape[0], weight.shape[1], -1)
        for j in sample((lam_a > 1e-6 * lam_a.max()).nonzero().squeeze(1), args.samples, args.seed + index):
            q = q_a[:, j]
            delta = -torch.einsum("oik,i,j->ojk", w3, q, q)
            variants = (factor_variant_scores(stats[modules[n]], patch[modules[n]], weight, q, lam_a[j].item())
                        if patch is not None else {})
            rows["directions"].append(dict(layer=n, **meter.measure({n: delta}, args.exact), **variants,
                                           **{c: s[j].item() for c, s in dir_scores[n].items()}))
    torch.manual_seed(args.seed)
    ch_scores = channel_scores(model, batches, example, classifier)
    DG, groups = channel_groups(model, example, modules[classifier])
    for index, group in enumerate(groups):
        root = next(n for n, m in modules.items() if m is group[0].dep.layer)
        for p in sample(torch.arange(len(group[0].idxs)), args.samples, args.seed + 1000 + index):
            channel = group[0].root_idxs[p]
            deltas = {}
            for item in group:
                m = item.dep.layer
                if (isinstance(m, (nn.Conv2d, nn.Linear)) and not is_depthwise(m)
                        and DG.is_in_channel_pruning_fn(item.dep.pruning_fn)):
                    for i, r in zip(item.idxs, item.root_idxs):
                        if r == channel:
                            delta = torch.zeros_like(m.weight, dtype=torch.float64)
                            delta[:, i] = -m.weight.detach()[:, i].double()
                            deltas[next(k for k, v in modules.items() if v is m)] = delta
            rows["channels"].append(dict(layer=root, **meter.measure(deltas, args.exact),
                                         **{c: s[p].item() for c, s in ch_scores[root].items()}))
    return rows


def spearman(a, b) -> float:
    return float(spearmanr(a, b).correlation) if len(a) > 2 else float("nan")


def median_ratio(measured, predicted) -> float:
    """Median of measured/predicted over the removals that change anything (dead channels, whose
    measured and predicted damage are both exactly 0, are left out)."""
    measured, predicted = np.asarray(measured), np.asarray(predicted)
    live = (measured != 0) | (predicted != 0)
    return float(np.median(measured[live] / predicted[live])) if live.any() else float("nan")


def report(key: str, rows: Dict[str, list], args) -> None:
    print(f"\n== {key}: pooled Spearman ρ (predicted vs measured loss increase) ==")
    print(f"{'criterion':<18} {'directions stat':>15} {'held-out':>9} {'layers in [0.5,2]':>17} |"
          f" {'channels stat':>13} {'held-out':>9}")
    extra = (["exact"] if args.exact else []) + (FACTOR_VARIANTS if args.factor_variants else [])
    for c in dict.fromkeys(DIRECTION_CRITERIA + CHANNEL_CRITERIA + extra):
        cells = []
        for kind in ("directions", "channels"):
            r = rows[kind]
            if not r or c not in r[0]:
                cells.append(None)
                continue
            layers = list(dict.fromkeys(x["layer"] for x in r))
            ok = sum(0.5 <= median_ratio([x["stat"] for x in r if x["layer"] == n],
                                         [x[c] for x in r if x["layer"] == n]) <= 2 for n in layers)
            cells.append((spearman([x[c] for x in r], [x["stat"] for x in r]),
                          spearman([x[c] for x in r], [x["held-out"] for x in r]), f"{ok}/{len(layers)}"))
        d, ch = cells
        left = f"{d[0]:>15.3f} {d[1]:>9.3f} {d[2]:>17}" if d else f"{'':>15} {'':>9} {'':>17}"
        right = f"{ch[0]:>13.3f} {ch[1]:>9.3f}" if ch else ""
        print(f"{c:<18} {left} | {right}")
    for kind, shown in (("directions", ["eigendamage", "eigendamage-2nd"]),
                        ("channels", ["kron_obd", "kron_obd-2nd", "fisher_diag"])):
        shown = shown + (["exact"] if args.exact else [])
        print(f"-- {kind}, per layer: median measured/predicted (stat) and Spearman ρ of " + ", ".join(shown))
        r = rows[kind]
        for n in dict.fromkeys(x["layer"] for x in r):
            sub = [x for x in r if x["layer"] == n]
            meas = [x["stat"] for x in sub]
            cells = "  ".join(f"{median_ratio(meas, [x[c] for x in sub]):>9.3g} {spearman([x[c] for x in sub], meas):>6.2f}"
                              for c in shown)
            print(f"   {n:<28} n={len(sub):<3} {cells}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--samples", type=int, default=6, help="removals measured per layer / group")
    p.add_argument("--stat-examples", type=int, default=512, help="training images for the statistics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exact", action="store_true", help="also the exact first+Gauss-Newton prediction")
    p.add_argument("--factor-variants", action="store_true",
                   help="also the tap / coverage / patch Kronecker models for eigen-directions")
    p.add_argument("--quick", action="store_true", help="resnet18-wd, 3 samples, 256 examples")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save", metavar="FILE", help="also write every measured removal as JSON")
    p.add_argument("--shrink", nargs="+", metavar="LAYER",
                   help="only the ε-scaling probe for these layers of the first model")
    args = p.parse_args()
    if args.quick:
        args.models, args.samples, args.stat_examples = ["resnet18-wd"], 3, 256
    torch.set_num_threads(args.threads)
    print(f"damage fidelity: {args.samples} removals per layer, {args.stat_examples} statistics "
          f"examples, seed {args.seed}, torch {torch.__version__}")
    if args.shrink:
        return shrink_probe(args.models[0], args.shrink, args)
    results = {}
    for key in args.models:
        start = time.time()
        results[key] = run_model(key, args)
        report(key, results[key], args)
        print(f"   ({time.time() - start:.0f} s)")
    if args.save:
        with open(args.save, "w") as fh:
            json.dump(results, fh)


if __name__ == "__main__":
    main()
