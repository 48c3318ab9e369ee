"""timm's SE twins: where timm ships a model and the same model with channel attention, se-inject's default result
on the plain one IS the twin: the same parameters, state_dict keys and shapes, and, given the twin's weights, the
same outputs. The pairs come from timm itself (its configuration tables: `se_inject.io.twins`; the sweep also builds
every model of the other families and pairs those whose module trees are equal once attention is taken out)."""

from __future__ import annotations

from fnmatch import fnmatchcase

import pytest
import timm
import torch
from conftest import randomize_norm_stats
from torch import nn

import se_inject
from se_inject.engine.models import build_model, resolve_model
from se_inject.io.twins import CHANNEL_ATTENTION, Twin, config_families, config_twins
from se_inject.layers.attention import is_attention

# Pairs that cannot be exact with default options, and why. The test below checks that each still differs.
NOT_EXACT = {
    ("cs3darknet_l", "cs3sedarknet_l"): "timm's twin uses r = 4 (rd_ratio .25) where its siblings sedarknet21 and "
    "cs3sedarknet_x use SEModule's r = 16; `--reduction 4` gives exactly cs3sedarknet_l",
    ("cs3edgenet_x", "cs3se_edgenet_x"): "timm's twin uses r = 4 (rd_ratio .25), the CSPNet family's other twins "
    "r = 16; `--reduction 4` gives exactly cs3se_edgenet_x",
}
# Twins whose attention is not a variant se-inject makes (global context, bottleneck attention).
OTHER_ATTENTION = {"gca": "global context attention", "bat": "bottleneck attention (BAT)"}
# The smallest pair of each family is checked in the fast suite, the rest behind `slow`; the forward pass with the
# twin's weights runs on the smallest model in the fast suite.
FAST = ("regnetx_002", "resnet33ts", "darknet21")
FORWARD = ("regnetx_002", "resnext26ts", "darknet21")


def _meta(name: str) -> nn.Module:
    return build_model(resolve_model(f"timm:{name}"), device="meta")


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _inject(twin: Twin, device: str = "meta", **options) -> tuple[nn.Module, se_inject.api.Report]:
    return se_inject.inject(f"timm:{twin.plain}", se_inject.Settings(attn_layer=twin.attention, **options),
                            device=device, seed=0, input_size=64)


def _exact_pairs() -> list[Twin]:
    return [t for t in config_twins() if (t.plain, t.twin) not in NOT_EXACT and t.attention in CHANNEL_ATTENTION]


def _params(pairs: list[Twin], fast: tuple[str, ...]) -> list[object]:
    return [pytest.param(t, id=f"{t.plain}->{t.twin}",
                         marks=() if t.plain in fast and t.attention == "se" else pytest.mark.slow) for t in pairs]


def test_timm_twins_are_read_from_timms_configurations():
    pairs = {(t.plain, t.twin) for t in config_twins()}
    # an independent look at three families: registered names, and the twin has attention where the plain has none
    for plain, twin in (("regnetx_002", "regnety_002"), ("resnet33ts", "seresnet33ts"), ("darknet21", "sedarknet21")):
        assert (plain, twin) in pairs
        assert not any(is_attention(m) for m in _meta(plain).modules())
        assert any(is_attention(m) for m in _meta(twin).modules())
    assert ("regnetx_004", "regnety_004") not in pairs  # other widths and depths: not a twin
    for t in config_twins():
        assert timm.is_model(t.plain) and timm.is_model(t.twin)
        assert t.attention in CHANNEL_ATTENTION or t.attention in OTHER_ATTENTION, t


@pytest.mark.parametrize("twin", _params(_exact_pairs(), FAST))
def test_default_result_has_the_twins_parameters_keys_and_shapes(twin):
    injected, report = _inject(twin)
    reference = _meta(twin.twin)
    assert _shapes(injected) == _shapes(reference)
    assert report.after.params == sum(p.numel() for p in reference.parameters())
    assert {s.placement for s in report.plan.sites} == {"family"}


@pytest.mark.slow
@pytest.mark.parametrize("pair", sorted(NOT_EXACT), ids="->".join)
def test_pairs_listed_as_not_exact_still_differ(pair):
    twin = next(t for t in config_twins() if (t.plain, t.twin) == pair)
    injected, _ = _inject(twin)
    assert _shapes(injected) != _shapes(_meta(twin.twin))
    fixed, _ = _inject(twin, rd_ratio=1 / 4)  # what the reason says reproduces it
    assert _shapes(fixed) == _shapes(_meta(twin.twin))


def _same_outputs(plain: str, twin: str, **options) -> tuple[nn.Module, nn.Module]:
    """The injected plain model carrying the twin's (random, non-degenerate) weights, and the twin."""
    reference = randomize_norm_stats(timm.create_model(twin)).eval()
    injected, _ = se_inject.inject(f"timm:{plain}", se_inject.Settings(**options), seed=0, input_size=64)
    injected.load_state_dict(reference.state_dict(), strict=True)
    return injected.eval(), reference


@pytest.mark.parametrize("twin", _params([t for t in _exact_pairs() if t.plain in FORWARD and t.attention == "se"],
                                          FORWARD[:1]))
def test_default_result_computes_what_the_twin_computes(twin):
    injected, reference = _same_outputs(twin.plain, twin.twin)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(injected(x), reference(x), rtol=1e-4, atol=1e-5)


def test_paper_placement_is_the_se_paper_place_and_not_the_twin():
    _, family = se_inject.inject("timm:regnetx_002", device="meta", seed=0)
    _, paper = se_inject.inject("timm:regnetx_002", se_inject.Settings(placement="paper"), device="meta", seed=0)
    model = _meta("regnetx_002")
    assert [s.path for s in paper.plan.sites] == [s.path for s in family.plan.sites]
    for f, p in zip(family.plan.sites, paper.plan.sites, strict=True):
        block = model.get_submodule(f.path)
        assert (f.anchor, f.slot, f.placement) == ("conv2", "se", "family")
        assert f.squeeze_channels == round(block.conv1.conv.in_channels / 4)  # RegNetY: 0.25 x block input
        assert (p.anchor, p.name, p.placement) == ("conv3", "attn_last", "paper")
        assert p.squeeze_channels == max(8, round(block.conv3.conv.out_channels / 16 / 8) * 8)  # SE-ResNet: C/16
    assert paper.plan.settings.placement == "paper"


def test_cspnet_family_se_takes_the_blocks_own_activation():
    _, report = se_inject.inject("timm:darknet21", device="meta", seed=0)
    model = _meta("darknet21")
    for site in report.plan.sites:
        block_act = model.get_submodule(site.path).conv1.bn.act
        assert isinstance(block_act, nn.LeakyReLU) and site.attention.act_layer == "leaky-relu"
        assert block_act.negative_slope == nn.LeakyReLU().negative_slope


def test_efficientnet_family_se_has_the_families_names_and_activation():
    injected, report = se_inject.inject("timm:efficientnet_lite0", device="meta", seed=0)
    b0 = _meta("efficientnet_b0")
    ours = {k: v for k, v in _shapes(injected).items() if ".se." in k}
    assert ours == {k: v for k, v in _shapes(b0).items() if ".se." in k} and len(ours) == 64
    for site in report.plan.sites:  # lite0's blocks use ReLU6, so their SE does (b0's blocks and SE: SiLU)
        assert site.attention.act_layer == "relu6"
    assert all(type(injected.get_submodule(f"{s.path}.se").act1) is nn.ReLU6 for s in report.plan.sites)


def test_torchvision_regnet_x_gets_the_regnet_y_design():
    _, report = se_inject.inject("torchvision:regnet_x_400mf", device="meta", seed=0)
    model = build_model(resolve_model("torchvision:regnet_x_400mf"), device="meta")
    reference = build_model(resolve_model("torchvision:regnet_y_400mf"), device="meta")
    own = reference.trunk_output.block1.get_submodule("block1-0").f  # how torchvision builds RegNetY's SE
    assert list(own._modules)[:3] == ["a", "b", "se"]
    assert report.plan.sites
    for site in report.plan.sites:
        transform = model.get_submodule(site.path)
        block_input = transform.a[0].in_channels
        assert (site.anchor, site.position, site.name) == ("b", "after", "se")
        assert site.channels == transform.b[0].out_channels
        assert site.squeeze_channels == round(block_input / 4) and site.attention.act_layer == "relu"


def test_options_that_change_the_twin_make_a_non_twin(tmp_path):
    from se_inject.io.export import timm_architecture

    _, report = se_inject.inject("timm:regnetx_002", device="meta", seed=0)
    assert timm_architecture(report.plan) == "regnety_002"
    for options in ({"rd_ratio": 1 / 8}, {"placement": "paper"}):
        _, other = se_inject.inject("timm:regnetx_002", se_inject.Settings(**options), device="meta", seed=0)
        assert timm_architecture(other.plan) is None, options


# --- the sweep: every family timm builds from code, pairs found by comparing module trees ---------------------------


def _signature(model: nn.Module) -> tuple[tuple[str, str, tuple[tuple[int, ...], ...]], ...]:
    """The module tree with channel attention and empty places (Identity) taken out: path, class, own shapes."""
    skip: list[str] = []
    rows = []
    for path, m in model.named_modules():
        if any(path.startswith(f"{p}.") for p in skip):
            continue
        if is_attention(m) or isinstance(m, nn.Identity):
            skip.append(path)
            continue
        shapes = tuple(tuple(t.shape) for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))
        rows.append((path, type(m).__name__, shapes))
    return tuple(rows)


# timm's attention modules by the `--attention` variant that makes them
_VARIANT_OF = {"SEModule": "se", "SqueezeExcite": "se", "EcaModule": "eca", "CbamModule": "cbam-timm",
               "EffectiveSEModule": "ese"}


def structural_twins(pattern: str = "*") -> list[tuple[str, str, str]]:
    """(plain, twin, variant) of registered timm models of one module whose module trees are equal but for channel
    attention; variant "" where the twin's attention is not one se-inject makes."""
    from collections import defaultdict

    groups: dict[tuple[str, object], list[tuple[str, set[str]]]] = defaultdict(list)
    for name in timm.list_models(pattern):
        try:
            model = _meta(name)
        except Exception:  # needs arguments, or fails to build on meta: not part of the pairing
            continue
        if type(model).__module__.rpartition(".")[2] in config_families():
            continue  # paired by their configuration tables (vovnet39a's tree equals ese_vovnet39b's, its forward not)
        kinds = {_VARIANT_OF.get(type(m).__name__, "") for m in model.modules() if is_attention(m)}
        groups[(type(model).__module__, _signature(model))].append((name, kinds))
    return [(p, t, next(iter(tk)) if len(tk) == 1 else "") for members in groups.values()
            for p, pk in members for t, tk in members if tk and not pk]


@pytest.mark.sweep
def test_sweep_every_structural_twin():
    failures = []
    for plain, twin, variant in structural_twins():
        if not variant or (plain, twin) in NOT_EXACT:
            continue
        try:
            injected, _ = se_inject.inject(f"timm:{plain}", se_inject.Settings(attn_layer=variant), device="meta",
                                           seed=0)
        except Exception as e:
            failures.append((plain, twin, f"{type(e).__name__}: {e}"[:200]))
            continue
        if _shapes(injected) != _shapes(_meta(twin)):
            failures.append((plain, twin, "keys or shapes differ"))
    assert not failures, failures


# --- --fill: the blocks a partial-SE model lacks SE in get the model's own SE --------------------------------------

# timm models with their own SE in some blocks. Half of their SE modules are taken out; `--fill` on those blocks
# must give back the model itself (keys, shapes; outputs on the first).
FILL = ("lcnet_050", "fbnetv3_b", "mobilenetv3_large_100", "hardcorenas_a", "mobilenetv3_rw", "tinynet_a",
        "efficientnetv2_rw_t", "semnasnet_050", "ghostnet_100", "rexnet_100", "mixnet_s", "rexnetr_300",
        "ese_vovnet39b", "nfnet_l0", "tresnet_m")
# Models (globs) where `--fill` on half of their own SE does not give the model back, and why.
FILL_NOT_EXACT = {
    "hgnet_*": "HGNet v1's ESE is inside its aggregation Sequential, not a block's attention slot",
    "nf_regnet_*": "NF-RegNet's SE sits mid-block in the `attn` slot; the NF recipe fills `attn_last`",
    "*_pruned": "pruned channel counts: timm sizes the SE from the unpruned network's widths",
    "gc_*": "global context attention: not a variant se-inject makes",
    "fbnetv3_g": "the SE left in the model fits block input / 4 to 8 with round_limit 0.9 as well as FBNetV3's "
    "0.95; the first found (0.9) gives the first block of stage 4 24 channels where FBNetV3 has 32",
}
FILL_NOT_EXACT_EXAMPLES = ("fbnetv3_g", "efficientnet_b1_pruned")


def _fill_not_exact(name: str) -> str | None:
    return next((reason for glob, reason in FILL_NOT_EXACT.items() if fnmatchcase(name, glob)), None)


def _take_out(model: nn.Module, paths: list[str]) -> list[str]:
    """Take the attention modules at `paths` out as their blocks build them absent (None where the forward tests for
    None, else Identity); return the blocks' paths."""
    import inspect

    blocks = []
    for path in paths:
        parent, _, attr = path.rpartition(".")
        block = model.get_submodule(parent)
        absent = f"self.{attr} is not None" in inspect.getsource(type(block).forward)
        setattr(block, attr, None) if absent else model.set_submodule(path, nn.Identity())
        blocks.append(parent)
    return blocks


def _own_attention(model: nn.Module) -> list[str]:
    found: list[str] = []
    for path, m in model.named_modules():
        if is_attention(m) and not any(path.startswith(f"{p}.") for p in found):
            found.append(path)
    return found


def _strip_half(name: str, device: str = "meta") -> tuple[nn.Module, list[str]]:
    model = build_model(resolve_model(f"timm:{name}"), device=device)
    return model, _take_out(model, _own_attention(model)[1::2])


def _variant(model: nn.Module) -> str:
    """The se-inject variant of the model's own attention ("" where it has several or one se-inject does not make)."""
    variants = {_VARIANT_OF.get(type(model.get_submodule(p)).__name__, "") for p in _own_attention(model)}
    return variants.pop() if len(variants) == 1 else ""


def _strip_all(name: str, device: str = "meta") -> tuple[nn.Module, list[str], str]:
    """The plain sibling of a timm model whose blocks all have the family's SE: the model with its attention taken
    out; and the se-inject variant of that attention."""
    model = build_model(resolve_model(f"timm:{name}"), device=device)
    variant = _variant(model)
    return model, _take_out(model, _own_attention(model)), variant


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FILL[:1] else pytest.mark.slow) for n in FILL])
def test_fill_adds_exactly_the_models_own_se(name):
    stripped, blocks = _strip_half(name)
    assert blocks
    variant = _variant(_meta(name))
    filled, report = se_inject.inject(stripped, se_inject.Settings(fill=True, include=blocks, attn_layer=variant),
                                      device="meta", seed=0, input_size=64)
    assert [s.path for s in report.plan.sites] == blocks
    assert _shapes(filled) == _shapes(_meta(name))
    if variant == "se":  # the width read from the model's own SE layers (ESE and ECA have none)
        assert any("the model's own SE" in note for note in report.notes)


def test_fill_computes_what_the_models_own_se_computes():
    reference = randomize_norm_stats(timm.create_model("lcnet_050")).eval()
    stripped, blocks = _strip_half("lcnet_050", device="cpu")
    filled, _ = se_inject.inject(stripped, se_inject.Settings(fill=True, include=blocks), seed=0, input_size=64)
    filled.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(filled.eval()(x), reference(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", FILL_NOT_EXACT_EXAMPLES)
def test_fill_models_listed_as_not_exact_still_differ(name):
    assert _fill_not_exact(name)
    stripped, blocks = _strip_half(name)
    filled, _ = se_inject.inject(stripped, se_inject.Settings(fill=True, include=blocks), device="meta", seed=0,
                                 input_size=64)
    assert _shapes(filled) != _shapes(_meta(name))


@pytest.mark.slow
def test_tresnet_fill_puts_tresnets_own_se_mid_block():
    _, report = se_inject.inject("timm:tresnet_m", se_inject.Settings(fill=True), device="meta", seed=0)
    model = _meta("tresnet_m")
    assert report.plan.sites
    for site in report.plan.sites:  # the last stage's Bottlenecks, which timm builds without SE
        block = model.get_submodule(site.path)
        assert block.se is None and (site.anchor, site.slot) == ("conv2", "se")
        planes = block.conv2.conv.out_channels
        assert site.squeeze_channels == max(planes * 4 // 8, 64)  # timm's TResNet Bottleneck SE width


def test_cbam_follows_the_cbam_authors_code():
    """C // r and biases in the shared MLP (the authors' release), not timm's rounding to 8 (regnetx_002's narrow
    stages tell them apart: 24 // 16 = 1, where a multiple of 8 would be 8)."""
    injected, report = se_inject.inject("timm:regnetx_002", se_inject.Settings(attn_layer="cbam", placement="paper"),
                                        device="meta", seed=0)
    for site in report.plan.sites:
        assert site.squeeze_channels == max(1, site.channels // 16)
        mlp = injected.get_submodule(site.module_path).channel
        assert mlp.fc1.bias is not None and mlp.fc2.bias is not None
    assert any(s.channels // 16 % 8 for s in report.plan.sites)


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)) + x)


def test_cbam_timm_is_timms_cbam_module():
    """`--attention cbam-timm` builds timm's CbamModule exactly: its width (C / 16 rounded half up: 24 -> 2, where the
    authors' C // 16 gives 1), no MLP biases, its keys; given its weights, its outputs."""
    from timm.layers.cbam import CbamModule

    from se_inject.layers.attention import create_attention

    model = nn.Sequential(nn.Conv2d(3, 24, 1), _Residual(24), nn.Conv2d(24, 56, 1), _Residual(56))
    _, report = se_inject.inject(model, se_inject.Settings(attn_layer="cbam-timm"), device="meta", seed=0,
                                 input_size=16)
    widths = {s.channels for s in report.plan.sites}
    assert widths == {24, 56}  # C / 16 = 1.5 and 3.5: half up is not floor
    for channels in sorted(widths):
        site = next(s for s in report.plan.sites if s.channels == channels)
        ours, reference = create_attention(site.attention).eval(), randomize_norm_stats(CbamModule(channels)).eval()
        assert _shapes(ours) == _shapes(reference)
        ours.load_state_dict(reference.state_dict(), strict=True)
        x = torch.randn(2, channels, 5, 7)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), reference(x))


@pytest.mark.slow
def test_cbam_timm_on_a_timm_model_built_with_cbam():
    reference = randomize_norm_stats(timm.create_model("test_resnet", block_args={"attn_layer": "cbam"})).eval()
    assert type(reference.layer1[0].se).__name__ == "CbamModule"
    injected, _ = se_inject.inject("timm:test_resnet", se_inject.Settings(attn_layer="cbam-timm"), seed=0,
                                   input_size=64)
    injected.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(injected.eval()(x), reference(x))
    authors, _ = se_inject.inject("timm:test_resnet", se_inject.Settings(attn_layer="cbam"), device="meta", seed=0,
                                  input_size=64)
    assert _shapes(authors) != _shapes(reference)  # the default CBAM has the authors' MLP biases


def test_plain_timm_loads_the_folder_as_the_twin(tmp_path):
    """regnetx_002 + SE is exactly regnety_002: the folder's config.json names it and plain timm loads it."""

    model, report = se_inject.inject("timm:regnetx_002", seed=0, input_size=32)
    final = se_inject.save(model, report, tmp_path / "out")
    assert final.timm_architecture == "regnety_002"
    assert [row["placement"] for row in final.to_dict()["sites"]] == ["family"] * len(report.plan.sites)
    loaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    assert type(loaded) is type(model) and isinstance(loaded.s1.b1.se, timm.layers.SEModule)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_cli_placement_option_is_recorded_and_reported():
    import json

    from typer.testing import CliRunner

    from se_inject.cli import app

    runner = CliRunner()
    family = runner.invoke(app, ["timm:regnetx_002", "--dry-run", "--seed", "0", "--input-size", "64"],
                           terminal_width=200)
    assert family.exit_code == 0, family.output
    assert "SE design: 13 family (timm regnety_* (RegNetY))" in family.stdout
    paper = runner.invoke(app, ["timm:regnetx_002", "--dry-run", "--seed", "0", "--input-size", "64", "--json",
                                "--placement", "paper"])
    assert paper.exit_code == 0, paper.output
    sites = json.loads(paper.stdout)["sites"]
    assert {(row["placement"], row["source"]) for row in sites} == {("paper", "paper")}
    bad = runner.invoke(app, ["timm:regnetx_002", "--dry-run", "--placement", "twin"])
    assert bad.exit_code == 2 and "unknown placement 'twin'" in bad.output


def test_plans_from_before_the_design_fields_still_load():
    """A site written before `placement`, `source`, `act`, `layout` and `norm` existed reads as what it meant: the
    paper's place, ReLU inside, timm SEModule's names; new fields are written only when they differ."""
    from se_inject.engine.schema import plan_from_data

    old = {"path": "layer1.0", "recipe": "resnet-residual", "block": "timm.models.resnet.Bottleneck",
           "anchor": "bn3", "position": "after", "slot": "se", "name": "se",
           "attention": {"kind": "se", "channels": 256, "rd_channels": 16, "kernel_size": 0, "bias": True,
                         "gate": "sigmoid", "gain": 1.0}}
    plan = plan_from_data({"format": "se-inject.plan/1", "model": {"source": "timm", "name": "resnet50"},
                           "input_size": [3, 224, 224], "init": "paper", "seed": 0, "sites": [old]})
    site = plan.sites[0]
    assert (site.placement, site.source) == ("paper", "")
    assert (site.attention.act_layer, site.attention.layout, site.attention.norm_layer) == ("relu", "fc", None)
    assert site.to_dict() == old


# --- families timm builds from code: each SE model and its plain sibling --------------------------------------------

# timm's EfficientNet, MobileNetV3, VoVNet, HGNet, GhostNet, ReXNet, DPN, TResNet and NFNet modules register no plain
# model whose architecture equals an SE model's but for its attention (efficientnet_lite0's blocks, stem and head
# differ from efficientnet_b0's; vovnet39a is not residual). Each SE model's plain sibling is the model with its
# attention taken out: where every block the recipes match has SE ("already SE"), se-inject's default result on that
# sibling must be the model; where some blocks lack it (partial SE), `--fill` must give back the half taken out.
OWN_SE_FAMILIES = ("efficientnet", "mobilenetv3", "vovnet", "hgnet", "ghostnet", "rexnet", "dpn", "tresnet", "nfnet")
# Default results on a plain sibling that are not the model, by model name glob, and why.
OWN_NOT_EXACT = {
    "*_pruned": "pruned channel counts: timm sizes the SE from the unpruned network's widths",
    "hgnet_*": "HGNet v1's ESE sits inside its aggregation Sequential (`aggregation.1`: one 1x1 conv named `conv` "
    "with bias, sigmoid); se-inject's HGNet place is after the aggregation, and its ESE (timm's EffectiveSEModule: "
    "`fc`, hard-sigmoid) has other names",
    "nfnet_[fl]*": "NFNet-F/L SE is rd_ratio 0.5 / 0.25; the NF family's default follows nf_seresnet (r = 16, the "
    "twin of the plain nf_resnet); `--fill` reads their own width",
    "dm_nfnet_f*": "NFNet-F SE is rd_ratio 0.5; the NF family's default follows nf_seresnet (r = 16)",
    "test_nfnet": "rd_ratio 0.25 (as NFNet-L); the NF family's default follows nf_seresnet (r = 16)",
    "nf_regnet_*": "NF-RegNet's SE sits mid-block in the `attn` slot (rd_ratio 0.5); the NF recipe fills `attn_last`",
}


def _own_not_exact(name: str) -> str | None:
    return next((reason for glob, reason in OWN_NOT_EXACT.items() if fnmatchcase(name, glob)), None)


def _default_on_plain_sibling(name: str) -> tuple[nn.Module, se_inject.api.Report, list[str]]:
    """se-inject's default result on the plain sibling, with the model's own attention variant (SE where se-inject
    makes no variant of it, HGNet v1's ESE)."""
    stripped, blocks, variant = _strip_all(name)
    assert blocks, name
    injected, report = se_inject.inject(stripped, se_inject.Settings(attn_layer=variant or "se"), device="meta", seed=0,
                                        input_size=64)
    return injected, report, blocks


OWN_DEFAULT = ("tinynet_e", "ese_vovnet19b_slim_dw", "nf_ecaresnet26", "efficientnet_b0", "eca_nfnet_l0")


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in OWN_DEFAULT[:1] else pytest.mark.slow)
                                  for n in OWN_DEFAULT])
def test_default_result_on_an_se_models_plain_sibling_is_the_model(name):
    injected, report, blocks = _default_on_plain_sibling(name)
    assert [s.path for s in report.plan.sites] == blocks
    assert _shapes(injected) == _shapes(_meta(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hgnet_tiny", "nfnet_l0", "nf_regnet_b0", "efficientnet_b1_pruned"])
def test_plain_siblings_listed_as_not_exact_still_differ(name):
    assert _own_not_exact(name)
    injected, _, _ = _default_on_plain_sibling(name)
    assert _shapes(injected) != _shapes(_meta(name))


@pytest.mark.slow
def test_default_result_on_a_plain_sibling_computes_what_the_model_computes():
    reference = randomize_norm_stats(timm.create_model("tinynet_e")).eval()
    stripped, _, _ = _strip_all("tinynet_e", device="cpu")
    injected, _ = se_inject.inject(stripped, seed=0, input_size=64)
    injected.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(injected.eval()(x), reference(x), rtol=1e-4, atol=1e-5)


def own_se_models(family: str) -> list[tuple[str, str]]:
    """(name, "default" or "fill") of every registered model of ``timm.models.<family>`` with channel attention of
    its own: "default" where every block the recipes match has it, "fill" where some lack it."""
    from se_inject.errors import NoSitesError

    found = []
    for name in timm.list_models(module=family):
        model = _meta(name)
        if not _own_attention(model):
            continue
        try:
            se_inject.inject(model, device="meta", seed=0, input_size=64)
        except NoSitesError as e:
            found.append((name, "default" if e.reason == "already-attention" else "fill"))
            continue
        found.append((name, "fill"))  # attention outside the blocks the recipes match: only filling can tell
    return found


@pytest.mark.sweep
@pytest.mark.parametrize("family", OWN_SE_FAMILIES)
def test_sweep_own_se_families(family):
    """Every SE model of the family: its plain sibling's default result (all-SE models) and `--fill` on half of its
    SE (every model) give the model back, key for key, unless listed with the reason."""
    failures, listed_but_exact = [], []
    for name, kind in own_se_models(family):
        if kind == "default":
            try:
                injected, _, _ = _default_on_plain_sibling(name)
                exact = _shapes(injected) == _shapes(_meta(name))
            except Exception as e:
                exact = False
                print(name, f"{type(e).__name__}: {e}"[:200])
            if not exact and not _own_not_exact(name):
                failures.append((name, "default"))
            elif exact and _own_not_exact(name):
                listed_but_exact.append(name)
        variant = _variant(_meta(name))
        stripped, blocks = _strip_half(name)
        if not blocks:
            continue
        try:
            filled, _ = se_inject.inject(stripped,
                                         se_inject.Settings(fill=True, include=blocks, attn_layer=variant or "se"),
                                         device="meta", seed=0, input_size=64)
            exact = bool(variant) and _shapes(filled) == _shapes(_meta(name))
        except Exception as e:
            exact = False
            print(name, f"{type(e).__name__}: {e}"[:200])
        if not exact and not _fill_not_exact(name):
            failures.append((name, "fill"))
        elif exact and _fill_not_exact(name):
            listed_but_exact.append(name)
    assert not failures, failures
    assert not listed_but_exact, listed_but_exact
