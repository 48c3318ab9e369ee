"""Every family recipe, tested by behaviour over a table of the families' own expectations (as timm's
tests/test_models.py parametrizes over ``list_models``):

- the sites a recipe finds equal an independent count on the model (`SITES`);
- a family with SE in some blocks by design is refused by default and filled with its designers' own SE
  (`PARTIAL`); a family with SE everywhere is "already SE" (`ALREADY`); a model whose convolutions are only
  embeddings or position encodings gets none (`NO_BLOCKS`);
- identity-initialised SE on a real CPU model keeps every weight and computes exactly the base model, with each
  module taking the map the recipe names (`IDENTITY`);
- TorchScript and torch.export keep working (`SCRIPTS`, slow).

Each row names its family; a family's one-off behaviours live in tests/test_family_details.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from family_checks import (
    assert_identity_reproduces,
    assert_scripts_and_exports,
    assert_sites_shaped_like,
    real_model,
    se_input,
)
from helpers import randomize_norm_stats
from timm.layers import EffectiveSEModule, ScaledStdConv2d, SEModule, make_divisible
from timm.models import (
    coat,
    cpubone,
    densenet,
    dpn,
    edgenext,
    efficientformer_v2,
    efficientvim,
    efficientvit_msra,
    gcvit,
    ghostnet,
    hgnet,
    iformer,
    lcnetv2,
    lowformer,
    mambaout,
    nfnet,
    pvt_v2,
    rdnet,
    repghost,
    repvit,
    rexnet,
    selecsls,
    shvit,
    swiftformer,
    visformer,
    vovnet,
    xcit,
)
from timm.models import xception_aligned as aligned
from timm.models.csatv2 import Block as CsatBlock
from timm.models.csatv2 import TransformerBlock as CsatTransformerBlock
from timm.models.xception import Block as LegacyXceptionBlock
from torch import nn
from torchvision.models import maxvit as tv_maxvit

import se_inject
from se_inject import NoSitesError, build_model, find_sites, get_recipe, resolve_model
from se_inject.engine.recipe_files import resolve_recipes
from se_inject.layers.attention import is_attention

Count = Callable[[nn.Module, Any], dict[str, list]]  # (injected meta model, report) -> expected site fields


def _field(site: Any, name: str) -> Any:
    for part in name.split("."):
        site = getattr(site, part)
    return site


def _of(model: nn.Module, kind: type | tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, kind)]


def _se_width(c: int) -> int:
    """timm SEModule's default: C / 16 to a multiple of 8, never rounded down past 90%."""
    return make_divisible(c / 16, 8)


def _se_width_floor(c: int) -> int:
    return make_divisible(c / 16, 8, round_limit=0.0)


# --- the sites each recipe finds: an independent count on the model ----------------------------------------------


def _densenet(model, report):
    layers = _of(model, (densenet.DenseLayer, torchvision.models.densenet._DenseLayer))
    blocks = [m for m in model.modules() if type(m).__name__ in ("DenseBlock", "_DenseBlock")]
    assert len(layers) == sum(len(b) for b in blocks) == 58  # DenseNet-121: 6 + 12 + 24 + 16 layers
    for _, layer in layers:  # the layer's forward is its own; the SE is the 3x3 conv's
        assert isinstance(layer.conv2.se, nn.Module) and not hasattr(layer.conv1, "se")
        assert type(layer) in (densenet.DenseLayer, torchvision.models.densenet._DenseLayer)
    return {"path": [f"{p}.conv2" for p, _ in layers], "channels": [m.conv2.out_channels for _, m in layers],
            "squeeze_channels": [8] * len(layers)}  # k = 32: 32 / 16 = 2, to a multiple of 8


def _dpn(b: bool) -> Count:
    def count(model, report):
        blocks = _of(model, dpn.DualPathBlock)
        assert all(m.b == b for _, m in blocks)
        last_1x1 = [m.c1x1_c1 if b else m.c1x1_c.conv for _, m in blocks]  # the split convs' (or the conv's) input
        return {"path": [p for p, _ in blocks], "channels": [c.in_channels for c in last_1x1]}
    return count


def _edgenext(model, report):
    """EdgeNeXt's conv blocks take SE after the permute back (its recipe); its transposed-attention blocks take token
    SE after their channels-last MLP (the transformer recipe, docs/transformers.md)."""
    blocks = _of(model, edgenext.ConvBlock)
    sites = [s for s in report.plan.sites if s.recipe == "edgenext"]
    assert all(s.pattern == "residual" and s.anchor.startswith("%permute") for s in sites)
    attention = [p for p, _ in _of(model, edgenext.SplitTransposeBlock)]
    assert [s.path for s in report.plan.sites if s.recipe == "transformer"] == attention and attention
    return {"path": [p for p, _ in blocks], "channels": [m.mlp.fc2.out_features for _, m in blocks]}


def _efficientformerv2(model, report):
    blocks = _of(model, efficientformer_v2.EfficientFormerV2Block)
    conv_blocks = [(p, m) for p, m in blocks if m.token_mixer is None]
    assert conv_blocks and len(conv_blocks) < len(blocks)
    assert all(m.mlp.mid.conv.groups == m.mlp.mid.conv.out_channels for _, m in conv_blocks)  # depthwise
    return {"path": [p for p, _ in conv_blocks], "channels": [m.mlp.mid.conv.out_channels for _, m in conv_blocks],
            "anchor": ["mlp.fc2"] * len(conv_blocks), "position": ["before"] * len(conv_blocks),
            # EfficientNet's width: the block's input channels / 4, rounded
            "squeeze_channels": [round(m.mlp.fc1.conv.in_channels / 4) for _, m in conv_blocks]}


def _hgnetv2(model, report):
    blocks = _of(model, hgnet.HighPerfGpuBlock)
    assert not any(isinstance(m, hgnet.EseModule) for m in model.modules())
    width = [[c for c in m.aggregation.modules() if isinstance(c, nn.Conv2d)][-1].out_channels for _, m in blocks]
    return {"path": [p for p, _ in blocks], "anchor": ["aggregation"] * len(blocks),
            "position": ["after"] * len(blocks), "channels": width, "squeeze_channels": [_se_width(c) for c in width]}


def _convs(block: nn.Module) -> list[nn.Conv2d]:
    """A block's own convolutions, in order (not the inserted SE's)."""
    return [m for n, m in block.named_modules() if isinstance(m, nn.Conv2d) and not n.startswith("se.")]


def _cpubone(model, report):
    # the convolutional blocks are the (Fused-)MBConvs; each ends in a 1x1 projection
    blocks = _of(model, (cpubone.MBConv, cpubone.FusedMBConv))
    assert all(_convs(m)[-1].kernel_size == (1, 1) for _, m in blocks)
    local = [m.total[-1].main for m in model.modules() if isinstance(m, cpubone.CPUBoneBlock)]
    assert all(any(b is m for _, b in blocks) for m in local)  # every attention block's local branch takes SE
    assert not report.skipped
    return {"path": [p for p, _ in blocks], "anchor": ["point_conv"] * len(blocks),
            "position": ["before"] * len(blocks), "channels": [_convs(m)[-1].in_channels for _, m in blocks],
            "attention.rd_channels": [round(_convs(m)[0].in_channels / 4) for _, m in blocks]}


def _csatv2(model, report):
    # the convolutional blocks are those with a depthwise kxk conv on the NCHW map
    blocks = [(p, m) for p, m in _of(model, CsatBlock) if m.dwconv.groups == m.dwconv.in_channels > 1]
    assert any(isinstance(m, CsatTransformerBlock) for m in model.modules())
    assert not report.skipped
    return {"path": [p for p, _ in blocks], "anchor": ["ls"] * len(blocks), "position": ["before"] * len(blocks),
            "channels": [m.pwconv2.out_features for _, m in blocks],
            "attention.rd_channels": [_se_width_floor(m.pwconv2.out_features) for _, m in blocks]}


def _pvt(model, report):
    # every block's FFN holds one depthwise 3x3 conv on an NCHW map
    ffns = _of(model, pvt_v2.MlpWithDepthwiseConv)
    assert len(ffns) == sum(isinstance(m, pvt_v2.Block) for m in model.modules())
    assert all(m.dwconv.groups == m.dwconv.in_channels == m.fc1.out_features for _, m in ffns)
    assert not report.skipped
    return {"path": [p for p, _ in ffns], "anchor": ["dwconv"] * len(ffns), "position": ["after"] * len(ffns),
            "channels": [m.dwconv.out_channels for _, m in ffns],
            "attention.rd_channels": [_se_width_floor(m.dwconv.out_channels) for _, m in ffns]}


def _visformer_conv_block(block: nn.Module) -> bool:
    """No attention, and a spatial (3x3) conv in its MLP: a convolutional residual block."""
    return block.attn is None and any(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
                                      for m in block.mlp.modules())


def _visformer(model, report):
    blocks = _of(model, visformer.Block)
    conv_blocks = [(p, m) for p, m in blocks if _visformer_conv_block(m)]
    assert len(conv_blocks) < len(blocks)  # the attention stages' blocks take none
    assert not report.skipped
    return {"path": [p for p, _ in conv_blocks], "anchor": ["mlp"] * len(conv_blocks),
            "position": ["after"] * len(conv_blocks), "channels": [m.mlp.conv3.out_channels for _, m in conv_blocks],
            "attention.rd_channels": [_se_width_floor(m.mlp.conv3.out_channels) for _, m in conv_blocks]}


def _xcit(model, report):
    # the model's convolutional blocks are its LPIs (two depthwise kxk convs on an NCHW map)
    lpis = _of(model, xcit.LPI)
    assert len(lpis) == sum(isinstance(m, xcit.XCABlock) for m in model.modules())
    assert all(c.groups == c.in_channels > 1 for _, m in lpis for c in (m.conv1, m.conv2))
    assert not report.skipped
    params = sum(2 * s.channels * s.attention.rd_channels + s.channels + s.attention.rd_channels
                 for s in report.plan.sites)  # two 1x1 convs with bias per SE
    assert report.after.params - report.before.params == params
    return {"path": [p for p, _ in lpis], "anchor": ["conv2"] * len(lpis), "position": ["after"] * len(lpis),
            "channels": [m.conv2.out_channels for _, m in lpis],
            "attention.rd_channels": [_se_width_floor(m.conv2.out_channels) for _, m in lpis]}


def _iformer(model, report):
    blocks = _of(model, iformer.ConvBlock)
    last = [[u for u in m.mixer.module if isinstance(u, iformer.ConvNorm)][-1] for _, m in blocks]  # last conv-BN
    # the attention blocks (Residual units too), their FFN and position encoding are in the model but take none
    assert {iformer.SHMABlock, iformer.FFN, iformer.RepCPE} <= {type(m) for m in model.modules()}
    return {"path": [f"{p}.mixer" for p, _ in blocks], "channels": [u.bn.num_features for u in last],
            "pattern": ["residual"] * len(blocks), "anchor": ["module"] * len(blocks),
            "position": ["after"] * len(blocks)}


def _lowformer_expansion(block: nn.Module) -> nn.Conv2d:
    """The conv whose output the SE scales: the depthwise one, or the fused kxk expansion."""
    return block.depth_conv.conv if isinstance(block, lowformer.MBConv) else block.spatial_conv.conv


def _lowformer(model, report):
    blocks = _of(model, (lowformer.MBConv, lowformer.FusedMBConv))
    assert all(any(isinstance(m, kind) for _, m in blocks) for kind in (lowformer.MBConv, lowformer.FusedMBConv))
    return {"path": [p for p, _ in blocks], "channels": [_lowformer_expansion(m).out_channels for _, m in blocks],
            "anchor": ["point_conv"] * len(blocks), "position": ["before"] * len(blocks),
            # EfficientNet's width: the block's input channels / 4, rounded
            "squeeze_channels": [round(_lowformer_expansion(m).in_channels / 4) if isinstance(m, lowformer.FusedMBConv)
                                 else round(m.inverted_conv.conv.in_channels / 4) for _, m in blocks]}


def _mambaout(model, report):
    blocks = _of(model, mambaout.GatedConvBlock)
    channels = [m.conv.out_channels for _, m in blocks]
    return {"path": [p for p, _ in blocks], "channels": channels, "anchor": ["conv"] * len(blocks),
            "position": ["after"] * len(blocks),
            "squeeze_channels": [max(8, int(c / 16 + 4) // 8 * 8) for c in channels]}  # timm SEModule's width


def _nf_resnet(model, report):
    """One SE per NormFreeBlock at the end of the branch (conv3's width), with nf_seresnet26's squeeze widths and
    its state_dict, key for key."""
    blocks = _of(model, nfnet.NormFreeBlock)
    assert len(blocks) == 8
    twin = timm.create_model("nf_seresnet26", device="meta")  # timm's own SE variant: SE in the same slot
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in twin.state_dict().items()}
    return {"path": [p for p, _ in blocks], "channels": [m.conv3.out_channels for _, m in blocks],
            "slot": ["attn_last"] * len(blocks), "anchor": ["conv3"] * len(blocks),
            "squeeze_channels": [twin.get_submodule(f"{p}.attn_last").fc1.out_channels for p, _ in blocks]}


def _selecsls(model, report):
    blocks = _of(model, selecsls.SelecSlsBlock)
    assert len(blocks) == 6
    assert all(len(m.conv6) == 3 for _, m in blocks)  # conv6 keeps its children and numbering
    assert not any(hasattr(m, "se") for m in model.head.modules())  # the head's conv stack gets none
    return {"path": [f"{p}.conv6.2" for p, _ in blocks],  # conv6's ReLU
            "channels": [m.conv6[0].out_channels for _, m in blocks]}


def _swiftformer(model, report):
    blocks = _of(model, swiftformer.ConvEncoder)
    assert any(isinstance(m, swiftformer.Block) for m in model.modules())  # attention blocks: present, no SE
    return {"path": [p for p, _ in blocks], "channels": [m.pwconv2.out_channels for _, m in blocks],
            "pattern": ["residual"] * len(blocks), "anchor": ["pwconv2"] * len(blocks),
            "position": ["after"] * len(blocks)}


def _vovnet(model, report):
    blocks = _of(model, vovnet.OsaBlock)
    channels = [m.conv_concat.conv.out_channels for _, m in blocks]
    return {"path": [p for p, _ in blocks], "slot": ["attn"] * len(blocks), "channels": channels,
            "squeeze_channels": [_se_width(c) for c in channels]}


def _xception_branch(module: nn.Module) -> nn.Module:
    return module.rep if isinstance(module, LegacyXceptionBlock) else module.stack


def _xception(model, report):
    """Modules whose branch is added to a skip (the aligned exit flow's last has none): 12 in each."""
    expected = [(p, m) for p, m in model.named_modules() if isinstance(m, LegacyXceptionBlock) or (
        isinstance(m, (aligned.XceptionModule, aligned.PreXceptionModule)) and not m.no_skip)]
    assert len(expected) == 12
    if not any(isinstance(m, LegacyXceptionBlock) for _, m in expected):  # the exit flow's last (no skip): none
        assert any(getattr(m, "no_skip", False) for m in model.modules())
    # legacy blocks: after `rep`; aligned modules: on the output of the stack's last separable conv, in its own
    # forward (which forward_with_tap runs too)
    places = [(p, "rep") if isinstance(m, LegacyXceptionBlock) else (f"{p}.stack.{list(m.stack._modules)[-1]}", "")
              for p, m in expected]
    return {"path": [p for p, _ in places], "anchor": [a for _, a in places],
            "channels": [[c for c in _xception_branch(m).modules() if isinstance(c, nn.Conv2d)][-1].out_channels
                         for _, m in expected]}


def _slow(*values: Any) -> Any:
    return pytest.param(*values, marks=pytest.mark.slow)


SITES = [  # recipe, model, the family's own count
    ("densenet", "timm:densenet121", _densenet),
    ("densenet", "torchvision:densenet121", _densenet),
    ("dpn", "dpn48b", _dpn(True)),
    ("dpn", "dpn68", _dpn(False)),
    ("edgenext", "timm:edgenext_xx_small", _edgenext),
    ("efficientformerv2", "timm:efficientformerv2_s0", _efficientformerv2),
    ("hgnet", "timm:hgnetv2_b0", _hgnetv2),
    ("hybrid-cpubone", "timm:cpubone_nano", _cpubone),  # Fused-MBConv only
    ("hybrid-cpubone", "timm:cpubone_b0_bfrobust", _cpubone),  # both kinds
    ("hybrid-csatv2", "timm:csatv2", _csatv2),
    ("hybrid-pvt", "timm:pvt_v2_b0", _pvt),
    _slow("hybrid-pvt", "timm:pvt_v2_b2_li", _pvt),  # linear attention: an extra ReLU before the depthwise conv
    ("hybrid-visformer", "timm:visformer_tiny", _visformer),
    ("hybrid-xcit", "timm:xcit_nano_12_p16_224", _xcit),
    ("iformer", "timm:iformer_t", _iformer),
    ("lowformer", "timm:lowformer_b0", _lowformer),
    ("mambaout", "timm:test_mambaout", _mambaout),
    ("nfnet", "nf_resnet26", _nf_resnet),
    ("selecsls", "selecsls42b", _selecsls),
    ("swiftformer", "timm:swiftformer_xs", _swiftformer),
    ("vovnet", "vovnet39a", _vovnet),
    ("xception", "legacy_xception", _xception),
    ("xception", "xception41", _xception),
    ("xception", "xception41p", _xception),
]


# Families whose attention blocks take token SE besides the family recipe's sites (the count covers the recipe's).
ALSO_TOKENS = {"timm:edgenext_xx_small"}


@pytest.mark.parametrize(("recipe", "name", "count"), SITES)
def test_sites_equal_the_familys_own_count(recipe, name, count):
    model, report = se_inject.inject(name, device="meta", seed=0)
    assert report.plan.recipes == ((recipe, "transformer") if name in ALSO_TOKENS else (recipe,))
    expected = count(model, report)
    assert expected["path"], "the family's blocks are in the model"
    sites = [s for s in report.plan.sites if s.recipe == recipe]
    for field, rows in expected.items():
        assert [_field(s, field) for s in sites] == rows, field


# --- partial SE: refused by default, filled with the designers' own SE ------------------------------------------

GHOST_BLOCKS = (ghostnet.GhostBottleneck, ghostnet.GhostBottleneckV3, repghost.RepGhostBottleneck)


def _ghost_width(channels: int) -> int:
    """GhostNet's own rule, from timm's own SE layer for these models (se_ratio 0.25 in every config)."""
    return ghostnet._SE_LAYER(channels, rd_ratio=0.25, device="meta").conv_reduce.out_channels


def _ghostnet(base):
    """(path, expanded channels) of the Ghost bottlenecks with and without SE; the expanded width is what the second
    ghost module's first convolution takes in."""
    has, lacks, own = [], [], []
    for path, block in _of(base, GHOST_BLOCKS):
        width = next(c for c in block.ghost2.modules() if isinstance(c, nn.Conv2d)).in_channels
        empty = block.se is None or isinstance(block.se, nn.Identity)
        (lacks if empty else has).append((path, width))
        own += [] if empty else [block.se]
    assert all(se.conv_reduce.out_channels == _ghost_width(se.conv_reduce.in_channels) for se in own)
    return [p for p, _ in has], {"path": [p for p, _ in lacks], "slot": ["se"] * len(lacks),
                                 "channels": [c for _, c in lacks],
                                 "squeeze_channels": [_ghost_width(c) for _, c in lacks],
                                 "attention.gate_layer": ["hard-sigmoid"] * len(lacks)}


def _lcnetv2(base):
    blocks = _of(base, lcnetv2.RepDepthwiseSeparable)
    own = [m.se for _, m in blocks if not isinstance(m.se, nn.Identity)]
    # the depthwise conv's width (the first conv of the block: single or multi-kernel)
    lacks = [(p, next(c for c in m.modules() if isinstance(c, nn.Conv2d)).out_channels) for p, m in blocks
             if isinstance(m.se, nn.Identity)]
    assert all(se.fc1.out_channels == int(se.fc1.in_channels * 0.25) for se in own)  # LCNetV2's rule
    return len(own), {"path": [p for p, _ in lacks], "slot": ["se"] * len(lacks), "channels": [c for _, c in lacks],
                      "squeeze_channels": [int(c * 0.25) for _, c in lacks]}


RDNET_SMALL = {"num_init_features": 16, "growth_rates": [16, 24, 32, 32, 32, 32, 48], "num_blocks_list": [2] * 7}


def _rdnet(base):
    """Dense blocks whose layers end in eSE, and (path, growth rate) of those without: the fill goes before
    layer-scale, drop-path and the stage's concat."""
    blocks = _of(base, rdnet.DenseBlock)
    assert all(isinstance(m.layers, (rdnet.Block, rdnet.BlockESE)) for _, m in blocks)
    has = [p for p, m in blocks if isinstance(m.layers.layers[-1], EffectiveSEModule)]
    lacks = [(p, [c for c in m.layers.modules() if isinstance(c, nn.Conv2d)][-1].out_channels) for p, m in blocks
             if p not in has]
    return has, {"path": [p for p, _ in lacks], "anchor": ["layers"] * len(lacks),
                 "position": ["after"] * len(lacks), "channels": [c for _, c in lacks],
                 "squeeze_channels": [_se_width(c) for _, c in lacks]}


def _repvit_width(channels: int) -> int:
    """RepViT's rule, from timm's own SE layer as RepViTBlock builds it."""
    return SEModule(channels, 0.25, device="meta").fc1.out_channels


def _repvit(base):
    blocks = _of(base, repvit.RepViTBlock)
    lacks = [(p, m.token_mixer.conv.c.out_channels) for p, m in blocks if isinstance(m.se, nn.Identity)]
    return [p for p, m in blocks if not isinstance(m.se, nn.Identity)], {
        "path": [p for p, _ in lacks], "slot": ["se"] * len(lacks), "anchor": ["token_mixer"] * len(lacks),
        "channels": [c for _, c in lacks], "squeeze_channels": [_repvit_width(c) for _, c in lacks]}


def _repvit_filled_like_native(model, report):
    """Filled and native SE read alike: `se.fc1` / `se.fc2` with the shapes timm's SEModule would have."""
    for site in report.plan.sites:
        native = SEModule(site.channels, 0.25, device="meta").state_dict()
        filled = model.get_submodule(f"{site.path}.se").state_dict()
        assert {k: v.shape for k, v in filled.items()} == {k: v.shape for k, v in native.items()}


def _rexnet(ch_div: int):
    def own_width(c: int) -> int:  # ReXNet's rule (timm rexnet.py: make_divisible(int(C * se_ratio), ch_div))
        return make_divisible(int(c * (1 / 12.0)), ch_div)

    def count(base):
        blocks = _of(base, rexnet.LinearBottleneck)
        own = [m.se for _, m in blocks if m.se is not None]
        lacks = [(p, m.conv_dw.conv.out_channels) for p, m in blocks if m.se is None]
        assert all(se.fc1.out_channels == own_width(se.fc1.in_channels) for se in own)
        return len(own), {"path": [p for p, _ in lacks], "slot": ["se"] * len(lacks),
                          "anchor": ["conv_dw"] * len(lacks), "channels": [c for _, c in lacks],
                          "squeeze_channels": [own_width(c) for _, c in lacks]}
    return count


def _ese_vovnet(base):
    blocks = _of(base, vovnet.OsaBlock)
    has = [p for p, m in blocks if m.attn is not None]
    lacks = [(p, m.conv_concat.conv.out_channels) for p, m in blocks if m.attn is None]
    return has, {"path": [p for p, _ in lacks], "slot": ["attn"] * len(lacks), "channels": [c for _, c in lacks]}


def _vovnet_filled_like_own(model, report):
    """The family's own kind: every block now has eSE with the key names and shapes of timm's EffectiveSEModule."""
    has = [s.path for s in report.skipped if s.already_attention]
    lacks = [s.path for s in report.plan.sites]
    own = {k: v.shape for k, v in model.state_dict().items() if k.startswith(has[0] + ".attn.")}
    filled = {k.replace(lacks[0], has[0]): v.shape for k, v in model.state_dict().items()
              if k.startswith(lacks[0] + ".attn.")}
    assert own and set(own) == set(filled)


def _ffn_blocks(block_type: type, anchor: Callable[[nn.Module, str], str] | None = None):
    """EfficientViM / SHViT: SE on the FFN output of the attention-free blocks (SHViT: also its downsamples'
    FFN units), the PatchMerging downsamples keeping their own SE; at the family's width, timm SEModule(C, 0.25)."""
    def count(base):
        merging = [p for p, _ in _of(base, (efficientvim.PatchMerging, shvit.PatchMerging))]
        if block_type is efficientvim.EfficientViMBlock:
            expected = [(p, m.ffn.fc2.conv.out_channels, "ffn") for p, m in _of(base, block_type)]
        else:
            blocks = _of(base, shvit.BasicBlock)
            conv_blocks = [(p, m.ffn.m, "ffn.m") for p, m in blocks if isinstance(m.mixer, nn.Identity)]
            assert any(isinstance(getattr(m.mixer, "m", None), shvit.SHSA) for _, m in blocks)  # both kinds
            downsample_ffns = [(p, m.m, "m") for p, m in base.named_modules()
                               if isinstance(m, shvit.Residual) and isinstance(m.m, shvit.FFN) and ".downsample." in p]
            assert conv_blocks and downsample_ffns
            order = {p: i for i, (p, _) in enumerate(base.named_modules())}
            expected = [(p, ffn.pw2.c.out_channels, a)
                        for p, ffn, a in sorted(conv_blocks + downsample_ffns, key=lambda r: order[r[0]])]
        assert merging
        return merging, {"path": [p for p, _, _ in expected], "channels": [c for _, c, _ in expected],
                         "anchor": [a for _, _, a in expected], "position": ["after"] * len(expected)}
    return count


def _shaped_like_timm_se(model, report):
    """The family's own SE width: timm SEModule(C, rd_ratio=0.25), as in PatchMerging."""
    assert_sites_shaped_like(model, report, lambda c: SEModule(c, rd_ratio=0.25, device="meta"))


PARTIAL = [  # recipe, model, the family's own count (already-SE paths or their number; the fill's sites), options,
    # and a check of the filled model
    ("ghostnet", "ghostnet_050", _ghostnet, {}, None),
    _slow("ghostnet", "ghostnetv3_050", _ghostnet, {}, None),
    _slow("ghostnet", "repghostnet_050", _ghostnet, {}, None),
    _slow("ghostnet", "ghostnetv2_100", _ghostnet, {}, None),
    ("lcnetv2", "lcnetv2_small", _lcnetv2, {}, None),
    ("rdnet", "rdnet_tiny", _rdnet, {}, None),
    ("repvit", "repvit_m0_9", _repvit, {}, _repvit_filled_like_native),
    ("rexnet", "rexnet_100", _rexnet(1), {"rd_divisor": None}, None),
    ("rexnet", "rexnetr_100", _rexnet(8), {"rd_divisor": 8}, None),
    ("vovnet", "ese_vovnet39b", _ese_vovnet, {"attn_layer": "ese"}, _vovnet_filled_like_own),
    ("efficientvim", "timm:efficientvim_m1", _ffn_blocks(efficientvim.EfficientViMBlock), {}, _shaped_like_timm_se),
    ("shvit", "timm:shvit_s1", _ffn_blocks(shvit.BasicBlock), {}, _shaped_like_timm_se),
]


@pytest.mark.parametrize(("recipe", "name", "count", "options", "check"), PARTIAL)
def test_partial_se_is_refused_by_default_and_filled_with_the_familys_own_se(recipe, name, count, options, check):
    already, expected = count(build_model(resolve_model(name), device="meta"))
    assert already and expected["path"]
    with pytest.raises(NoSitesError, match="partial SE") as info:
        se_inject.inject(name, device="meta", seed=0)
    assert info.value.reason == "partial-attention"
    model, report = se_inject.inject(name, se_inject.Settings(fill=True, **options), device="meta", seed=0)
    assert report.plan.recipes == (recipe,)
    owned = report.to_dict()["already_attention"]
    assert (owned == already) if isinstance(already, list) else (len(owned) == already)
    assert [s.path for s in report.skipped if s.already_attention] == owned
    for field, rows in expected.items():
        assert [_field(s, field) for s in report.plan.sites] == rows, field
    if check is not None:
        check(model, report)


# --- SE everywhere already, or no convolutional block: nothing to add ----------------------------------------------


def _hgnet_v1(model):
    blocks = [m for m in model.modules() if isinstance(m, hgnet.HighPerfGpuBlock)]
    assert blocks and all(isinstance(m.aggregation[-1], hgnet.EseModule) for m in blocks)
    return f"all {len(blocks)} matching blocks"


def _one_block_per_stage_ese_vovnet(model):
    has, lacks = _ese_vovnet(model)
    assert has and not lacks["path"]
    return ""


def _own_se_at_mobilenetv3s_place(block_class: type, recipe: str, own_se: str, projection: str):
    """Hybrids whose convolutional blocks already have SE after the depthwise conv, before the 1x1 projection: the
    recipe names that place, so every such block is recognised."""
    def check(model):
        blocks = _of(model, block_class)
        assert blocks
        for _, block in blocks:
            se, proj = block.get_submodule(own_se), block.get_submodule(projection)
            assert is_attention(se)
            assert (proj if isinstance(proj, nn.Conv2d) else proj.conv).kernel_size == (1, 1)
        findings = find_sites(model, [get_recipe(recipe)], (3, 224, 224))
        assert not findings.matches
        assert [s.path for s in findings.skipped] == [p for p, _ in blocks]
        assert all(s.already_attention and s.recipe == recipe for s in findings.skipped)
        return ""
    return check


ALREADY = [  # model, its check (returns text the refusal must contain), inject options
    ("timm:hgnet_tiny", _hgnet_v1, {}),
    # NFNet-F / dm_nfnet (SE in attn_last), NF-RegNet (SE in the mid-block attn), ECA variants
    *((f"timm:{n}", None, {}) for n in ("test_nfnet", "nf_regnet_b0", "nf_ecaresnet26", "nf_seresnet26",
                                        "dm_nfnet_f0")),
    ("timm:ese_vovnet19b_slim_dw", _one_block_per_stage_ese_vovnet, {}),
    ("timm:efficientvit_m0", _own_se_at_mobilenetv3s_place(
        efficientvit_msra.PatchMerging, "hybrid-efficientvit-msra", "se", "conv3"), {"fill": True}),
]

# Hybrids whose conv blocks have their own SE at MobileNetV3's place and whose attention blocks (channels-last MLPs)
# have none: partial SE, and --fill gives the attention blocks token SE (docs/transformers.md).
OWN_SE_IN_CONV_BLOCKS = [
    ("timm:gcvit_xxtiny", _own_se_at_mobilenetv3s_place(gcvit.MbConvBlock, "hybrid-gcvit", "se", "conv_pw"),
     "GlobalContextVitBlock"),
    ("torchvision:maxvit_t", _own_se_at_mobilenetv3s_place(
        tv_maxvit.MBConv, "hybrid-maxvit", "layers.squeeze_excitation", "layers.conv_c"), "PartitionAttentionLayer"),
]


@pytest.mark.parametrize(("name", "check", "attention_class"), OWN_SE_IN_CONV_BLOCKS)
def test_hybrids_fill_their_attention_blocks_with_token_se(name, check, attention_class):
    model = build_model(resolve_model(name), device="meta")
    check(model)
    attention = [p for p, m in model.named_modules() if type(m).__name__ == attention_class]
    assert attention
    with pytest.raises(NoSitesError, match="partial SE"):
        se_inject.inject(name, device="meta", seed=0)
    _, report = se_inject.inject(name, se_inject.Settings(fill=True), device="meta", seed=0)
    assert [s.path for s in report.plan.sites] == attention
    assert {s.recipe for s in report.plan.sites} == {"transformer"}


@pytest.mark.parametrize(("name", "check", "options"), ALREADY)
def test_families_with_se_in_every_block_are_already_se(name, check, options):
    text = check(build_model(resolve_model(name), device="meta")) if check else ""
    with pytest.raises(NoSitesError, match=text) as info:
        se_inject.inject(name, se_inject.Settings(**options), device="meta", seed=0)
    assert info.value.reason == "already-attention"


def _coat_allowed(model: nn.Module, path: str) -> bool:
    """CoaT: a patchify conv, or one inside the position encodings (ConvPosEnc: CPVT's PEG; ConvRelPosEnc)."""
    conv = model.get_submodule(path)
    encodings = {p for p, m in model.named_modules() if isinstance(m, (coat.ConvPosEnc, coat.ConvRelPosEnc))}
    return tuple(conv.stride) == tuple(conv.kernel_size) or any(path.startswith(f"{p}.") for p in encodings)


def _inside(*owners: str) -> Callable[[nn.Module, str], bool]:
    """The conv sits inside a module of one of these classes."""
    def allowed(model: nn.Module, path: str) -> bool:
        parts = path.split(".")
        classes = {type(model.get_submodule(".".join(parts[:i]))).__name__ for i in range(1, len(parts))}
        return bool(classes & set(owners))
    return allowed


NO_BLOCKS = [  # model, where its convolutions are allowed to live, input size
    ("timm:coat_lite_tiny", _coat_allowed, 224),  # transformer blocks on token sequences with a class token
    ("timm:coat_tiny", _coat_allowed, 224),
    ("timm:davit_tiny", _inside("ConvPosEnc", "Stem", "Downsample"), 224),
    ("timm:mvitv2_tiny", _inside("MultiScaleAttention", "PatchEmbed"), 224),  # pooling convs inside attention
    ("timm:crossvit_9_dagger_240", _inside("PatchEmbed"), 240),  # a multi-conv patch embedding
]


@pytest.mark.parametrize(("name", "allowed", "size"), NO_BLOCKS)
def test_models_whose_convs_are_only_embeddings_or_encodings_take_token_se_in_their_blocks(name, allowed, size):
    """No convolutional recipe takes them; their transformer blocks take token SE after their MLP, never inside one
    of the convolutions' modules (CoaT: its serial blocks; the parallel ones, several scales in, take none)."""
    model = build_model(resolve_model(name), device="meta")
    convs = [p for p, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(allowed(model, p) for p in convs), [p for p in convs if not allowed(model, p)]
    findings = find_sites(model, resolve_recipes("auto"), (3, size, size))  # every shipped recipe
    assert findings.matches  # CoaT's parallel blocks (several scales in, a tuple out) are skipped, with the reason
    assert all(s.block == "timm.models.coat.ParallelBlock" and not s.already_attention for s in findings.skipped)
    assert {(m.recipe.name, m.pattern, m.channels_last) for m in findings.matches} == {
        ("transformer", "token-residual", True)}
    for m in findings.matches:  # a transformer block, holding none of the convolutions
        assert not any(isinstance(sub, nn.Conv2d) for sub in model.get_submodule(m.path).get_submodule(
            m.anchor).modules()), m.path
    if "coat" in name:
        assert [m.path for m in findings.matches] == [p for p, _ in _of(model, coat.SerialBlock)]


def test_mvitv2_takes_token_se_in_every_block():
    _, report = se_inject.inject("timm:mvitv2_tiny", se_inject.Settings(fill=True), device="meta", seed=0)
    assert report.plan.recipes == ("transformer",) and len(report.plan.sites) == 10


# --- identity init on real models: every weight kept, exactly the base model's outputs, SE on the planned map -----


def _tiny_densenet(source: str, **kwargs: Any) -> Callable[[], nn.Module]:
    """A DenseNet of the library's own class, small enough to run in a test (growth 8, two blocks of two layers)."""
    def make() -> nn.Module:
        if source == "timm":
            model = densenet.DenseNet(growth_rate=8, block_config=(2, 2), bn_size=2, num_classes=10, **kwargs)
        else:
            model = torchvision.models.DenseNet(8, (2, 2), 16, bn_size=2, num_classes=10, **kwargs)
        return randomize_norm_stats(model).eval()
    return make


def _densenet_training_too(injected, base, report):
    assert len(report.plan.sites) == 4
    x = torch.randn(2, 3, 32, 32)
    injected.train(), base.train()
    torch.manual_seed(0)
    out = injected(x.requires_grad_())
    torch.manual_seed(0)
    assert torch.equal(out, base(x))  # training mode (dropout, checkpointing) too


def _sites(n: int):
    def check(injected, base, report):
        assert len(report.plan.sites) == n
    return check


def _tiny_dpn(b: bool) -> Callable[[], nn.Module]:
    return lambda: randomize_norm_stats(dpn.DPN(k_sec=(1, 2, 1, 1), inc_sec=(8, 8, 8, 8), k_r=32, groups=4, small=True,
                                                num_init_features=16, b=b, num_classes=10)).eval()


def _hooked(block: nn.Module, inputs: torch.Tensor, **hooks: tuple[str, str]) -> dict[str, Any]:
    """Run `block` on `inputs`, keeping what each named child receives ("in") or returns ("out")."""
    seen: dict[str, Any] = {}
    handles = []
    for key, (path, which) in hooks.items():
        module = block.get_submodule(path)
        if which == "in":
            handles.append(module.register_forward_pre_hook(lambda _m, args, key=key: seen.update({key: args[0]})))
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, out, key=key: seen.update({key: out})))
    try:
        with torch.no_grad():
            block(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _edgenext_se_takes_the_branch_in_nchw(injected, base, report):
    block, base = injected.get_submodule(report.plan.sites[0].path), base.get_submodule(report.plan.sites[0].path)
    h = torch.randn(1, base.conv_dw.in_channels, 8, 8)
    seen = _hooked(block, h, x=("se", "in"))
    with torch.no_grad():
        expected = (base.gamma * base.mlp(base.norm(base.conv_dw(h).permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
    assert torch.equal(seen["x"], expected)


def _se_takes_the_output_of(child: str, fed_by: str = "out", size: Callable[[nn.Module], int] | None = None):
    """The first site's SE receives what `child` of the block returns (the very tensor: `is`), or with
    `fed_by="layer_scale"` the SE's output is what the layer scale receives."""
    def check(injected, base, report):
        block = injected.get_submodule(report.plan.sites[0].path)
        x = torch.randn(1, size(block), 4, 4)
        if fed_by == "layer_scale":
            seen = _hooked(block, x, se=("se", "out"), scale=("layer_scale", "in"))
            assert seen["se"] is seen["scale"]
        else:
            seen = _hooked(block, x, se=("se", "in"), child=(child, "out"))
            assert seen["se"] is seen["child"]
    return check


def _efficientformerv2_se_takes_the_depthwise_output(injected, base, report):
    block = injected.get_submodule(report.plan.sites[0].path)
    seen = _hooked(block, torch.randn(1, block.mlp.fc1.conv.in_channels, 4, 4), se=("se", "in"), mid=("mlp.mid", "out"))
    assert torch.equal(seen["se"], seen["mid"])  # the depthwise conv-BN-act's output, before fc2


def _efficientvit_sites(injected, base, report):
    """One SE per MBConv / FusedMBConv, on the expanded map, squeezing the block's input channels / 4."""
    blocks = [(p, m) for p, m in base.named_modules() if type(m).__name__ in ("MBConv", "FusedMBConv")]
    assert any(type(m).__name__ == "FusedMBConv" for _, m in blocks)
    expected = [(p, m.point_conv.conv.in_channels, round(
        (m.spatial_conv.conv if hasattr(m, "spatial_conv") else m.inverted_conv.conv).in_channels / 4))
        for p, m in blocks]
    assert [(s.path, s.channels, s.squeeze_channels) for s in report.plan.sites] == expected


def _ghost_slots_filled(injected, base, report):
    # the filled slots sit where the designers' own SE sits: the blocks' `se` attribute
    assert all(isinstance(injected.get_submodule(s.path).se, nn.Module) for s in report.plan.sites)
    assert not any(b.se is None or isinstance(b.se, nn.Identity) for b in injected.modules()
                   if isinstance(b, GHOST_BLOCKS))


def _cpubone_se_takes_the_expanded_map(injected, base, report):
    block, base = injected.stages[1][0].main, base.stages[1][0].main
    x = torch.randn(2, base.spatial_conv.conv.in_channels, 8, 8)
    with torch.no_grad():
        expected = base.spatial_conv(x)
    assert torch.equal(se_input(block, "se", x), expected)


def _csatv2_se_takes_the_gated_branch(injected, base, report):
    path = next(p for p, m in base.named_modules() if isinstance(m, CsatBlock))
    block, base = injected.get_submodule(path), base.get_submodule(path)
    x = torch.randn(2, base.dwconv.in_channels, 8, 8)
    with torch.no_grad():
        y = base.dwconv(x).permute(0, 2, 3, 1)
        y = base.pwconv2(base.grn(base.act(base.pwconv1(base.norm(y))))).permute(0, 3, 1, 2)
        expected = y * F.interpolate(base.attn(y), size=y.shape[2:], mode="bilinear", align_corners=True)
    assert torch.equal(se_input(block, "se", x), expected)  # after the spatial gate, before ls and the addition


def _pvt_se_takes_the_depthwise_map(injected, base, report):
    ffn, base_ffn = injected.stages[0].blocks[0].mlp, base.stages[0].blocks[0].mlp
    tokens = torch.randn(2, 64, base_ffn.fc1.in_features)  # stage 0 at 32x32 input: an 8x8 grid
    with torch.no_grad():
        x = base_ffn.fc1(tokens).transpose(1, 2).reshape(2, -1, 8, 8)
        expected = base_ffn.dwconv(base_ffn.relu(x))
    assert torch.equal(se_input(ffn, "se", tokens, [8, 8]), expected)  # NCHW, before the GELU on tokens
    with torch.no_grad():  # not specialised to the planned grid: another size runs and still equals the base
        x = torch.randn(1, 3, 64, 48)
        assert torch.equal(injected(x), base(x))


def _visformer_se_takes_the_branch_output(injected, base, report):
    block, base = injected.stage1[0], base.stage1[0]
    x = torch.randn(2, base.mlp.conv1.in_channels, 8, 8)
    with torch.no_grad():
        expected = base.mlp(base.norm2(x))
    assert torch.equal(se_input(block, "se", x), expected)  # before drop-path and the addition


def _xcit_se_takes_the_lpi_map(injected, base, report):
    lpi, base = injected.blocks[0].local_mp, base.blocks[0].local_mp
    tokens = torch.randn(2, 4, lpi.conv1.in_channels)  # the plan's 2x2 grid at 32x32 input, patch 16
    with torch.no_grad():
        x = tokens.permute(0, 2, 1).reshape(2, -1, 2, 2)
        expected = base.conv2(base.bn(base.act(base.conv1(x))))
    assert torch.equal(se_input(lpi, "se", tokens, 2, 2), expected)  # NCHW, after conv2, before the reshape


def _mambaout_se_scales_the_conv_output(injected, base, report):
    site = report.plan.sites[0]
    block, base = injected.get_submodule(site.path), base.get_submodule(site.path)
    h = torch.randn(1, 8, 8, base.fc1.in_features)  # channels-last, as the block runs
    seen = _hooked(block, h, x=("se", "in"))
    with torch.no_grad():
        _, _, c = torch.split(base.fc1(base.norm(h)), base.split_indices, dim=-1)
        expected = base.conv(c.permute(0, 3, 1, 2))
    assert torch.equal(seen["x"], expected)


def _no_attention_nfnet() -> nn.Module:
    """timm's test_nfnet without its SE (NFNet blocks: extra 3x3 conv, SiLU), with non-trivial conv gains: timm
    initialises conv3's gain to 0 (the residual branch starts at zero), which would make any comparison vacuous."""
    model = timm.create_model("test_nfnet", attn_layer="")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ScaledStdConv2d):
                m.gain.copy_(torch.rand(m.gain.shape, generator=g) + 0.5)
    model.eval()
    block = model.stages[0][0]
    with torch.no_grad():
        assert block.conv3(torch.randn(1, block.conv3.in_channels, 4, 4)).abs().sum() > 0  # the branch is not zero
    return model


def _rexnet_se_slots(injected, base, report):
    assert all(injected.get_submodule(s.path).se is not None for s in report.plan.sites)


def _tiny_selecsls() -> nn.Module:
    """A SelecSLS of timm's own classes: two stages of two blocks (the first of each passes its output on as skip)."""
    features = [(32, 0, 16, 16, True, 2), (16, 16, 16, 24, False, 1), (24, 0, 24, 32, True, 2),
                (32, 32, 24, 32, False, 1)]
    cfg = {"block": selecsls.SelecSlsBlock, "features": features, "head": [(32, 48, 3, 2), (48, 64, 1, 1)],
           "num_features": 64, "feature_info": []}
    return randomize_norm_stats(selecsls.SelecSls(cfg, num_classes=10)).eval()


def _tiny_aligned(preact: bool) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        cfg = [{"in_chs": 64, "out_chs": 32, "stride": 2}, {"in_chs": 32, "out_chs": 32, "stride": 1},
               {"in_chs": 32, "out_chs": (32, 48, 48), "stride": 2},
               {"in_chs": 48, "out_chs": (48, 64, 64), "stride": 1, "no_skip": True, "start_with_relu": False}]
        if preact:
            cfg[-1].pop("start_with_relu")
        return randomize_norm_stats(aligned.XceptionAligned(cfg, num_classes=10, preact=preact)).eval()
    return make


def _tiny_legacy_xception() -> nn.Module:
    """timm's legacy Xception blocks (the model itself has a fixed size): a strided projection block, one growing
    later, an identity block."""
    Block = LegacyXceptionBlock
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Block(16, 32, 2, 2, start_with_relu=False),
                          Block(32, 32, 3, 1), Block(32, 48, 2, 1, grow_first=False))
    return randomize_norm_stats(model).eval()


def _real(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: real_model(name, **kwargs)


VOVNET_SMALL = {"stem_chs": [16, 16, 32], "stage_conv_chs": [16, 16, 24, 24], "stage_out_chs": [32, 48, 64, 96]}
REPVIT_SMALL = {"embed_dim": (16, 32, 48, 64), "depth": (2, 2, 3, 2)}  # a real RepViT, narrower and shallower
LCNETV2_SMALL = {"scale": 0.5, "depths": (1, 1, 2, 1)}


def _case(case_id: str, make, size: int, options: dict | None = None, train: bool = False, then=None,
          slow: bool = False) -> Any:
    return pytest.param(make, size, options or {}, train, then, id=case_id,
                        marks=[pytest.mark.slow] if slow else [])


IDENTITY = [  # a real model's factory, input size, inject options, training mode too, then a check of the result
    _case("densenet-timm", _tiny_densenet("timm"), 32, then=_densenet_training_too),
    _case("densenet-torchvision", _tiny_densenet("torchvision"), 32, then=_densenet_training_too),
    _case("densenet-torchvision-memory-efficient", _tiny_densenet("torchvision", memory_efficient=True, drop_rate=0.2),
          32, then=_densenet_training_too),
    _case("densenet121-timm", lambda: randomize_norm_stats(timm.create_model("densenet121")).eval(), 32, slow=True),
    _case("densenet121-torchvision", lambda: randomize_norm_stats(torchvision.models.densenet121()).eval(), 32,
          slow=True),
    _case("dpn", _tiny_dpn(False), 32, train=True, then=_sites(5)),
    _case("dpn-b", _tiny_dpn(True), 32, train=True, then=_sites(5)),
    _case("edgenext", _real("edgenext_xx_small"), 64, then=_edgenext_se_takes_the_branch_in_nchw),
    _case("efficientformerv2", _real("efficientformerv2_s0", img_size=64), 64,  # attention biases sized for it
          then=_efficientformerv2_se_takes_the_depthwise_output, slow=True),
    _case("efficientvim", _real("efficientvim_m1"), 64, {"fill": True},  # before the gate alpha[3] and the addition
          then=_se_takes_the_output_of("ffn", size=lambda b: b.ffn.fc1.conv.in_channels)),
    _case("efficientvit", lambda: timm.create_model("efficientvit_l1").eval(), 32, then=_efficientvit_sites),
    _case("repghostnet", _real("repghostnet_050"), 64, {"fill": True}, then=_ghost_slots_filled),
    _case("ghostnet", _real("ghostnet_050"), 64, {"fill": True}, then=_ghost_slots_filled, slow=True),
    _case("hgnetv2", _real("hgnetv2_b0"), 64),
    _case("cpubone", _real("cpubone_nano"), 64, then=_cpubone_se_takes_the_expanded_map),
    _case("csatv2-small", _real("csatv2", depths=(1, 1, 3, 3)), 64, then=_csatv2_se_takes_the_gated_branch),
    _case("csatv2", _real("csatv2"), 64, slow=True),
    _case("pvt-small", _real("pvt_v2_b0", depths=(1, 1, 1, 1)), 32, then=_pvt_se_takes_the_depthwise_map),
    _case("pvt", _real("pvt_v2_b0"), 64, slow=True),
    _case("visformer-64", _real("visformer_tiny", img_size=64), 64,  # position embeddings fix the input size
          then=_visformer_se_takes_the_branch_output),
    _case("visformer", _real("visformer_tiny"), 224, slow=True),
    _case("xcit-small", _real("xcit_nano_12_p16_224", depth=2, cls_attn_layers=1), 32, then=_xcit_se_takes_the_lpi_map),
    _case("xcit", _real("xcit_nano_12_p16_224"), 64, slow=True),
    _case("iformer", _real("iformer_t"), 32, slow=True),
    _case("lcnetv2", _real("lcnetv2_small", **LCNETV2_SMALL), 64, {"fill": True}),
    _case("lowformer", _real("lowformer_b0"), 32, slow=True),
    _case("mambaout", _real("test_mambaout"), 32, then=_mambaout_se_scales_the_conv_output),
    _case("nfnet", _no_attention_nfnet, 32, train=True, then=_sites(4)),
    _case("rdnet-se", _real("rdnet_tiny", **RDNET_SMALL), 64, {"fill": True, "attn_layer": "se"}, slow=True),
    _case("rdnet-ese", _real("rdnet_tiny", **RDNET_SMALL), 64, {"fill": True, "attn_layer": "ese"}, slow=True),
    _case("repvit", _real("repvit_m0_9", **REPVIT_SMALL), 64, {"fill": True}),
    _case("rexnet", _real("rexnet_100", width_mult=0.5), 64, {"fill": True}, then=_rexnet_se_slots),
    _case("selecsls", _tiny_selecsls, 32, train=True, then=_sites(4)),
    _case("shvit", _real("shvit_s1"), 64, {"fill": True},  # before the FFN residual's addition
          then=_se_takes_the_output_of("ffn.m", size=lambda b: b.ffn.m.pw1.c.in_channels)),
    _case("swiftformer", _real("swiftformer_xs"), 64,  # SE before the layer scale
          then=_se_takes_the_output_of("", fed_by="layer_scale", size=lambda b: b.dwconv.in_channels)),
    _case("ese-vovnet39b", _real("ese_vovnet39b", **VOVNET_SMALL), 64, {"fill": True, "attn_layer": "se"}),
    _case("vovnet39a", _real("vovnet39a", **VOVNET_SMALL), 64, {"fill": False, "attn_layer": "se"}, slow=True),
    _case("eca-vovnet39b", _real("eca_vovnet39b", **VOVNET_SMALL), 64, {"fill": True, "attn_layer": "eca"}, slow=True),
    _case("xception-legacy", _tiny_legacy_xception, 32, train=True, then=_sites(3)),
    _case("xception-aligned", _tiny_aligned(False), 32, train=True, then=_sites(3)),
    _case("xception-aligned-preact", _tiny_aligned(True), 32, train=True, then=_sites(3)),
]


@pytest.mark.parametrize(("make", "size", "options", "train", "then"), IDENTITY)
def test_identity_init_reproduces_a_real_model(make, size, options, train, then):
    base = make()
    injected, report = assert_identity_reproduces(base, size, train=train, **options)
    if then is not None:
        then(injected, base, report)


# --- TorchScript and torch.export -------------------------------------------------------------------------------


def _script(case_id: str, make, size: int, options: dict | None = None, scripts: bool | None = None,
            where: str = "") -> Any:
    return pytest.param(make, size, options or {}, scripts, where, id=case_id, marks=pytest.mark.slow)


SCRIPTS = [  # a real model's factory, input size, inject options, whether it must script (None: where the base does),
    # and where an inserted module must be
    _script("densenet121-timm", lambda: randomize_norm_stats(timm.create_model("densenet121")).eval(), 32,
            {"init": "identity"}, scripts=True),
    _script("densenet121-torchvision", lambda: randomize_norm_stats(torchvision.models.densenet121()).eval(), 32,
            {"init": "identity"}, scripts=True),
    _script("dpn48b", lambda: timm.create_model("dpn48b").eval(), 32, scripts=True, where="features.conv2_1.se"),
    _script("edgenext", _real("edgenext_xx_small"), 64),
    _script("efficientformerv2", _real("efficientformerv2_s0", img_size=64), 64),
    _script("efficientvim", _real("efficientvim_m1"), 64, {"fill": True}),
    *(_script(n, _real(n), 64, {"fill": True}) for n in ("ghostnet_050", "ghostnetv3_050", "repghostnet_050")),
    _script("hgnetv2", _real("hgnetv2_b0"), 64),
    _script("cpubone", _real("cpubone_nano"), 64),
    _script("csatv2", _real("csatv2"), 64),
    _script("pvt", _real("pvt_v2_b0"), 64),
    _script("visformer", _real("visformer_tiny", img_size=64), 64),
    _script("xcit", _real("xcit_nano_12_p16_224"), 64),
    _script("iformer", _real("iformer_t"), 32),
    _script("lcnetv2", _real("lcnetv2_small", **LCNETV2_SMALL), 64, {"fill": True}),
    _script("lowformer", _real("lowformer_b0"), 32),
    _script("mambaout", _real("test_mambaout"), 32),
    _script("nfnet", _no_attention_nfnet, 32, scripts=True),
    _script("rdnet", _real("rdnet_tiny", **RDNET_SMALL), 64, {"fill": True}),
    _script("repvit", _real("repvit_m0_9", **REPVIT_SMALL), 64, {"fill": True}),
    _script("rexnet", _real("rexnet_100"), 64, {"fill": True}),
    # timm's SelecSLS does not script (SelectSeq's torch.cat of an unannotated list); torch.export works
    _script("selecsls", _tiny_selecsls, 32, scripts=False),
    _script("shvit", _real("shvit_s1"), 64, {"fill": True}),
    _script("swiftformer", _real("swiftformer_xs"), 64),
    *(_script(n, _real(n, **VOVNET_SMALL), 64, {"fill": True}) for n in ("vovnet39a", "ese_vovnet39b")),
    _script("xception-legacy", _tiny_legacy_xception, 32, scripts=True),
    _script("xception-aligned-preact", _tiny_aligned(True), 32, scripts=True),
]


@pytest.mark.parametrize(("make", "size", "options", "scripts", "where"), SCRIPTS)
def test_scripts_and_exports(make, size, options, scripts, where):
    injected, scripted = assert_scripts_and_exports(make(), size, **options)
    assert scripts is None or scripted == scripts
    assert any(is_attention(m) for m in injected.modules())
    assert not where or is_attention(injected.get_submodule(where))
