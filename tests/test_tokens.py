"""SE on token features (transformer and MLP blocks): every block gets SE after its MLP, the counts are exact against
an independent count, identity init computes the base, save/load and the exports agree. Tiny configurations of each
family's own classes; the full-size models of the issue are planned on the meta device (slow)."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from timm.models import deit, mlp_mixer, swin_transformer, vision_transformer
from torchvision.models import swin_transformer as tv_swin
from torchvision.models import vision_transformer as tv_vit
from torchvision.models.video import mvit as tv_mvit

import se_inject
from se_inject.engine.patterns import match_block
from se_inject.engine.schema import plan_from_data
from se_inject.errors import UsageError
from se_inject.io.export import export
from se_inject.layers.tokens import TokenSqueezeExcite
from se_inject.settings import Settings


def _vit():
    return vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                                                num_classes=8, reg_tokens=2)


def _deit():
    return deit.VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                                           num_classes=8)


def _swin():
    return swin_transformer.SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1),
                                            num_heads=(1, 2), num_classes=8)


def _swinv2():
    return timm.models.swin_transformer_v2.SwinTransformerV2(img_size=32, patch_size=4, window_size=4, embed_dim=16,
                                                            depths=(1, 1), num_heads=(1, 2), num_classes=8)


def _mixer():
    return mlp_mixer.MlpMixer(img_size=32, patch_size=8, num_blocks=2, embed_dim=16, num_classes=8)


def _tv_vit():
    return tv_vit.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                                    num_classes=8)


def _tv_swin():
    return tv_swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                   window_size=[4, 4], num_classes=8)


def _tv_mvit():
    config = tv_mvit.MSBlockConfig
    blocks = [config(1, 16, 16, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 2, 2]),
              config(1, 16, 32, [3, 3, 3], [3, 3, 3], [1, 2, 2], [1, 1, 1])]
    return tv_mvit.MViT(spatial_size=(32, 32), temporal_size=4, block_setting=blocks, residual_pool=True,
                        residual_with_cls_embed=False, rel_pos_embed=True, proj_after_attn=True, num_classes=8)


# builder, input size, block class, anchor, prefix tokens of its sequences (None: maps, no prefix), rank of the features
FAMILIES = {
    "vit-registers": (_vit, (3, 32, 32), vision_transformer.Block, "mlp", 3),
    "deit-distilled": (_deit, (3, 32, 32), vision_transformer.Block, "mlp", 2),
    "swin": (_swin, (3, 32, 32), swin_transformer.SwinTransformerBlock, "mlp", 0),
    "swinv2-post-norm": (_swinv2, (3, 32, 32), timm.models.swin_transformer_v2.SwinTransformerV2Block, "norm2", 0),
    "mixer": (_mixer, (3, 32, 32), mlp_mixer.MixerBlock, "mlp_channels", 0),
    "torchvision-vit": (_tv_vit, (3, 32, 32), tv_vit.EncoderBlock, "mlp", 1),
    "torchvision-swin": (_tv_swin, (3, 32, 32), tv_swin.SwinTransformerBlock, "mlp", 0),
    "torchvision-mvit": (_tv_mvit, (3, 4, 32, 32), tv_mvit.MultiscaleBlock, "mlp", 1),
}


def _built(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return FAMILIES[family][0]().eval()


def _input(family: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *FAMILIES[family][1], generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=list(FAMILIES))
def injected(request):
    family = request.param
    base = _built(family)
    model, report = se_inject.inject(copy.deepcopy(base), input_size=FAMILIES[family][1], seed=0)
    return family, base, model.eval(), report


def test_every_block_gets_token_se_after_its_mlp(injected):
    family, base, _, report = injected
    _, _, block_class, anchor, prefix = FAMILIES[family]
    blocks = [path for path, m in base.named_modules() if type(m) is block_class]
    assert [s.path for s in report.plan.sites] == blocks
    for site in report.plan.sites:
        assert (site.anchor, site.position, site.pattern) == (anchor, "after", "token-residual")
        assert site.attention.channels_last
        assert (site.attention.prefix_tokens or 0) == prefix
        assert site.squeeze_channels == max(8, site.channels // 16 // 8 * 8)  # r = 16, divisor 8


def _anchor_outputs(model: torch.nn.Module, report, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Shapes of each site's anchor output, measured by hooks on the base model: the count's own evidence."""
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(path: str):
        def record(_m, _a, out) -> None:
            shapes.setdefault(path, tuple(out.shape))
        return record

    handles = [model.get_submodule(f"{s.path}.{s.anchor}").register_forward_hook(hook(s.path))
               for s in report.plan.sites]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return shapes


def test_counts_are_exact_against_an_independent_count(injected):
    family, base, model, report = injected
    shapes = _anchor_outputs(base, report, _input(family, batch=1))
    params = macs = elementwise = 0
    for site in report.plan.sites:
        shape = shapes[site.path]
        c, rd = shape[-1], site.squeeze_channels
        positions = 1
        for d in shape[1:-1]:
            positions *= d
        pooled = positions - (site.attention.prefix_tokens or 0)  # the squeeze reads the patch tokens only
        params += 2 * c * rd + rd + c
        macs += 2 * c * rd
        elementwise += c * pooled + c * positions + rd + c  # pool, scale (C.N each), ReLU, sigmoid
    data = report.to_dict()
    assert data["params"]["delta"] == params == sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in base.parameters())
    assert data["macs"]["delta"] == macs
    assert data["se_elementwise_ops"] == elementwise


def test_identity_init_computes_the_base(injected):
    family, base, _, _ = injected
    model, _ = se_inject.inject(copy.deepcopy(base), Settings(init="identity"), input_size=FAMILIES[family][1], seed=0)
    x = _input(family)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), base(x))


def test_save_load_gives_identical_outputs(injected, tmp_path):
    family, _, model, report = injected
    se_inject.save(model, report.plan, tmp_path / "o")
    loaded = se_inject.load(tmp_path / "o", model=_built(family)).eval()
    x = _input(family)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    saved = json.loads(se_inject.io.checkpoint.read_plan(tmp_path / "o").to_json())
    assert {s["attention"].get("prefix_tokens", 0) for s in saved["sites"]} == {FAMILIES[family][4]}


@pytest.mark.parametrize("fmt", ["torchscript", "exported", "onnx"])
def test_exports_agree_with_eager_at_a_dynamic_batch(injected, fmt, tmp_path):
    _, base, model, report = injected
    if fmt == "torchscript":
        try:
            torch.jit.script(copy.deepcopy(base))
        except Exception:
            pytest.skip("the base model does not script")
    result = export(model, report.plan, fmt, tmp_path / f"m.{fmt}")
    assert result.batch == "dynamic"
    assert result.max_abs_diff is None or result.relative_diff < 1e-4


def test_fx_feature_extraction_and_forward_intermediates():
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    model, _ = se_inject.inject("test_vit", seed=0)
    model.eval()
    x = torch.randn(2, 3, 160, 160)
    _, nodes = get_graph_node_names(model)
    extractor = create_feature_extractor(model, return_nodes=[nodes[-1]]).eval()
    with torch.no_grad():
        assert torch.equal(next(iter(extractor(x).values())), model(x))
        final, intermediates = model.forward_intermediates(x)
    assert len(intermediates) == len(model.blocks) and final.shape[-1] == model.embed_dim


def test_token_layer_squeezes_patch_tokens_and_scales_every_token():
    torch.manual_seed(0)
    layer = TokenSqueezeExcite(16, rd_channels=8, prefix_tokens=2).eval()

    def gate(s: torch.Tensor) -> torch.Tensor:  # SE's excitation on (B, C) descriptors, written out
        hidden = torch.relu(s @ layer.fc1.weight.flatten(1).T + layer.fc1.bias)
        return torch.sigmoid(hidden @ layer.fc2.weight.flatten(1).T + layer.fc2.bias)

    x = torch.randn(3, 10, 16)
    torch.testing.assert_close(layer(x), x * gate(x[:, 2:].mean(1))[:, None, :])
    maps = torch.randn(2, 4, 5, 16)  # (B, H, W, C): the mean over H and W, no prefix on a map
    torch.testing.assert_close(layer(maps), maps * gate(maps.mean((1, 2)))[:, None, None, :])


@pytest.mark.parametrize("kind", ["eca", "ese"])
def test_eca_and_ese_work_on_tokens(kind):
    base = _built("vit-registers")
    model, report = se_inject.inject(copy.deepcopy(base), Settings(attn_layer=kind, init="identity"),
                                     input_size=(3, 32, 32))
    assert {s.attention.attn_layer for s in report.plan.sites} == {kind}
    x = _input("vit-registers")
    with torch.no_grad():
        assert torch.equal(model.eval()(x), base(x))


def test_cbam_runs_on_token_maps_and_is_refused_on_sequences():
    base = _built("torchvision-swin")  # (B, H, W, C) maps: CBAM's spatial attention has its 2-D positions
    model, report = se_inject.inject(copy.deepcopy(base), Settings(attn_layer="cbam", init="identity"),
                                     input_size=(3, 32, 32))
    assert len(report.plan.sites) == 2
    x = _input("torchvision-swin")
    with torch.no_grad():
        assert torch.equal(model.eval()(x), base(x))
    with pytest.raises(UsageError, match=r"needs 2-D positions .* token sequence"):
        se_inject.inject(_built("torchvision-vit"), Settings(attn_layer="cbam"), input_size=(3, 32, 32))


def test_plan_schema_reads_token_fields_and_refuses_prefix_on_nchw():
    _, report = se_inject.inject(_built("deit-distilled"), input_size=(3, 32, 32), seed=0)
    data = report.plan.to_dict()
    assert plan_from_data(data) == report.plan
    data["sites"][0]["attention"]["channels_last"] = False
    with pytest.raises(se_inject.CheckpointError, match="prefix_tokens"):
        plan_from_data(data)


def test_conv_blocks_are_not_token_matches():
    """The token pattern takes MLP branches only: a ResNet block's residual ends in a norm."""
    resnet = timm.create_model("test_resnet")
    assert match_block(resnet.layer1[0], "token-residual") is None
    assert match_block(_built("swin").layers[0].blocks[0], "token-residual") is not None


@pytest.mark.slow
@pytest.mark.parametrize(("name", "blocks"), [
    ("vit_small_patch16_224", 12), ("swin_tiny_patch4_window7_224", 12), ("mixer_b16_224", 12),
    ("deit_small_distilled_patch16_224", 12), ("torchvision:vit_b_16", 12), ("torchvision:swin_t", 12),
    ("torchvision:mvit_v2_s", 16),
])
def test_the_issue_models_get_se_in_every_block(name, blocks):
    _, report = se_inject.inject(name, device="meta")
    assert len(report.plan.sites) == blocks
    assert {s.pattern for s in report.plan.sites} == {"token-residual"}


@pytest.mark.parametrize("family", ["vit-registers", "torchvision-vit", "swin"])
def test_localvit_option_puts_se_on_the_hidden_features_before_fc2(family):
    base = _built(family)
    model, report = se_inject.inject(copy.deepcopy(base), Settings(init="identity"), recipes=["localvit"],
                                     input_size=FAMILIES[family][1], seed=0)
    anchor = FAMILIES[family][3]
    for site in report.plan.sites:
        mlp = base.get_submodule(site.path).get_submodule(anchor)
        fc2 = [m for m in mlp.modules() if isinstance(m, torch.nn.Linear)][-1]
        assert (site.position, site.pattern) == ("before", "token-ffn")
        assert base.get_submodule(site.path).get_submodule(site.anchor) is fc2
        assert site.channels == fc2.in_features  # the expanded hidden width
        assert site.squeeze_channels == fc2.in_features // 4  # LocalViT's SE4: hidden // 4
        assert site.attention.gate_layer == "hard-sigmoid"
    x = _input(family)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), base(x))


def test_localvit_is_an_option_not_a_default():
    _, report = se_inject.inject(_built("vit-registers"), input_size=(3, 32, 32), seed=0)
    assert report.plan.recipes == ("transformer",)
