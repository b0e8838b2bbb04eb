"""Which members of a coupled channel group predict the real loss change: consumers or producers?

A small CNN with a residual block is trained briefly on scikit-learn's 8×8 digits. For every
channel of every Torch-Pruning group (residual stream included) the channel is REMOVED with
Torch-Pruning on a copy of the model and the increase of the training loss is measured. The
Kron-OBD group damage (docs/method.md §8, §9) is computed with ``side="consumer"`` (input-side damage of
the layers reading the channel) and ``side="producer"`` (output-side damage of the layers
writing it); the script prints the Spearman rank correlation of each with the measured
increase, pooled over all channels (what global pruning ranks) and averaged within groups.

    python benchmarks/damage_prediction.py [--steps 30 100] [--seeds 0 1 2]
"""
import argparse
import copy

import numpy as np
import torch.nn as nn
import torch_pruning as tp
from scipy.stats import spearmanr

from tp_eigendamage import collect_kfac
from tp_eigendamage.importance import KroneckerOBDImportance

from tp_eigendamage.testing import mean_loss, trained_digits_net


def measured_increase(model, root_name, pruning_fn, channel, batches, base):
    """Loss increase after removing ``channel`` of the group rooted at ``root_name``."""
    pruned = copy.deepcopy(model)
    DG = tp.DependencyGraph().build_dependency(pruned, example_inputs=batches[0][0][:1])
    DG.get_pruning_group(dict(pruned.named_modules())[root_name], pruning_fn, [channel]).prune()
    return mean_loss(pruned, batches) - base


def run(steps, seed):
    model, batches = trained_digits_net(steps, seed, n=512)
    base = mean_loss(model, batches)
    stats = collect_kfac(model, batches, progress=False)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=batches[0][0][:1])
    names = {m: n for n, m in model.named_modules()}
    sides = {side: KroneckerOBDImportance(stats, side=side) for side in ("consumer", "producer")}
    pooled = {"measured": [], "consumer": [], "producer": []}
    within = {"consumer": [], "producer": []}
    for group in DG.get_all_groups(ignored_layers=[model.fc], root_module_types=[nn.Conv2d, nn.Linear]):
        root = group[0].dep
        measured = [measured_increase(model, names[root.layer], root.pruning_fn, c, batches, base)
                    for c in group[0].idxs]
        pooled["measured"] += measured
        for side, imp in sides.items():
            predicted = imp(group).tolist()
            pooled[side] += predicted
            within[side].append(spearmanr(predicted, measured).correlation)
    return base, {side: (spearmanr(pooled[side], pooled["measured"]).correlation,
                         float(np.mean(within[side]))) for side in within}, len(pooled["measured"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 100], help="training steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    print("Spearman ρ (predicted Kron-OBD group damage vs measured loss increase of removing the "
          "channel)")
    print(f"{'steps':>5} {'seed':>4} {'loss':>7} {'channels':>8} | {'consumer pooled':>15} "
          f"{'producer pooled':>15} | {'consumer in-group':>17} {'producer in-group':>17}")
    for steps in args.steps:
        for seed in args.seeds:
            base, rho, n = run(steps, seed)
            print(f"{steps:>5} {seed:>4} {base:>7.4f} {n:>8} | {rho['consumer'][0]:>15.3f} "
                  f"{rho['producer'][0]:>15.3f} | {rho['consumer'][1]:>17.3f} {rho['producer'][1]:>17.3f}")


if __name__ == "__main__":
    main()
