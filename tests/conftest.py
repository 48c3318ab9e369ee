"""Shared fixtures: a seeded RNG for every test and a session-wide injected tiny model. Helpers live in
`helpers.py`."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_norm_stats


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def injected_test_resnet():
    """timm's test_resnet with SE (seed 0, planned at 64x64, non-trivial norm statistics), built once per test
    session: ``(model, report)``. Tests must not modify it (copy it first)."""
    import timm

    import se_inject

    base = randomize_norm_stats(timm.create_model("test_resnet")).eval()
    model, report = se_inject.inject(base, seed=0, input_size=64, inplace=True)
    return model.eval(), report
