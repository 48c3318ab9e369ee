"""EdgeNeXt (timm edgenext.ConvBlock): SE at the end of the residual branch, on the first NCHW map after the MLP
(after the permute back, which follows EdgeNeXt's channels-last layer scale); the transposed-attention blocks take
token SE after their channels-last MLP (recipes/transformer.toml, docs/transformers.md)."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_identity_reproduces, assert_scripts_and_exports, real_model
from timm.models.edgenext import ConvBlock, SplitTransposeBlock

import se_inject


def test_every_conv_block_takes_se_at_the_end_of_its_branch():
    model, report = se_inject.inject("timm:edgenext_xx_small", device="meta", seed=0)
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, ConvBlock)]
    assert report.plan.recipes == ("edgenext", "transformer")
    sites = [s for s in report.plan.sites if s.recipe == "edgenext"]
    assert [s.path for s in sites] == [p for p, _ in blocks] and blocks
    assert [s.channels for s in sites] == [m.mlp.fc2.out_features for _, m in blocks]
    assert all(s.pattern == "residual" and s.anchor.startswith("%permute") for s in sites)
    attention = [p for p, m in model.named_modules() if isinstance(m, SplitTransposeBlock)]
    assert [s.path for s in report.plan.sites if s.recipe == "transformer"] == attention and attention


def test_identity_init_reproduces_the_base_model_and_se_takes_the_branch_in_nchw():
    model = real_model("edgenext_xx_small")
    injected, report = assert_identity_reproduces(model, 64)
    block, base = injected.get_submodule(report.plan.sites[0].path), model.get_submodule(report.plan.sites[0].path)
    seen = {}
    hook = block.se.register_forward_hook(lambda _m, args, _out: seen.update(x=args[0]))
    with torch.no_grad():
        h = torch.randn(1, base.conv_dw.in_channels, 8, 8)
        block(h)
        expected = (base.gamma * base.mlp(base.norm(base.conv_dw(h).permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
    hook.remove()
    assert torch.equal(seen["x"], expected)


def test_layer_scale_before_the_permute_is_walked_over_only_when_constant():
    """The residual pattern passes a channels-last `gamma * mlp(x)` (gamma a parameter) but not a product of two
    computed maps, which is no layer scale."""
    from torch import nn

    from se_inject.engine.patterns import match_block

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.fc = nn.Linear(8, 8)
            self.gate = nn.Linear(8, 8)

        def forward(self, x):
            y = self.conv_dw(x).permute(0, 2, 3, 1)
            return x + (self.gate(y) * self.fc(y)).permute(0, 3, 1, 2)

    assert match_block(Gated(), "residual") is None
    assert match_block(real_model("edgenext_xx_small").stages[0].blocks[0], "residual").anchor.startswith("%permute")


@pytest.mark.slow
def test_scripts_and_exports():
    assert_scripts_and_exports(real_model("edgenext_xx_small"), 64)
