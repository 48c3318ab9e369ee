"""One-off behaviours of single families, beside the table-driven tests of tests/test_family_recipes.py: what a
recipe rule may say (DenseNet's `in_child`, EfficientFormerV2's `when`, NFNet's `slot_gain`), a block that still
takes its other inputs, twins that share weights or keys with timm's own SE models, and saved folders."""

from __future__ import annotations

import pytest
import timm
import torch
from family_checks import real_model
from helpers import randomize_norm_stats
from timm.layers import ScaledStdConv2d
from timm.models.densenet import DenseLayer
from timm.models.mambaout import GatedConvBlock
from timm.models.nfnet import NormFreeBlock
from timm.models.vovnet import OsaBlock
from torch import nn

import se_inject
from se_inject import RecipeFileError, load_recipe_file
from se_inject.engine.recipes import BlockRule
from se_inject.engine.schema import PlanSchemaError, plan_from_data
from se_inject.tools.scan import scan_one

# --- recipe rules -----------------------------------------------------------------------------------------------


def test_in_child_needs_a_child(tmp_path):
    path = tmp_path / "r.toml"
    for place in ('after = "."', 'slot = "se"'):
        path.write_text(f'name = "x"\n[[blocks]]\nclasses = ["a.B"]\n{place}\nin_child = true\n')
        with pytest.raises(RecipeFileError, match=r"blocks\[0\]\.in_child"):
            load_recipe_file(path)


def test_when_names_a_child_module_or_none_by_class():
    rule = BlockRule(("x.Block",), "fc2", "before", when=(("token_mixer", "None"),))
    assert rule.applies_to(nn.Module()) is False  # no such attribute
    with_none, with_attention = nn.Module(), nn.Module()
    with_none.token_mixer = None
    with_attention.token_mixer = nn.MultiheadAttention(8, 2)
    assert rule.applies_to(with_none) and not rule.applies_to(with_attention)
    identity = BlockRule(("x.Block",), "fc2", "before", when=(("mixer", "Identity"), ("depth", 2)))
    block = nn.Module()
    block.mixer, block.depth = nn.Identity(), 2
    assert identity.applies_to(block)
    block.depth = "2"  # a plain attribute must equal the value: no class-name matching for it
    assert not identity.applies_to(block)


@pytest.mark.parametrize(("text", "field"), [
    ('slot_gain = 0', "blocks[0].slot_gain"),
    ('slot_gain = "attn_gain"', "blocks[0].slot_gain"),
    ('slot_gain = nan', "blocks[0].slot_gain"),
])
def test_malformed_slot_gain_names_the_field(tmp_path, text, field):
    path = tmp_path / "r.toml"
    path.write_text(f'name = "x"\n[[blocks]]\nclasses = ["a.B"]\nafter = "conv3"\nslot = "attn_last"\n{text}\n')
    with pytest.raises(RecipeFileError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_recipe_file(path)


def test_slot_gain_needs_a_slot(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('name = "x"\n[[blocks]]\nclasses = ["a.B"]\nafter = "conv3"\nslot_gain = 2.0\n')
    with pytest.raises(RecipeFileError, match="slot_gain"):
        load_recipe_file(path)


def test_layer_scale_before_the_permute_is_walked_over_only_when_constant():
    """The residual pattern passes EdgeNeXt's channels-last `gamma * mlp(x)` (gamma a parameter) but not a product
    of two computed maps, which is no layer scale."""
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


# --- blocks keep their calling conventions and settings ------------------------------------------------------------


def test_a_dense_layer_still_takes_a_tensor_or_a_list():
    base = timm.models.densenet.DenseNet(growth_rate=8, block_config=(2, 2), bn_size=2, num_classes=10)
    injected, _ = se_inject.inject(randomize_norm_stats(base).eval(), seed=0, input_size=32)
    layer = next(m for m in injected.modules() if isinstance(m, DenseLayer))
    x = torch.randn(1, layer.conv1.in_channels, 8, 8)
    with torch.no_grad():
        assert torch.equal(layer(x), layer([x[:, :3], x[:, 3:]]))


def test_mambaout_conv_ratio_sets_the_se_width():
    """mambaout_*_rw convolve 1.25-1.5x the block width: the SE scales what the conv outputs."""
    model = real_model("test_mambaout", conv_ratio=1.5)
    _, report = se_inject.inject(model, seed=0, input_size=32)
    blocks = [m for m in model.modules() if isinstance(m, GatedConvBlock)]
    assert [s.channels for s in report.plan.sites] == [m.conv.out_channels for m in blocks]
    assert all(m.conv.out_channels == 3 * m.fc2.out_features // 2 for m in blocks)


def test_dpn68_and_dpn68b_get_the_same_se():
    """The same network (the "b" form splits the last 1x1 conv in two): the same SE, place and width."""
    _, p = se_inject.inject("dpn68", device="meta", seed=0)
    _, q = se_inject.inject("dpn68b", device="meta", seed=0)
    assert [(s.path, s.anchor, s.channels, s.squeeze_channels) for s in p.plan.sites] == [
        (s.path, s.anchor, s.channels, s.squeeze_channels) for s in q.plan.sites]
    assert p.after.params - p.before.params == q.after.params - q.before.params


# --- NFNet: SE in the attn_last slot, times the block's own attn_gain --------------------------------------------


def _no_attention_nfnet() -> nn.Module:
    """timm's test_nfnet without its SE, with non-trivial conv gains (timm initialises conv3's gain to 0)."""
    model = timm.create_model("test_nfnet", attn_layer="")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ScaledStdConv2d):
                m.gain.copy_(torch.rand(m.gain.shape, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize("init", ["paper", "identity"])
def test_the_nfnet_block_keeps_its_attn_gain_and_the_module_is_timms_se(init):
    """The block still doubles its attention's output (NFNet's convention); the module itself has no gain of its own,
    so it computes what timm's SEModule does with the same weights (paper init: nf_seresnet's block exactly)."""
    model, report = se_inject.inject(_no_attention_nfnet(), se_inject.Settings(init=init), seed=0, input_size=32)
    blocks = [m for m in model.modules() if isinstance(m, NormFreeBlock)]
    assert len(report.plan.sites) == len(blocks) == 4
    for block, site in zip(blocks, report.plan.sites, strict=True):
        assert block.attn_gain == 2.0 and block.attn_last.gain == 1.0
        assert site.attention.host_gain == 2.0
        se = timm.layers.SEModule(site.channels, rd_channels=site.squeeze_channels)
        se.load_state_dict(block.attn_last.state_dict())
        x = torch.randn(2, site.channels, 4, 4)
        with torch.no_grad():
            torch.testing.assert_close(block.attn_last(x.clone()), se(x))
        if init == "identity":
            with torch.no_grad():
                torch.testing.assert_close(block.attn_gain * block.attn_last(x.clone()), x, rtol=0, atol=0)


def test_saved_nfnet_loads_with_its_slot_gain(tmp_path):
    model, report = se_inject.inject(_no_attention_nfnet(), seed=0, input_size=32)
    se_inject.save(model, report, tmp_path / "out")
    assert se_inject.read_plan(tmp_path / "out").sites[0].attention.host_gain == 2.0
    back = se_inject.load(tmp_path / "out", model=timm.create_model("test_nfnet", attn_layer=""))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), model.eval()(x))


@pytest.mark.parametrize("bad", [float("nan"), 0, True, "2"])
def test_a_plans_host_gain_is_validated(bad):
    with torch.device("meta"):
        base = timm.create_model("test_nfnet", attn_layer="")
    _, report = se_inject.inject(base, seed=0, input_size=32)
    data = report.plan.to_dict()
    assert data["sites"][0]["attention"]["host_gain"] == 2.0
    assert plan_from_data(data).sites[0].attention.module_gain == 1.0  # round trip
    data["sites"][0]["attention"]["host_gain"] = bad
    with pytest.raises(PlanSchemaError, match=r"sites\[0\]\.attention\.host_gain"):
        plan_from_data(data)


# --- scan ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("nf_resnet26", ("covered", ("nfnet",), 8)),
    ("timm:efficientvit_m0", ("already-se", "")),  # its attention blocks are convolutional, with their own SE
])
def test_scan_status(name, expected):
    row = scan_one(name)
    fields = (row.status, row.recipes, row.sites) if len(expected) == 3 else (row.status, row.category)
    assert fields == expected


# --- twins: timm's own SE models share keys and weights --------------------------------------------------------------


def test_vovnet39a_with_ese_in_each_stages_last_block_has_ese_vovnet39b_keys():
    """No timm twin has vovnet39a's architecture with attention; ese_vovnet39b differs only by its (parameter-free)
    residual additions, so eSE in the attn slot of each stage's last block gives exactly its state_dict layout."""
    twin = timm.create_model("ese_vovnet39b", device="meta")
    last = [p for p, m in twin.named_modules() if isinstance(m, OsaBlock) and m.attn is not None]
    model, _ = se_inject.inject("vovnet39a", se_inject.Settings(attn_layer="ese", include=last), device="meta", seed=0)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}


@pytest.mark.slow
def test_nf_resnet_takes_nf_seresnet_weights_and_computes_the_same():
    model, _ = se_inject.inject("nf_resnet26", seed=0, input_size=32)
    twin = timm.create_model("nf_seresnet26")
    twin.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), twin.eval()(x))


@pytest.mark.slow
def test_plain_timm_loads_the_folder_as_nf_seresnet(tmp_path):
    """nf_resnet26 + SE is exactly nf_seresnet26: the saved folder says so (config.json) and loads in plain timm."""

    model, report = se_inject.inject("nf_resnet26", se_inject.Settings(init="identity"), seed=0, input_size=32)
    final = se_inject.save(model, report, tmp_path / "out")
    assert final.timm_architecture == "nf_seresnet26"
    loaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


@pytest.mark.slow
def test_filled_ghostnet_none_slots_save_and_load(tmp_path):
    """GhostNet v1's empty slot is None (not nn.Identity): the saved plan replays onto a fresh model exactly."""
    model = timm.create_model("ghostnet_050").eval()
    injected, report = se_inject.inject(model, se_inject.Settings(fill=True), seed=0, input_size=64)
    se_inject.save(injected, report, tmp_path / "out")
    back = se_inject.load(tmp_path / "out", model=timm.create_model("ghostnet_050"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), injected.eval()(x))
