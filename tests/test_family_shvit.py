"""SHViT (timm shvit): partial SE. SE on the FFN output of the blocks built without a token mixer and of the
downsamples' conv/FFN units, at the family's own width; the PatchMerging downsamples keep their own SE; the
attention blocks get none (see recipes/shvit.toml)."""

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
from timm.models.shvit import FFN, SHSA, BasicBlock, PatchMerging, Residual
from torch import nn

import se_inject


def test_attention_free_blocks_take_se_and_downsamples_keep_their_own():
    with pytest.raises(se_inject.NoSitesError, match="partial SE"):
        se_inject.inject("timm:shvit_s1", device="meta", seed=0)
    model, report = se_inject.inject("timm:shvit_s1", se_inject.Settings(fill=True), device="meta", seed=0)
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, BasicBlock)]
    conv_blocks = [(p, m.ffn.m) for p, m in blocks if isinstance(m.mixer, nn.Identity)]
    assert conv_blocks and any(isinstance(getattr(m.mixer, "m", None), SHSA) for _, m in blocks)  # both kinds
    downsample_ffns = [(p, m.m) for p, m in model.named_modules()
                       if isinstance(m, Residual) and isinstance(m.m, FFN) and ".downsample." in p]
    order = {p: i for i, (p, _) in enumerate(model.named_modules())}
    expected = sorted(conv_blocks + downsample_ffns, key=lambda pm: order[pm[0]])
    assert downsample_ffns and report.plan.recipes == ("shvit",)
    assert [s.path for s in report.plan.sites] == [p for p, _ in expected]
    assert [s.channels for s in report.plan.sites] == [ffn.pw2.c.out_channels for _, ffn in expected]
    assert [(s.anchor, s.position) for s in report.plan.sites] == [
        ("ffn.m" if isinstance(model.get_submodule(p), BasicBlock) else "m", "after") for p, _ in expected]
    merging = [p for p, m in model.named_modules() if isinstance(m, PatchMerging)]
    assert [s.path for s in report.skipped if s.already_attention] == merging and merging
    # the family's own SE width: timm SEModule(C, rd_ratio=0.25), as in PatchMerging
    assert_sites_shaped_like(model, report, lambda c: SEModule(c, rd_ratio=0.25, device="meta"))


def test_identity_init_reproduces_the_base_model_and_se_takes_the_ffn_output():
    injected, report = assert_identity_reproduces(real_model("shvit_s1"), 64, fill=True)
    block = injected.get_submodule(report.plan.sites[0].path)
    seen = {}
    hooks = [block.se.register_forward_hook(lambda _m, args, _out: seen.update(se=args[0])),
             block.ffn.m.register_forward_hook(lambda _m, _args, out: seen.update(ffn=out))]
    with torch.no_grad():
        block(torch.randn(1, block.ffn.m.pw1.c.in_channels, 4, 4))
    for hook in hooks:
        hook.remove()
    assert seen["se"] is seen["ffn"]  # before the FFN residual's addition


@pytest.mark.slow
def test_scripts_and_exports():
    assert_scripts_and_exports(real_model("shvit_s1"), 64, fill=True)
