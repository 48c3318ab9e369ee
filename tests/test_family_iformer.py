"""iFormer (timm iformer): SE at the end of each ConvBlock's residual branch; the attention part gets none (see
recipes/iformer.toml)."""

from __future__ import annotations

import pytest
from family_checks import assert_identity_reproduces, assert_scripts_and_exports, real_model
from timm.models.iformer import FFN, ConvBlock, ConvNorm, RepCPE, SHMABlock

import se_inject


def test_every_conv_block_takes_se_at_the_end_of_its_branch():
    model, report = se_inject.inject("timm:iformer_t", device="meta", seed=0)
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, ConvBlock)]
    assert report.plan.recipes == ("iformer",)
    assert [s.path for s in report.plan.sites] == [f"{p}.mixer" for p, _ in blocks] and blocks
    last = [[u for u in m.mixer.module if isinstance(u, ConvNorm)][-1] for _, m in blocks]  # the branch's last conv-BN
    assert [s.channels for s in report.plan.sites] == [u.bn.num_features for u in last]
    assert all((s.pattern, s.anchor, s.position) == ("residual", "module", "after") for s in report.plan.sites)
    # the attention blocks (Residual units too), their FFN and position encoding are in the model but take none
    assert {SHMABlock, FFN, RepCPE} <= {type(m) for m in model.modules()}


@pytest.mark.slow
def test_identity_init_reproduces_the_base_model():
    assert_identity_reproduces(real_model("iformer_t"), 32)


@pytest.mark.slow
def test_scripts_and_exports():
    assert_scripts_and_exports(real_model("iformer_t"), 32)
