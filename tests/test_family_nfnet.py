"""NFNet family (recipe `nfnet`): SE in NormFreeBlock's `attn_last` slot, times the block's own attn_gain."""

from __future__ import annotations

import pytest
import timm
import torch
from family_checks import assert_identity_reproduces
from timm.layers import ScaledStdConv2d
from timm.models.nfnet import NormFreeBlock

import se_inject
from se_inject import NoSitesError, RecipeFileError, load_recipe_file
from se_inject.engine.schema import PlanSchemaError, plan_from_data
from se_inject.tools.scan import scan_one


def _meta(name: str, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def _no_attention_nfnet() -> torch.nn.Module:
    """timm's test_nfnet without its SE (NFNet blocks: extra 3x3 conv, SiLU), with non-trivial conv gains: timm
    initialises conv3's gain to 0 (the residual branch starts at zero), which would make any comparison vacuous."""
    model = timm.create_model("test_nfnet", attn_layer="")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ScaledStdConv2d):
                m.gain.copy_(torch.rand(m.gain.shape, generator=g) + 0.5)
    return model.eval()


def test_nf_resnet_sites_equal_an_independent_count_and_its_se_twin():
    """One SE per NormFreeBlock at the end of the branch (conv3's width), with nf_seresnet26's squeeze widths."""
    model, report = se_inject.inject("nf_resnet26", device="meta", seed=0)
    blocks = [(p, m) for p, m in _meta("nf_resnet26").named_modules() if isinstance(m, NormFreeBlock)]
    assert report.plan.recipes == ("nfnet",)
    assert [s.path for s in report.plan.sites] == [p for p, _ in blocks] and len(blocks) == 8
    assert [s.channels for s in report.plan.sites] == [m.conv3.out_channels for _, m in blocks]
    assert all(s.slot == "attn_last" and s.anchor == "conv3" for s in report.plan.sites)
    twin = _meta("nf_seresnet26")  # timm's own SE variant: same architecture, SE in the same slot
    assert [s.squeeze_channels for s in report.plan.sites] == [
        twin.get_submodule(f"{p}.attn_last").fc1.out_channels for p, _ in blocks]
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in twin.state_dict().items()}  # key for key


@pytest.mark.parametrize("init", ["paper", "identity"])
def test_the_block_keeps_its_attn_gain_and_the_module_is_timms_se(init):
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


def test_identity_init_reproduces_a_real_nfnet():
    base = _no_attention_nfnet().eval()
    block = base.stages[0][0]
    with torch.no_grad():
        assert block.conv3(torch.randn(1, block.conv3.in_channels, 4, 4)).abs().sum() > 0  # the branch is not zero
    _, report = assert_identity_reproduces(base, 32, train=True)
    assert len(report.plan.sites) == 4


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
    _, report = se_inject.inject(_meta("test_nfnet", attn_layer=""), seed=0, input_size=32)
    data = report.plan.to_dict()
    assert data["sites"][0]["attention"]["host_gain"] == 2.0
    assert plan_from_data(data).sites[0].attention.module_gain == 1.0  # round trip
    data["sites"][0]["attention"]["host_gain"] = bad
    with pytest.raises(PlanSchemaError, match=r"sites\[0\]\.attention\.host_gain"):
        plan_from_data(data)


@pytest.mark.parametrize("name", ["test_nfnet", "nf_regnet_b0", "nf_ecaresnet26", "nf_seresnet26", "dm_nfnet_f0"])
def test_nfnets_with_attention_are_already_se(name):
    """NFNet-F / dm_nfnet (SE in attn_last), NF-RegNet (SE in the mid-block attn), ECA variants: nothing to add."""
    with pytest.raises(NoSitesError) as info:
        se_inject.inject(name, device="meta", seed=0)
    assert info.value.reason == "already-attention"


def test_scan_counts_nf_resnet_as_covered():
    row = scan_one("nf_resnet26")
    assert (row.status, row.recipes, row.sites) == ("covered", ("nfnet",), 8)


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


@pytest.mark.slow
def test_nf_resnet_takes_nf_seresnet_weights_and_computes_the_same():
    model, _ = se_inject.inject("nf_resnet26", seed=0, input_size=32)
    twin = timm.create_model("nf_seresnet26")
    twin.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), twin.eval()(x))


@pytest.mark.slow
def test_nfnet_with_se_scripts_and_exports():
    injected, _ = se_inject.inject(_no_attention_nfnet(), seed=0, input_size=32)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = injected.eval()(x)
        torch.testing.assert_close(torch.jit.script(injected)(x), expected)
        torch.testing.assert_close(torch.export.export(injected, (x,)).module()(x), expected)


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
