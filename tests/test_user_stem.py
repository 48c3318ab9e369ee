"""Pinned default: in a model of your own, the stem takes SE exactly when it is written as a plain `nn.Sequential`
of at least two conv(-norm)-activation units (the `structural` recipe's `conv-chain` pattern, as SE-VGG-16's first
convolutions); a one-conv stem, or convolutions called inline in the model's forward, take none. `--exclude` leaves a
stem out (docs/recipes.md, "Your own models")."""

from __future__ import annotations

import torch
from torch import nn

import se_inject


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


def unit(i: int, o: int) -> list[nn.Module]:
    return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]


class Net(nn.Module):
    def __init__(self, stem: nn.Module):
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(Block(32), Block(32))

    def forward(self, x):
        return self.blocks(self.stem(x))


class Inline(nn.Module):
    """The same two stem units, called one by one in the model's forward."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.blocks = nn.Sequential(Block(32), Block(32))

    def forward(self, x):
        return self.blocks(torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))))


def sites(model: nn.Module, **options) -> list[tuple[str, str]]:
    _, report = se_inject.inject(model, input_size="32", device="meta", seed=0, **options)
    return [(s.path, s.pattern) for s in report.plan.sites]


BLOCKS = [("blocks.0", "residual"), ("blocks.1", "residual")]


def test_a_sequential_stem_of_conv_units_takes_se_after_each_activation():
    stem = nn.Sequential(*unit(3, 16), *unit(16, 32))
    assert sites(Net(stem)) == [("stem.2", "conv-chain"), ("stem.5", "conv-chain"), *BLOCKS]


def test_exclude_leaves_the_stem_out():
    stem = nn.Sequential(*unit(3, 16), *unit(16, 32))
    assert sites(Net(stem), exclude=["stem.*"]) == BLOCKS


def test_a_one_conv_stem_or_an_inline_stem_takes_none():
    assert sites(Net(nn.Sequential(*unit(3, 32)))) == BLOCKS
    assert sites(Net(nn.Conv2d(3, 32, 3, padding=1))) == BLOCKS
    assert sites(Inline()) == BLOCKS
