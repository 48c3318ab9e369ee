"""EfficientViM (timm efficientvim): partial SE. SE on each block's FFN output at the family's own width; the
PatchMerging downsamples keep their own SE (see recipes/efficientvim.toml)."""

from __future__ import annotations

import pytest
import torch
from family_checks import (
    assert_identity_reproduces,
    assert_scripts_and_exports,
    assert_sites_shaped_like,
    real_model,
)
from timm.layers import SEModule
from timm.models.efficientvim import EfficientViMBlock, PatchMerging

import se_inject


def test_blocks_take_se_on_the_ffn_and_downsamples_keep_their_own():
    with pytest.raises(se_inject.NoSitesError, match="partial SE"):
        se_inject.inject("timm:efficientvim_m1", device="meta", seed=0)
    model, report = se_inject.inject("timm:efficientvim_m1", se_inject.Settings(fill=True), device="meta", seed=0)
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, EfficientViMBlock)]
    assert report.plan.recipes == ("efficientvim",)
    assert [s.path for s in report.plan.sites] == [p for p, _ in blocks] and blocks
    assert [s.channels for s in report.plan.sites] == [m.ffn.fc2.conv.out_channels for _, m in blocks]
    assert all((s.anchor, s.position) == ("ffn", "after") for s in report.plan.sites)
    merging = [p for p, m in model.named_modules() if isinstance(m, PatchMerging)]
    assert [s.path for s in report.skipped if s.already_attention] == merging and merging
    # the family's own SE width: timm SEModule(C, rd_ratio=0.25), as in PatchMerging
    assert_sites_shaped_like(model, report, lambda c: SEModule(c, rd_ratio=0.25, device="meta"))


def test_identity_init_reproduces_the_base_model_and_se_takes_the_ffn_output():
    injected, report = assert_identity_reproduces(real_model("efficientvim_m1"), 64, fill=True)
    block = injected.get_submodule(report.plan.sites[0].path)
    seen = {}
    hooks = [block.se.register_forward_hook(lambda _m, args, _out: seen.update(se=args[0])),
             block.ffn.register_forward_hook(lambda _m, _args, out: seen.update(ffn=out))]
    with torch.no_grad():
        block(torch.randn(1, block.ffn.fc1.conv.in_channels, 4, 4))
    for hook in hooks:
        hook.remove()
    assert seen["se"] is seen["ffn"]  # before the gate alpha[3] and the addition


@pytest.mark.slow
def test_scripts_and_exports():
    assert_scripts_and_exports(real_model("efficientvim_m1"), 64, fill=True)
