"""The fine-tuning path: ``se_inject.new_parameters`` and a warm-up that trains only the inserted modules."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import randomize_norm_stats, state_snapshot
from torch import nn

import se_inject


@pytest.mark.parametrize("attention", ["se", "cbam"])
def test_new_parameters_are_exactly_the_inserted_modules(attention):
    model, report = se_inject.inject("timm:test_resnet", se_inject.Settings(attn_layer=attention), seed=0,
                                     input_size=64)
    new = se_inject.new_parameters(model)
    inserted = [p for s in report.plan.sites for p in model.get_submodule(s.module_path).parameters()]
    assert {id(p) for p in new} == {id(p) for p in inserted} and len(new) == len(inserted)
    assert sum(p.numel() for p in new) == report.to_dict()["params"]["delta"]  # and nothing of the base
    assert se_inject.new_parameters(timm.create_model("test_resnet")) == []


def test_two_steps_with_the_base_frozen_change_only_the_new_parameters():
    base = randomize_norm_stats(timm.create_model("test_resnet"))
    model, _ = se_inject.inject(base, seed=0, input_size=64)
    new = se_inject.new_parameters(model)
    new_ids = {id(p) for p in new}
    for p in model.parameters():
        p.requires_grad_(id(p) in new_ids)
    model.eval()  # frozen base: its norm statistics stay as they are too
    new_names = {name for name, p in model.named_parameters() if id(p) in new_ids}
    before = state_snapshot(model)
    optimizer = torch.optim.SGD(new, lr=0.1, momentum=0.9)
    x, target = torch.randn(4, 3, 64, 64), torch.randint(0, 1000, (4,))
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()
    after = model.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == new_names  # every new parameter moved, nothing else did
    assert all(p.grad is None for p in model.parameters() if id(p) not in new_ids)
