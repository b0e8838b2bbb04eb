"""EigenDamage with Torch-Pruning on a timm ResNet trained briefly on the embedded digits.

    python examples/eigendamage_digits.py [--epochs 3] [--ratio 0.5]

The paper's pipeline with Torch-Pruning's own pruner: K-FAC statistics → KFE rewrite →
global ranking of eigen-directions and residual channels in loss units → fold the blocks
whose bottleneck does not pay → (optional) fine-tune. Prints parameters, FLOPs and test
accuracy before and after.
"""
import argparse

import timm
import torch
import torch_pruning as tp

import tp_eigendamage as ted
from tp_eigendamage.data import digits_datasets, make_loaders
from tp_eigendamage.training import evaluate, train


def describe(tag, model, example, test_loader):
    flops, params = tp.utils.count_ops_and_params(model, example)
    result = evaluate(model, test_loader)
    print(f"{tag:<22} params {params / 1e6:6.3f}M  FLOPs {flops / 1e6:7.2f}M  "
          f"test acc {result['accuracy']:.2%}  test loss {result['loss']:.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.5, help="Torch-Pruning pruning_ratio")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    train_set, test_set = digits_datasets(image_size=32)
    train_loader, test_loader = make_loaders(train_set, test_set, batch_size=64, seed=0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    train(model, train_loader, epochs=args.epochs, lr=0.05, seed=0)
    example = torch.randn(1, 3, 32, 32)
    describe("trained", model, example, test_loader)

    stats_data = [batch for _, batch in zip(range(8), train_loader)]
    stats = ted.collect_kfac(model, stats_data)                      # K-FAC factors A, S per layer
    ted.to_kfe(model, stats)                                          # function-preserving rewrite
    describe("KFE (not pruned)", model, example, test_loader)

    importance = ted.EigenDamageImportance(stats)                     # damages in loss units
    pruner = tp.pruner.BasePruner(model, example, importance=importance,
                                  pruning_ratio=args.ratio, global_pruning=True,
                                  max_pruning_ratio=0.95, ignored_layers=[model.get_classifier()])
    pruner.step()
    ted.fold_kfe(model)                                               # unprofitable blocks → dense
    describe("pruned (one-shot)", model, example, test_loader)

    train(model, train_loader, epochs=args.finetune_epochs, lr=0.01, seed=1)
    describe("fine-tuned", model, example, test_loader)
    blocks = ted.kfe_blocks(model)
    print(f"{len(blocks)} KFE blocks kept (the rest folded back into dense layers)")


if __name__ == "__main__":
    main()
