"""Training, evaluation and the fine-tuning callback."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from tp_eigendamage import data, training


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def digits16():
    train, test = data.digits_datasets(image_size=16, channels=1, seed=0)
    return train, test, data.make_loaders(train, test, batch_size=32, seed=0)


def test_small_cnn_learns_the_digits(digits16):
    _, test, (train_loader, test_loader) = digits16
    torch.manual_seed(0)
    model = small_cnn()
    history = training.train(model, train_loader, epochs=3, lr=0.1, progress=False, seed=0)
    assert len(history) == 3 and history[-1] < history[0]
    result = training.evaluate(model, test_loader)
    assert result["examples"] == len(test)
    assert result["accuracy"] > 0.6  # chance is 0.1


def test_evaluate_matches_manual_computation_and_keeps_modes(digits16):
    _, test, (_, test_loader) = digits16
    torch.manual_seed(1)
    model = small_cnn()
    model.train()
    model[1].eval()  # mixed modes must survive
    before = copy.deepcopy(model.state_dict())
    result = training.evaluate(model, test_loader)
    assert model.training and not model[1].training and model[5].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # eval mode: BatchNorm statistics untouched

    inputs = torch.stack([test[k][0] for k in range(len(test))])
    labels = torch.tensor([test[k][1] for k in range(len(test))])
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        logits = reference(inputs).double()
    log_z = logits.max(1).values + (logits - logits.max(1, keepdim=True).values).exp().sum(1).log()
    manual_loss = (log_z - logits[torch.arange(len(labels)), labels]).mean().item()
    manual_accuracy = sum(int(row.argmax() == y) for row, y in zip(logits, labels)) / len(labels)
    assert result["accuracy"] == pytest.approx(manual_accuracy, abs=1e-12)
    assert result["loss"] == pytest.approx(manual_loss, rel=1e-5)


def test_train_restores_modes_and_is_deterministic(digits16):
    _, _, (train_loader, _) = digits16

    def run(seed):
        torch.manual_seed(0)
        model = small_cnn().eval()
        training.train(model, train_loader, epochs=1, lr=0.05, progress=False, max_batches=5, seed=seed)
        assert not any(m.training for m in model.modules())
        return model.state_dict()

    a, b, c = run(0), run(0), run(1)  # the shared loader was iterated in between
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])


def _lr_trace_weight(schedule, steps):
    """A 1-parameter model whose loss gradient is exactly 1 per step: w_T = w_0 − Σ_t η_t."""
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    loader = DataLoader(TensorDataset(torch.ones(steps, 1), torch.zeros(steps)), batch_size=1)
    training.train(model, loader, epochs=1, lr=0.5, momentum=0.0, weight_decay=0.0, schedule=schedule,
                   progress=False, loss_fn=lambda out, target: out.sum())
    return model.weight.item()


def test_learning_rate_schedules():
    steps = 7
    cosine = sum(0.5 * 0.5 * (1 + math.cos(math.pi * t / steps)) for t in range(steps))
    assert _lr_trace_weight("cosine", steps) == pytest.approx(-cosine, rel=1e-6)
    assert _lr_trace_weight("constant", steps) == pytest.approx(-0.5 * steps, rel=1e-6)


def test_finetune_callback_is_reproducible_and_changes_weights(digits16):
    _, _, (train_loader, _) = digits16
    torch.manual_seed(0)
    start = small_cnn()
    finetune = training.finetune_callback(train_loader, epochs=1, lr=0.05, seed=3, progress=False,
                                          max_batches=3)
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    finetune(a, 1)
    finetune(b, 1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, start[0].weight)


def test_bad_arguments(digits16):
    _, _, (train_loader, _) = digits16
    model = small_cnn()
    with pytest.raises(ValueError, match="schedule"):
        training.train(model, train_loader, schedule="step", progress=False)
    with pytest.raises(ValueError, match="epochs"):
        training.train(model, train_loader, epochs=-1, progress=False)
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 16, 16), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="empty"):
        training.evaluate(model, empty)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        training.train(model, train_loader, lr=1e30, progress=False, max_batches=3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # rolled back
