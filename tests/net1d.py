"""A small 1-D network (Conv1d residual blocks on an (N, C, L) signal) for the 1-D SE tests, also loaded as
``tests/net1d.py:make`` by the CLI tests."""

from __future__ import annotations

import torch
from torch import nn


class Block1d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(channels)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))


class Net1d(nn.Module):
    """Two input channels, blocks of 32 and 64 channels, five classes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(2, 32, 7, padding=3)
        self.blocks = nn.Sequential(Block1d(32), Block1d(32), nn.Conv1d(32, 64, 1), Block1d(64))
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(-1))


def make() -> nn.Module:
    return Net1d()
