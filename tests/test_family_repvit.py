"""RepViT: SE in every other RepViTBlock by design (partial SE); --fill gives the others RepViT's own SE (after the
depthwise token mixer, make_divisible(C / 4, 8)) under the same key names."""

from __future__ import annotations

import pytest
import timm
from family_checks import assert_identity_reproduces, assert_scripts_and_exports, real_model
from timm.layers import SEModule
from timm.models.repvit import RepViTBlock
from torch import nn

import se_inject
from se_inject import NoSitesError

SMALL = {"embed_dim": (16, 32, 48, 64), "depth": (2, 2, 3, 2)}  # a real RepViT, narrower and shallower


def _own_width(channels: int) -> int:
    """RepViT's rule, from timm's own SE layer as RepViTBlock builds it."""
    return SEModule(channels, 0.25, device="meta").fc1.out_channels


def test_partial_se_refused_by_default_and_filled_with_repvits_own_se():
    model = timm.create_model("repvit_m0_9", device="meta")
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, RepViTBlock)]
    has = [p for p, m in blocks if not isinstance(m.se, nn.Identity)]
    lacks = [(p, m.token_mixer.conv.c.out_channels) for p, m in blocks if isinstance(m.se, nn.Identity)]
    assert has and lacks
    with pytest.raises(NoSitesError) as info:
        se_inject.inject("repvit_m0_9", device="meta", seed=0)
    assert info.value.reason == "partial-attention"
    injected, report = se_inject.inject("repvit_m0_9", se_inject.Settings(fill=True), device="meta", seed=0)
    assert report.plan.recipes == ("repvit",)
    assert report.to_dict()["already_attention"] == has
    assert [(s.path, s.slot, s.anchor, s.channels, s.squeeze_channels) for s in report.plan.sites] == [
        (p, "se", "token_mixer", c, _own_width(c)) for p, c in lacks]
    # filled and native SE read alike: `se.fc1` / `se.fc2` with the shapes timm's SEModule would have
    for path, channels in lacks:
        native = SEModule(channels, 0.25, device="meta").state_dict()
        filled = injected.get_submodule(f"{path}.se").state_dict()
        assert {k: v.shape for k, v in filled.items()} == {k: v.shape for k, v in native.items()}


def test_identity_init_reproduces_the_base_model():
    assert_identity_reproduces(real_model("repvit_m0_9", **SMALL), 64, fill=True)


@pytest.mark.slow
def test_script_and_export():
    assert_scripts_and_exports(real_model("repvit_m0_9", **SMALL), 64, fill=True)
