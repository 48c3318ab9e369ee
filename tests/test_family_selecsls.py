"""SelecSLS family (recipe `selecsls`): SE on each SelecSlsBlock's output, after its aggregation conv (conv6)."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_identity_reproduces
from helpers import randomize_norm_stats
from timm.models.selecsls import SelecSls, SelecSlsBlock
from torch import nn

import se_inject


def _tiny() -> nn.Module:
    """A SelecSLS of timm's own classes: two stages of two blocks (the first of each passes its output on as skip)."""
    features = [(32, 0, 16, 16, True, 2), (16, 16, 16, 24, False, 1), (24, 0, 24, 32, True, 2),
                (32, 32, 24, 32, False, 1)]
    cfg = {"block": SelecSlsBlock, "features": features, "head": [(32, 48, 3, 2), (48, 64, 1, 1)],
           "num_features": 64, "feature_info": []}
    return randomize_norm_stats(SelecSls(cfg, num_classes=10)).eval()


def test_one_se_per_block_on_its_aggregation_output():
    model, report = se_inject.inject("selecsls42b", device="meta", seed=0)
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, SelecSlsBlock)]
    assert report.plan.recipes == ("selecsls",) and len(blocks) == 6
    assert [s.path for s in report.plan.sites] == [f"{p}.conv6.2" for p, _ in blocks]  # conv6's ReLU
    assert [s.channels for s in report.plan.sites] == [m.conv6[0].out_channels for _, m in blocks]
    assert all(len(m.conv6) == 3 for _, m in blocks)  # conv6 keeps its children and numbering
    assert not any(hasattr(m, "se") for m in model.head.modules())  # the head's conv stack gets none


def test_identity_init_reproduces_a_real_selecsls():
    base = _tiny()
    _, report = assert_identity_reproduces(base, 32, train=True)
    assert len(report.plan.sites) == 4


@pytest.mark.slow
def test_selecsls_with_se_exports():
    """timm's SelecSLS does not script (SelectSeq's torch.cat of an unannotated list); torch.export works."""
    injected, _ = se_inject.inject(_tiny(), seed=0, input_size=32)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.export(injected, (x,)).module()(x), injected(x))
