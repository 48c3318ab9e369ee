"""The class recipes (ResNet, Inception, inverted residual and their relatives) on models from both libraries:
places, exact site lists, invariants, auto-detection."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from helpers import randomize_norm_stats, state_snapshot
from torch import nn

import se_inject
from se_inject import NoSitesError
from se_inject.layers.attention import class_path, is_attention
from se_inject.layers.squeeze_excite import SqueezeExcite


def _real(source: str, name: str) -> nn.Module:
    model = timm.create_model(name) if source == "timm" else torchvision.models.get_model(name)
    return randomize_norm_stats(model).eval()


@pytest.mark.parametrize(("source", "name", "recipe", "size"), [
    pytest.param("torchvision", "googlenet", "inception", 96, marks=pytest.mark.slow),
    ("torchvision", "mobilenet_v2", "inverted-residual", 64),
    pytest.param("torchvision", "mnasnet0_5", "inverted-residual", 64, marks=pytest.mark.slow),
    ("timm", "test_efficientnet", "inverted-residual", 64),
    pytest.param("timm", "mobilenetv2_050", "inverted-residual", 64, marks=pytest.mark.slow),
    ("torchvision", "mobilenet_v3_small", "inverted-residual", 64),
])
def test_recipe_invariants_on_small_models(source, name, recipe, size):
    model = _real(source, name)
    before = state_snapshot(model)
    injected, report = se_inject.inject(model, se_inject.Settings(fill=True), seed=0, recipes=recipe)
    assert report.plan.recipes == (recipe,)
    after = injected.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # no key renamed, moved or renumbered
    added = set(after) - set(before)
    assert added
    assert all(any(k.startswith(f"{s.module_path}.") for s in report.plan.sites) for k in added)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert injected.eval()(x).shape == model(x).shape
    strict = injected.load_state_dict(model.state_dict(), strict=False)
    assert not strict.unexpected_keys
    assert set(strict.missing_keys) == added


def test_torchvision_inception_v3_sites():
    _, report = se_inject.inject("torchvision:inception_v3", device="meta", seed=0)
    sites = [(s.path, s.channels, s.squeeze_channels) for s in report.plan.sites]
    assert sites == [
        ("Mixed_5b", 256, 16), ("Mixed_5c", 288, 16), ("Mixed_5d", 288, 16),
        ("Mixed_6a", 768, 48), ("Mixed_6b", 768, 48), ("Mixed_6c", 768, 48), ("Mixed_6d", 768, 48),
        ("Mixed_6e", 768, 48), ("Mixed_7a", 1280, 80), ("Mixed_7b", 2048, 128), ("Mixed_7c", 2048, 128),
    ]
    assert report.plan.input_size == (3, 299, 299)
    assert all(s.recipe == "inception" for s in report.plan.sites)


@pytest.mark.slow
def test_timm_inception_v3_matches_torchvision_sites():
    _, tv = se_inject.inject("torchvision:inception_v3", device="meta", seed=0)
    _, tm = se_inject.inject("timm:inception_v3", device="meta", seed=0)
    assert [(s.path, s.channels) for s in tv.plan.sites] == [(s.path, s.channels) for s in tm.plan.sites]


def test_torchvision_mobilenet_v2_sites():
    _, report = se_inject.inject("torchvision:mobilenet_v2", device="meta", seed=0)
    expanded = [32, 96, 144, 144, 192, 192, 192, 384, 384, 384, 384, 576, 576, 576, 960, 960, 960]
    assert [s.path for s in report.plan.sites] == [f"features.{i}" for i in range(1, 18)]
    assert [s.channels for s in report.plan.sites] == expanded
    # no SE convention of its own: EfficientNet's, as torchvision computes it (block input channels // 4)
    inputs = [32, 16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160]
    assert [s.squeeze_channels for s in report.plan.sites] == [c // 4 for c in inputs]


def test_googlenet_has_nine_inception_sites_and_no_aux():
    _, report = se_inject.inject("torchvision:googlenet", device="meta", seed=0)
    assert [s.path for s in report.plan.sites] == [
        "inception3a", "inception3b", "inception4a", "inception4b", "inception4c", "inception4d", "inception4e",
        "inception5a", "inception5b"]


@pytest.mark.slow
def test_inception_v4_and_inception_resnet_v2_modules():
    _, v4 = se_inject.inject("timm:inception_v4", device="meta", seed=0)
    kinds = [s.block.rsplit(".", 1)[1] for s in v4.plan.sites]
    assert kinds == ["InceptionA"] * 4 + ["ReductionA"] + ["InceptionB"] * 7 + ["ReductionB"] + ["InceptionC"] * 3
    _, irv2 = se_inject.inject("timm:inception_resnet_v2", device="meta", seed=0)
    residual = [s for s in irv2.plan.sites if s.block.endswith(("Block35", "Block17", "Block8"))]
    assert len(residual) == 10 + 20 + 10
    assert all(s.anchor == "conv2d" and s.position == "after" for s in residual)


def _calls(block: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Input (before the call) and output of each named child, cloned: later in-place ops must not reach them."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def pre(name: str, args: tuple[torch.Tensor, ...]) -> None:
        inputs.setdefault(name, args[0].clone())

    def post(name: str, output: torch.Tensor) -> None:
        outputs.setdefault(name, output.clone())

    hooks = []
    for n in names:
        hooks.append(block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: pre(n, a)))
        hooks.append(block.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: post(n, o)))
    with torch.no_grad():
        block(x)
    for h in hooks:
        h.remove()
    return {n: (inputs[n], outputs[n]) for n in names}


def test_mobilenet_v2_se_sits_between_depthwise_and_projection():
    injected, _ = se_inject.inject(_real("torchvision", "mobilenet_v2"), seed=0)
    block = injected.features[3]
    seen = _calls(block, ["conv.1", "se", "conv.2"], torch.randn(1, 24, 16, 16))
    assert torch.equal(seen["se"][0], seen["conv.1"][1])  # input: the depthwise conv + BN + ReLU6 output
    assert torch.equal(seen["conv.2"][0], seen["se"][1])  # output: into the pointwise projection


@pytest.mark.slow
def test_inception_se_takes_the_concatenated_output():
    model = _real("torchvision", "googlenet")
    injected, _ = se_inject.inject(model, seed=0)
    block = injected.inception3a
    x = torch.randn(1, 192, 12, 12)
    seen = _calls(block, ["se"], x)
    with torch.no_grad():
        concatenated = torch.cat([model.inception3a.get_submodule(f"branch{i}")(x) for i in range(1, 5)], 1)
        assert torch.equal(seen["se"][0], concatenated)
        assert torch.equal(block(x), seen["se"][1])


def test_timm_efficientnet_fills_the_existing_slot():
    model = timm.create_model("mobilenetv2_050")
    injected, report = se_inject.inject(model, seed=0)
    for site in report.plan.sites:
        assert site.slot == "se"
        assert isinstance(injected.get_submodule(site.path).se, SqueezeExcite)
        assert type(injected.get_submodule(site.path)) is type(model.get_submodule(site.path))  # no rewrite needed


def test_regnet_paper_placement_leaves_the_mid_block_slot_alone():
    model = timm.create_model("regnetx_002").eval()
    injected, report = se_inject.inject(model, se_inject.Settings(placement="paper"), seed=0)
    block = injected.get_submodule(report.plan.sites[0].path)
    assert isinstance(block.se, nn.Identity)  # RegNet's own mid-block slot untouched
    assert isinstance(block.attn_last, SqueezeExcite)
    calls = []
    hook = block.attn_last.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        injected(torch.randn(1, 3, 64, 64))
    hook.remove()
    assert len(calls) == 1
    seen = _calls(block, ["conv3", "attn_last"], torch.randn(1, block.conv1.conv.in_channels, 16, 16))
    assert torch.equal(seen["attn_last"][0], seen["conv3"][1])


def test_models_with_se_everywhere_are_reported():
    with pytest.raises(NoSitesError) as info:
        se_inject.inject("timm:regnety_002", device="meta")
    assert info.value.reason == "already-attention"
    _, report = se_inject.inject("torchvision:mobilenet_v3_large", se_inject.Settings(fill=True), device="meta", seed=0)
    assert sum(s.already_attention for s in report.skipped) == 8  # the blocks that have SE keep theirs
    assert len(report.plan.sites) == 7


def test_shufflenet_takes_se_on_branch2_in_every_unit():
    _, report = se_inject.inject("torchvision:shufflenet_v2_x0_5", device="meta", seed=0)
    assert report.plan.recipes == ("shufflenet",)
    assert len(report.plan.sites) == 16 and {s.anchor for s in report.plan.sites} == {"branch2"}


def test_fused_mbconv_without_projection_is_skipped_with_reason():
    _, report = se_inject.inject("torchvision:efficientnet_v2_s", se_inject.Settings(fill=True), device="meta", seed=0)
    reasons = {s.reason for s in report.skipped}
    assert "no pointwise projection to put SE before" in reasons
    assert all(s.block.endswith("FusedMBConv") for s in report.plan.sites)


class TwoFamilies(nn.Module):
    """A toy model holding a torchvision ResNet block and a MobileNetV2 block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.res = torchvision.models.resnet.BasicBlock(64, 64)
        self.mbv2 = torchvision.models.mobilenetv2.InvertedResidual(64, 64, 1, 4)

    def forward(self, x):
        return self.mbv2(self.res(self.stem(x)))


def test_auto_detection_applies_every_matching_recipe_and_recipe_restricts():
    _, report = se_inject.inject(TwoFamilies(), seed=0, input_size=32)
    assert {s.path: s.recipe for s in report.plan.sites} == {"res": "resnet-residual", "mbv2": "inverted-residual"}
    # each recipe's convention: 64 // 16 -> 8 (to the divisor); input channels 64 / 4
    assert {s.path: s.squeeze_channels for s in report.plan.sites} == {"res": 8, "mbv2": 16}
    _, only = se_inject.inject(TwoFamilies(), seed=0, input_size=32, recipes=["inverted-residual"])
    assert [s.path for s in only.plan.sites] == ["mbv2"]


SAMPLE = [
    "timm:resnet26", "timm:resnet50d", "timm:resnext26ts", "timm:wide_resnet50_2", "timm:resnet10t",
    "timm:regnetx_004", "timm:regnetv_040", "timm:res2net50_14w_8s", "timm:res2next50", "timm:resnest26d",
    "timm:resnetv2_50", "timm:resnetv2_50d_gn", "timm:hrnet_w18_small", "timm:tresnet_m", "timm:skresnet18",
    "timm:inception_v3", "timm:inception_v4", "timm:inception_resnet_v2", "timm:efficientnet_b0",
    "timm:efficientnet_lite0", "timm:mobilenetv2_100", "timm:mobilenetv3_small_050", "timm:mnasnet_small",
    "timm:fbnetc_100", "timm:tinynet_e", "timm:efficientnetv2_rw_t", "timm:mobilenetv4_conv_small",
    "timm:spnasnet_100", "timm:lcnet_050", "timm:semnasnet_050", "timm:seresnext26d_32x4d", "timm:vit_tiny_patch16_224",
    "timm:convnext_atto", "timm:densenet121", "torchvision:resnet18", "torchvision:resnext50_32x4d",
    "torchvision:wide_resnet50_2", "torchvision:inception_v3", "torchvision:googlenet", "torchvision:mobilenet_v2",
    "torchvision:mnasnet1_0", "torchvision:mobilenet_v3_small", "torchvision:efficientnet_b0",
    "torchvision:efficientnet_v2_s", "torchvision:regnet_x_400mf", "torchvision:regnet_y_400mf",
    "torchvision:shufflenet_v2_x1_0", "torchvision:squeezenet1_0", "torchvision:vgg11", "torchvision:vit_b_16",
]


# The models of SAMPLE that get no site, and why (every other one gets sites).
# (resnext26ts, convnext_atto, densenet121, shufflenet_v2_x1_0, squeezenet1_0 and vgg11 are covered by the family
# recipes; tests/test_patterns.py and tests/test_family_recipes.py pin their sites; the ViTs take token SE,
# tests/test_tokens.py.)
NO_SITES = {
    "timm:regnetv_040": "already-attention", "timm:efficientnet_b0": "already-attention",
    "timm:tinynet_e": "already-attention", "timm:seresnext26d_32x4d": "already-attention",
    "torchvision:efficientnet_b0": "already-attention", "torchvision:regnet_y_400mf": "already-attention",
}
# The models of SAMPLE whose designers put SE in some blocks only: refused unless filled.
PARTIAL = {"timm:tresnet_m", "timm:mobilenetv3_small_050", "timm:mnasnet_small", "timm:efficientnetv2_rw_t",
           "timm:lcnet_050", "timm:semnasnet_050", "torchvision:mobilenet_v3_small", "torchvision:efficientnet_v2_s"}


# The sample's cheapest model of each kind runs in the fast suite, the rest behind `slow`.
FAST_SAMPLE = {"timm:resnet10t", "torchvision:resnet18", "timm:convnext_atto", "torchvision:shufflenet_v2_x1_0",
               "timm:mobilenetv4_conv_small", "torchvision:mobilenet_v3_small", "torchvision:squeezenet1_0",
               "torchvision:vgg11", "torchvision:regnet_x_400mf", "timm:resnest26d", "timm:vit_tiny_patch16_224",
               "torchvision:vit_b_16", *NO_SITES}


@pytest.mark.parametrize("name", [n if n in FAST_SAMPLE else pytest.param(n, marks=pytest.mark.slow) for n in SAMPLE])
def test_sample_across_families(name):
    """Each model gets SE at every eligible block (output shape kept, exact counts), or the no-sites answer pinned
    for it in NO_SITES; partial-SE models only with fill."""
    if name in NO_SITES:
        with pytest.raises(NoSitesError) as info:
            se_inject.inject(name, se_inject.Settings(fill=True), device="meta", seed=0)
        assert info.value.reason == NO_SITES[name]
        return
    if name in PARTIAL:
        with pytest.raises(NoSitesError) as info:
            se_inject.inject(name, device="meta", seed=0)
        assert info.value.reason == "partial-attention"
    injected, report = se_inject.inject(name, se_inject.Settings(fill=name in PARTIAL), device="meta", seed=0)
    assert any(s.already_attention for s in report.skipped) == (name in PARTIAL)
    assert report.after.output_shapes == report.before.output_shapes
    se_params = sum(p.numel() for s in report.plan.sites for p in injected.get_submodule(s.module_path).parameters())
    assert report.after.params - report.before.params == se_params
    matched = {p for p, m in injected.named_modules() if class_path(m) in _recipe_classes()}
    by_class = {_matched_block(injected, s.path) for s in report.plan.sites if not s.pattern}  # not by structure
    assert matched == by_class | {s.path for s in report.skipped}
    for path in matched - {s.path for s in report.skipped}:
        assert any(is_attention(m) for m in injected.get_submodule(path).modules())


def _matched_block(model: nn.Module, path: str) -> str:
    """The block a class rule matched for a site at `path`: the site's own block, or for a rule with `in_child`
    (DenseNet: SE in the layer's conv2) its nearest ancestor of a recipe's class."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        if class_path(model.get_submodule(".".join(parts[:i]))) in _recipe_classes():
            return ".".join(parts[:i])
    return path


def _recipe_classes() -> set[str]:
    return {c for name in se_inject.list_recipes() for c in se_inject.get_recipe(name).classes}
