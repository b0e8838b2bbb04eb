"""Models and data that fail on purpose, for the tests of prune()'s error handling."""
import torch
import torch.nn as nn


class Squash(nn.Module):
    """Reshapes to a hard-coded channel count: breaks once its input channels are pruned."""

    def forward(self, x):
        return x.reshape(x.shape[0], 8, -1).mean(-1)


class HardCoded(nn.Module):
    def __init__(self, in_channels=3, classes=4):
        super().__init__()
        self.a = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.squash = Squash()
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.squash(torch.relu(self.b(torch.relu(self.a(x))))))


class FailingData:
    """Batches for the first statistics pass; raises ``error`` during the second."""

    def __init__(self, data, error: BaseException):
        self.data, self.error, self.passes = data, error, 0

    def __iter__(self):
        self.passes += 1
        for i, batch in enumerate(self.data):
            if self.passes == 2 and i == 1:
                raise self.error
            yield batch
