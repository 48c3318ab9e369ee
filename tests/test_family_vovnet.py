"""VoVNet / VoVNetV2 (ese_, eca_): SE in the OSA block's `attn` slot after the concat aggregation; timm's ese/eca
models give the last block of each stage attention (partial SE, or already SE with one block per stage)."""

from __future__ import annotations

import pytest
import timm
from family_checks import assert_identity_reproduces, assert_scripts_and_exports, real_model
from timm.models.vovnet import OsaBlock

import se_inject
from se_inject import NoSitesError

SMALL = {"stem_chs": [16, 16, 32], "stage_conv_chs": [16, 16, 24, 24], "stage_out_chs": [32, 48, 64, 96]}


def _blocks(name: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Independent count: (path, conv_concat output channels) of the OSA blocks with and without attention."""
    model = timm.create_model(name, device="meta")
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, OsaBlock)]
    has = [(p, m.conv_concat.conv.out_channels) for p, m in blocks if m.attn is not None]
    return has, [(p, m.conv_concat.conv.out_channels) for p, m in blocks if m.attn is None]


def test_vovnet_gets_se_in_every_osa_blocks_attn_slot():
    has, lacks = _blocks("vovnet39a")
    assert not has and lacks
    _, report = se_inject.inject("vovnet39a", device="meta", seed=0)
    assert report.plan.recipes == ("vovnet",)
    assert [(s.path, s.slot, s.channels, s.squeeze_channels) for s in report.plan.sites] == [
        (p, "attn", c, timm.layers.make_divisible(c / 16, 8)) for p, c in lacks]


def test_ese_vovnet_is_partial_se_and_fill_uses_the_same_slot():
    has, lacks = _blocks("ese_vovnet39b")
    assert has and lacks
    with pytest.raises(NoSitesError) as info:
        se_inject.inject("ese_vovnet39b", device="meta", seed=0)
    assert info.value.reason == "partial-attention"
    model, report = se_inject.inject("ese_vovnet39b", se_inject.Settings(fill=True, attn_layer="ese"), device="meta",
                                     seed=0)
    assert report.to_dict()["already_attention"] == [p for p, _ in has]
    assert [(s.path, s.slot, s.channels) for s in report.plan.sites] == [(p, "attn", c) for p, c in lacks]
    # the family's own kind: every block now has eSE with the key names and shapes of timm's EffectiveSEModule
    own = {k: v.shape for k, v in model.state_dict().items() if k.startswith(has[0][0] + ".attn.")}
    filled = {k.replace(lacks[0][0], has[0][0]): v.shape for k, v in model.state_dict().items()
              if k.startswith(lacks[0][0] + ".attn.")}
    assert own and set(own) == set(filled)


def test_one_block_per_stage_ese_vovnet_is_already_se():
    has, lacks = _blocks("ese_vovnet19b_slim_dw")
    assert has and not lacks
    with pytest.raises(NoSitesError) as info:
        se_inject.inject("ese_vovnet19b_slim_dw", device="meta", seed=0)
    assert info.value.reason == "already-attention"


def test_vovnet39a_with_ese_in_each_stages_last_block_has_ese_vovnet39b_keys():
    """No timm twin has vovnet39a's architecture with attention; ese_vovnet39b differs only by its (parameter-free)
    residual additions, so eSE in the attn slot of each stage's last block gives exactly its state_dict layout."""
    last = [p for p, _ in _blocks("ese_vovnet39b")[0]]
    model, _ = se_inject.inject("vovnet39a", se_inject.Settings(attn_layer="ese", include=last), device="meta", seed=0)
    twin = timm.create_model("ese_vovnet39b", device="meta")
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}


@pytest.mark.parametrize(("name", "fill", "attention"), [
    ("ese_vovnet39b", True, "se"), pytest.param("vovnet39a", False, "se", marks=pytest.mark.slow),
    pytest.param("eca_vovnet39b", True, "eca", marks=pytest.mark.slow)])
def test_identity_init_reproduces_the_base_model(name, fill, attention):
    assert_identity_reproduces(real_model(name, **SMALL), 64, fill=fill, attn_layer=attention)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vovnet39a", "ese_vovnet39b"])
def test_script_and_export(name):
    assert_scripts_and_exports(real_model(name, **SMALL), 64, fill=True)
