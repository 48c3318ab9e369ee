"""Models beyond image classification: every torchvision model by name, detection, segmentation, video (3-D SE) and
optical flow, on the smallest model of each task (tiny inputs; the big ones behind the slow marker)."""

from __future__ import annotations

import json
from pathlib import Path

import net1d
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import get_model

import se_inject
from se_inject.engine.build import build_model
from se_inject.engine.inputs import default_input_size, parse_input_size
from se_inject.engine.meta import meta_copy
from se_inject.engine.resolve import ModelSpec, resolve_model
from se_inject.engine.tasks import model_task, torchvision_task
from se_inject.errors import ExportError, NoSitesError, UsageError
from se_inject.io.export import export
from se_inject.layers import EffectiveSqueezeExcite, EfficientChannelAttention, SqueezeExcite


def _se_params(channels: int, rd: int) -> int:
    return 2 * channels * rd + rd + channels


def _inserted(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SqueezeExcite)}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))


# --- names -----------------------------------------------------------------------------------------------------


def test_every_torchvision_model_resolves_with_its_task():
    names = torchvision.models.list_models()
    assert len(names) == 121
    tasks = {}
    for name in names:
        assert resolve_model(f"torchvision:{name}") == ModelSpec("torchvision", name)
        tasks[name] = torchvision_task(name)
    assert tasks["fasterrcnn_resnet50_fpn"] == "detection"
    assert tasks["deeplabv3_resnet50"] == "segmentation"
    assert tasks["r3d_18"] == "video"
    assert tasks["raft_small"] == "optical_flow"
    assert tasks["quantized_resnet18"] == "quantization"
    assert tasks["resnet18"] == "classification"
    assert resolve_model("fasterrcnn_resnet50_fpn") == ModelSpec("torchvision", "fasterrcnn_resnet50_fpn")


def test_weight_tags_resolve_through_torchvisions_enums():
    assert resolve_model("torchvision:fasterrcnn_resnet50_fpn.COCO_V1").name == "fasterrcnn_resnet50_fpn.COCO_V1"
    assert resolve_model("torchvision:r3d_18.DEFAULT").name == "r3d_18.KINETICS400_V1"
    with pytest.raises(se_inject.errors.UnknownModelError, match="COCO_V1"):
        resolve_model("torchvision:fasterrcnn_resnet50_fpn.IMAGENET1K_V1")


def test_detection_and_segmentation_models_build_without_downloading(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    for name in ("fasterrcnn_resnet50_fpn", "ssd300_vgg16", "deeplabv3_resnet50", "ssdlite320_mobilenet_v3_large",
                 "fasterrcnn_resnet50_fpn.COCO_V1", "deeplabv3_resnet50.COCO_WITH_VOC_LABELS_V1"):
        build_model(resolve_model(f"torchvision:{name}"), device="meta")


def test_a_tagged_name_builds_the_architecture_its_weights_need():
    """COCO detectors freeze their BatchNorm and segmentation weights bring an auxiliary head: the tagged build
    has exactly the keys torchvision's own builder gives with those weights (so a saved folder loads back)."""
    plain = build_model(ModelSpec("torchvision", "fasterrcnn_resnet50_fpn"), device="meta")
    tagged = build_model(ModelSpec("torchvision", "fasterrcnn_resnet50_fpn.COCO_V1"), device="meta")
    assert type(plain.backbone.body.bn1) is nn.BatchNorm2d
    assert type(tagged.backbone.body.bn1) is torchvision.ops.FrozenBatchNorm2d
    assert not any(k.endswith("num_batches_tracked") for k in tagged.backbone.body.state_dict())
    seg = build_model(ModelSpec("torchvision", "deeplabv3_resnet50.COCO_WITH_VOC_LABELS_V1"), device="meta")
    assert seg.aux_classifier is not None and seg.classifier[-1].out_channels == 21
    assert build_model(ModelSpec("torchvision", "deeplabv3_resnet50"), device="meta").aux_classifier is None


# --- input sizes -------------------------------------------------------------------------------------------------


def test_default_input_sizes_come_from_the_weights_and_the_model():
    def size(name):
        spec = ModelSpec("torchvision", name)
        return default_input_size(spec, build_model(spec, device="meta"))

    assert size("r3d_18") == (3, 16, 112, 112)  # crop 112, clip_len=16 in the weights' docs
    assert size("s3d") == (3, 128, 224, 224)
    assert size("deeplabv3_resnet50") == (3, 520, 520)  # the weights' resize size
    assert size("fasterrcnn_resnet50_fpn") == (3, 800, 800)  # the transform's short side
    assert size("ssd300_vgg16") == (3, 300, 300)
    assert size("raft_small") == (3, 368, 496)


def test_a_vit_is_planned_at_the_size_it_is_built_for():
    def size(name):
        spec = resolve_model(name)
        return default_input_size(spec, build_model(spec, device="meta"))

    assert size("torchvision:vit_h_14") == (3, 224, 224)  # untagged: built for 224; its first weights' crop is 518
    assert size("torchvision:vit_h_14.IMAGENET1K_SWAG_E2E_V1") == (3, 518, 518)  # those weights' architecture
    assert size("torchvision:vit_b_16.IMAGENET1K_SWAG_E2E_V1") == (3, 384, 384)


@pytest.mark.parametrize(("value", "expected"), [
    ("112", (3, 16, 112, 112)), ("112x128", (3, 16, 112, 128)), ("8,112,112", (3, 8, 112, 112)),
    ("1,8,64,64", (1, 8, 64, 64)), ((3, 4, 32, 32), (3, 4, 32, 32)),
])
def test_video_input_sizes(value, expected):
    assert parse_input_size(value, "video", (3, 16, 112, 112)) == expected


@pytest.mark.parametrize(("value", "task"), [("3,8,64,64", "classification"), ("1,2,3,4,5", "video"),
                                             ("3,0,64,64", "video"), ("a,b", "video")])
def test_wrong_input_sizes_are_usage_errors(value, task):
    with pytest.raises(UsageError, match="invalid input size"):
        parse_input_size(value, task)


def test_a_video_size_for_an_image_model_says_so():
    with pytest.raises(UsageError, match="C,T,H,W is for video models"):
        se_inject.inject("torchvision:resnet18", device="meta", input_size="3,8,64,64")


# --- N-d SE ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 16, 9), (2, 16, 5, 6, 7), (2, 16, 6, 7)])
def test_se_squeezes_every_dimension_after_the_channels(shape):
    se = SqueezeExcite(16, rd_channels=8)
    x = torch.randn(shape)
    dims = tuple(range(2, len(shape)))
    s = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean(dims)[..., None, None])))).flatten(1)
    expected = x * s.reshape(*s.shape, *[1] * len(dims))
    torch.testing.assert_close(se(x), expected)
    for module in (EfficientChannelAttention(16, 3), EffectiveSqueezeExcite(16)):
        assert module(x).shape == x.shape


def test_se_keeps_timms_state_dict_keys():
    assert list(SqueezeExcite(16, rd_channels=8).state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


@pytest.mark.parametrize("shape", [(2, 8, 5), (2, 8, 3, 4, 5)])
def test_nd_se_scripts(shape):
    se = SqueezeExcite(8, rd_channels=8).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(torch.jit.script(se)(x), se(x))


# --- video -------------------------------------------------------------------------------------------------------


def test_video_gets_3d_se_with_exact_counts():
    """mc3_18 at 3x4x32x32: 8 BasicBlocks, SE-ResNet widths; params, MACs and elementwise ops against the layers'
    own formulas and the model's modules."""
    injected, report = se_inject.inject("torchvision:mc3_18", device="meta", seed=0, input_size="4,32,32")
    assert report.plan.input_size == (3, 4, 32, 32)
    sites = report.site_rows()
    assert [s["channels"] for s in sites] == [64, 64, 128, 128, 256, 256, 512, 512]
    base = build_model(ModelSpec("torchvision", "mc3_18"), device="meta")
    assert report.before.params == sum(p.numel() for p in base.parameters())
    delta = sum(_se_params(s["channels"], s["squeeze_channels"]) for s in sites)
    assert report.after.params - report.before.params == delta
    assert sum(p.numel() for m in _inserted(injected).values() for p in m.parameters()) == delta
    assert report.after.macs - report.before.macs == sum(2 * s["channels"] * s["squeeze_channels"] for s in sites)
    with FlopCounterMode(display=False) as flops:
        base(torch.empty(1, 3, 4, 32, 32, device="meta"))
    assert report.before.macs == flops.get_total_flops() // 2
    for s in sites:
        c, t, h, w = s["feature_map"]  # 3-D: pool reads C*T*H*W, ReLU on rd, sigmoid on C, scale writes C*T*H*W
        assert s["elementwise_ops"] == 2 * c * t * h * w + s["squeeze_channels"] + c


def test_video_identity_reproduces_the_logits():
    base = get_model("mc3_18", weights=None).eval()
    injected, _ = se_inject.inject(base, se_inject.Settings(init="identity"), seed=0, input_size=(3, 4, 32, 32))
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(injected.eval()(x), base(x))


@pytest.mark.slow
def test_video_round_trips_and_scripts(tmp_path):
    base = get_model("mc3_18", weights=None).eval()
    injected, report = se_inject.inject(base, seed=0, input_size=(3, 4, 32, 32))
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        expected = injected.eval()(x)
    se_inject.save(injected, report.plan, tmp_path / "out")
    loaded = se_inject.load(tmp_path / "out", model=get_model("mc3_18", weights=None))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), expected)
        assert torch.equal(torch.jit.script(injected)(x), expected)


def test_cbam_is_refused_for_3d_maps():
    with pytest.raises(UsageError, match="cbam is defined for 2-D maps"):
        se_inject.inject("torchvision:mc3_18", se_inject.Settings(attn_layer="cbam"), device="meta",
                         input_size="4,32,32")
    _, report = se_inject.inject("torchvision:mc3_18", se_inject.Settings(attn_layer="eca"), device="meta",
                                 input_size="4,32,32")
    assert len(report.plan.sites) == 8


# --- 1-D --------------------------------------------------------------------------------------------------------

NET1D = Path(__file__).with_name("net1d.py")


def test_1d_model_gets_1d_se_with_exact_counts():
    """Conv1d residual blocks, (N, C, L) maps: SE-ResNet's place, pooled over L; every count against the model's
    own modules and the flop counter."""
    base = net1d.make()
    assert model_task(base) == "sequence"
    _, report = se_inject.inject(base, device="meta", seed=0, input_size="2,100")
    assert report.plan.input_size == (2, 100)
    blocks = [n for n, m in base.named_modules() if isinstance(m, net1d.Block1d)]
    sites = report.site_rows()
    assert [s["path"] for s in sites] == blocks
    assert [s["channels"] for s in sites] == [base.get_submodule(b).bn2.num_features for b in blocks]
    assert report.before.params == sum(p.numel() for p in base.parameters())
    assert report.after.params - report.before.params == sum(_se_params(s["channels"], 8) for s in sites)
    with FlopCounterMode(display=False) as flops:
        meta_copy(base)(torch.empty(1, 2, 100, device="meta"))
    assert report.before.macs == flops.get_total_flops() // 2
    assert report.after.macs - report.before.macs == sum(2 * s["channels"] * 8 for s in sites)
    for s in sites:
        c, length = s["feature_map"]  # pool reads C*L, ReLU on rd, sigmoid on C, scale writes C*L
        assert s["elementwise_ops"] == 2 * c * length + 8 + c


def test_1d_model_identity_save_load_from_the_cli(tmp_path):
    """FILE.py:factory -> --init identity: the base's outputs exactly; the saved folder loads back (and exports)."""
    from typer.testing import CliRunner

    from se_inject.cli.commands import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, [f"{NET1D}:make", "--input-size", "2,100", "--init", "identity", "--seed", "0",
                                      "-o", str(out), "--json"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["input_size"] == [2, 100]
    base = net1d.make().eval()
    loaded = se_inject.load(out, model=net1d.make()).eval()
    assert len(_inserted(loaded)) == 3
    base.load_state_dict({k: v for k, v in loaded.state_dict().items() if ".se." not in k})
    x = torch.randn(3, 2, 100)
    with torch.no_grad():
        assert torch.equal(loaded(x), base(x))
    result = export(loaded, se_inject.read_plan(out), "torchscript", tmp_path / "model.pt")
    assert result.relative_diff == 0


@pytest.mark.slow
def test_1d_model_round_trips_with_trained_se(tmp_path):
    injected, report = se_inject.inject(net1d.make(), seed=0, input_size=(2, 64))
    x = torch.randn(2, 2, 64)
    with torch.no_grad():
        expected = injected.eval()(x)
    se_inject.save(injected, report.plan, tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(se_inject.load(tmp_path / "out", model=net1d.make()).eval()(x), expected)


@pytest.mark.parametrize(("value", "expected"), [("100", (2, 100)), ("4,100", (4, 100)), ((2, 64), (2, 64))])
def test_1d_input_sizes(value, expected):
    assert parse_input_size(value, "sequence", (2, 224)) == expected


@pytest.mark.parametrize(("value", "message"), [
    ("3,32,32", r"expected L or C,L \(a 1-D model\) \(C,H,W is for image models\)"),
    ("2,0", "with positive integers"), ("a", "with positive integers"), ("1,2,3,4", "C,T,H,W is for video"),
])
def test_wrong_1d_input_sizes_are_usage_errors(value, message):
    with pytest.raises(UsageError, match=message):
        se_inject.inject(net1d.make(), device="meta", input_size=value)


def test_cbam_is_refused_for_1d_maps():
    with pytest.raises(UsageError, match=r"cbam is defined for 2-D maps.*takes a 1-D map"):
        se_inject.inject(net1d.make(), se_inject.Settings(attn_layer="cbam"), device="meta", input_size="2,100")
    _, report = se_inject.inject(net1d.make(), se_inject.Settings(attn_layer="eca"), device="meta", input_size="2,100")
    assert len(report.plan.sites) == 3


# --- detection ---------------------------------------------------------------------------------------------------


def _backbone_macs(model: nn.Module, image: torch.Tensor) -> int:
    """MACs of the detector's backbone at the size its own transform makes of `image` (run on a real image)."""
    with torch.no_grad():
        size = meta_copy(model).eval().transform([image.to("meta")])[0].tensors.shape
    with FlopCounterMode(display=False) as flops:
        meta_copy(model.backbone).eval()(torch.empty(size, device="meta"))
    return flops.get_total_flops() // 2


def test_faster_rcnn_gets_se_resnet50s_16_bottlenecks_with_exact_counts():
    _, report = se_inject.inject("torchvision:fasterrcnn_resnet50_fpn", device="meta", seed=0)
    sites = report.site_rows()
    assert [s["path"] for s in sites][:3] == ["backbone.body.layer1.0", "backbone.body.layer1.1",
                                              "backbone.body.layer1.2"]
    assert all(s["path"].startswith("backbone.body.") for s in sites)
    seresnet = build_model(ModelSpec("timm", "seresnet50"), device="meta")
    widths = [(m.fc1.in_channels, m.fc1.out_channels) for n, m in seresnet.named_modules() if n.endswith(".se")]
    assert [(s["channels"], s["squeeze_channels"]) for s in sites] == widths
    assert report.after.params - report.before.params == 2_530_992  # SE-ResNet-50's increase
    base = build_model(ModelSpec("torchvision", "fasterrcnn_resnet50_fpn"), device="meta")
    assert report.before.params == sum(p.numel() for p in base.parameters())
    assert report.before.macs == _backbone_macs(base, torch.empty(3, 800, 800, device="meta"))
    assert any("backbone" in note for note in report.notes)


def _vgg16_widths() -> list[int]:
    """The output widths of VGG-16's 13 convolutions, from torchvision's own VGG-16."""
    with torch.device("meta"):
        vgg = get_model("vgg16", weights=None)
    return [m.out_channels for m in vgg.features if isinstance(m, nn.Conv2d)]


def _ssd_vgg_body(ssd: nn.Module) -> list[str]:
    """Paths of the ReLU after each of VGG-16's 13 convolutions in SSD300: conv1_1-4_3 in `features`, conv5_1-5_3
    at the head of `extra.0` (before the nested pool5/fc6/fc7 Sequential); found from the model's own modules."""
    paths = []
    for prefix, seq in (("backbone.features", ssd.backbone.features), ("backbone.extra.0", ssd.backbone.extra[0])):
        children = list(seq.named_children())
        paths += [f"{prefix}.{children[i + 1][0]}" for i, (_, m) in enumerate(children) if isinstance(m, nn.Conv2d)]
    return paths


def test_ssd300_gets_se_vgg16s_13_se_with_exact_counts(tmp_path):
    """SSD300's VGG-16 body (conv5_x share a Sequential with fc6/fc7) gets SE-VGG-16's SE; fc6/fc7 and the extra
    feature layers none by default, and a recipe file of the user's adds them."""
    base = build_model(ModelSpec("torchvision", "ssd300_vgg16"), device="meta")
    _, report = se_inject.inject(base, device="meta", seed=0)
    sites = report.site_rows()
    assert [s["path"] for s in sites] == _ssd_vgg_body(base)
    assert [s["channels"] for s in sites] == _vgg16_widths()
    delta = sum(_se_params(c, max(8, c // 16)) for c in _vgg16_widths())
    assert report.after.params - report.before.params == delta
    assert report.before.params == sum(p.numel() for p in base.parameters())
    assert report.before.macs == _backbone_macs(base, torch.empty(3, 300, 300, device="meta"))
    assert report.after.macs - report.before.macs == sum(2 * s["channels"] * s["squeeze_channels"] for s in sites)
    for s in sites:
        c, h, w = s["feature_map"]
        assert s["elementwise_ops"] == 2 * c * h * w + s["squeeze_channels"] + c
    mine = tmp_path / "ssd-extra.toml"
    mine.write_text('name = "ssd-extra"\ndescription = "SE in fc6/fc7 and the extra layers too"\n'
                    '[[patterns]]\npattern = "conv-chain"\n'
                    'within = ["torchvision.models.detection.ssd.SSDFeatureExtractorVGG"]\n'
                    'paths = ["extra.0.7", "extra.[1-9]*"]\n')
    _, more = se_inject.inject(base, device="meta", seed=0, recipes=[mine])
    extra = [s for s in more.site_rows() if s["recipe"] == "ssd-extra"]
    convs = [m for n, m in base.backbone.extra.named_modules()
             if isinstance(m, nn.Conv2d) and (n.startswith("0.7.") or not n.startswith("0."))]
    assert [s["channels"] for s in extra] == [m.out_channels for m in convs]  # fc6, fc7 and 8 extra convs
    assert len(more.site_rows()) == 13 + 10


@pytest.mark.slow
def test_ssd300_identity_gives_identical_detections_and_round_trips(tmp_path):
    def ssd():
        return get_model("ssd300_vgg16", weights=None, weights_backbone=None, score_thresh=0.0,
                         detections_per_img=10, topk_candidates=20).eval()

    base = ssd()
    injected, report = se_inject.inject(base, se_inject.Settings(init="identity"), seed=0)
    assert len(report.plan.sites) == 13
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    with torch.no_grad():
        expected = base(images)
        assert len(expected[0]["boxes"]) == 10
        assert _equal(injected.eval()(images), expected)
    se_inject.save(injected, report.plan, tmp_path / "out")
    loaded = se_inject.load(tmp_path / "out", model=ssd())
    with torch.no_grad():
        assert _equal(loaded.eval()(images), expected)


def _tiny_ssdlite() -> nn.Module:
    return get_model("ssdlite320_mobilenet_v3_large", weights=None, weights_backbone=None, score_thresh=0.0,
                     detections_per_img=10, topk_candidates=20).eval()


@pytest.mark.slow
def test_detection_identity_gives_identical_boxes_scores_and_labels():
    base = _tiny_ssdlite()
    injected, report = se_inject.inject(base, se_inject.Settings(init="identity", fill=True), seed=0)
    assert all(s.path.startswith("backbone.") for s in report.plan.sites)
    assert report.before.params == sum(p.numel() for p in base.parameters())
    assert report.before.macs == _backbone_macs(base, torch.zeros(3, 640, 480))  # the transform makes it 320x320
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    with torch.no_grad():
        expected = base(images)
        got = injected.eval()(images)
    assert len(expected[0]["boxes"]) == 10
    assert _equal(got, expected)


@pytest.mark.slow
def test_detection_round_trips(tmp_path):
    with pytest.raises(NoSitesError, match="partial SE"):  # MobileNetV3 backbones: SE in some blocks by design
        se_inject.inject(_tiny_ssdlite(), device="meta")
    injected, report = se_inject.inject(_tiny_ssdlite(), se_inject.Settings(fill=True), seed=0)
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    with torch.no_grad():
        expected = injected.eval()(images)
    se_inject.save(injected, report.plan, tmp_path / "out")
    loaded = se_inject.load(tmp_path / "out", model=_tiny_ssdlite())
    with torch.no_grad():
        assert _equal(loaded.eval()(images), expected)
    result = export(loaded, report.plan, "torchscript", tmp_path / "model.pt")  # a list of images in
    assert result.relative_diff == 0
    with pytest.raises(ExportError, match="use torchscript"):
        export(loaded, report.plan, "onnx", tmp_path / "model.onnx")


@pytest.mark.slow
def test_an_se_resnet50_backbone_works_in_torchvisions_detection_builders():
    """SE ResNet-50 (torchvision's, with SE) -> BackboneWithFPN -> FasterRCNN: trains one step and detects."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    resnet, _ = se_inject.inject("torchvision:resnet50", seed=0)
    backbone = BackboneWithFPN(resnet, return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                               in_channels_list=[256, 512, 1024, 2048], out_channels=256)
    model = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64, rpn_pre_nms_top_n_train=50,
                       rpn_post_nms_top_n_train=20, box_batch_size_per_image=16)
    assert len(_inserted(model.backbone.body)) == 16
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}]
    losses = model.train()([torch.rand(3, 64, 64)], targets)
    sum(losses.values()).backward()
    assert model.backbone.body.layer1[0].se.fc2.weight.grad is not None
    with torch.no_grad():
        out = model.eval()([torch.rand(3, 64, 64)])
    assert set(out[0]) == {"boxes", "scores", "labels"}


# --- segmentation, optical flow, quantization --------------------------------------------------------------------


@pytest.mark.slow
def test_segmentation_identity_gives_identical_mask_logits():
    base = get_model("lraspp_mobilenet_v3_large", weights=None, weights_backbone=None).eval()
    injected, report = se_inject.inject(base, se_inject.Settings(init="identity", fill=True), seed=0, input_size=64,
                                        drift=True)
    assert report.before.params == sum(p.numel() for p in base.parameters())
    assert report.drift.relative_l2 == 0 and report.drift.top1_agreement is None  # mask logits, not class scores
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _equal(injected.eval()(x), base(x))


@pytest.mark.slow
def test_raft_identity_gives_identical_flows():
    base = get_model("raft_small", weights=None).eval()
    injected, report = se_inject.inject(base, se_inject.Settings(init="identity"), seed=0, input_size=128)
    assert {s.path.split(".")[0] for s in report.plan.sites} == {"feature_encoder", "context_encoder"}
    a, b = torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert _equal(injected.eval()(a, b, num_flow_updates=2), base(a, b, num_flow_updates=2))


def test_quantizable_models_are_refused_with_the_reason():
    with pytest.raises(NoSitesError, match=r"fuse_model\(\)"):
        se_inject.inject("torchvision:quantized_resnet18", device="meta")
    assert model_task(build_model(ModelSpec("torchvision", "quantized_resnet18"), device="meta")) == "quantization"


@pytest.mark.slow
def test_faster_rcnn_resnet50_identity_gives_identical_detections():
    base = get_model("fasterrcnn_resnet50_fpn", weights=None, weights_backbone=None, min_size=64, max_size=64,
                     box_score_thresh=0.0, box_detections_per_img=10, rpn_pre_nms_top_n_test=50,
                     rpn_post_nms_top_n_test=20).eval()
    injected, report = se_inject.inject(base, se_inject.Settings(init="identity"), seed=0)
    assert len(report.plan.sites) == 16
    images = [torch.rand(3, 64, 80), torch.rand(3, 70, 64)]
    with torch.no_grad():
        expected = base(images)
        assert len(expected[0]["boxes"]) == 10
        assert _equal(injected.eval()(images), expected)
        assert _equal(torch.jit.script(injected)(images)[1], expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deeplabv3_resnet50", "fcn_resnet50"])
def test_segmentation_resnet_identity(name):
    base = get_model(name, weights=None, weights_backbone=None).eval()
    injected, report = se_inject.inject(base, se_inject.Settings(init="identity"), seed=0, input_size=64)
    assert len(report.plan.sites) == 16
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _equal(injected.eval()(x), base(x))


def test_mobilenet_v3_backbones_take_torchvisions_own_squeeze_widths():
    """LR-ASPP's backbone is mobilenet_v3_large's features: --fill gives its blocks what the classifier gets."""
    _, seg = se_inject.inject("torchvision:lraspp_mobilenet_v3_large", se_inject.Settings(fill=True), device="meta",
                              seed=0)
    _, cls = se_inject.inject("torchvision:mobilenet_v3_large", se_inject.Settings(fill=True), device="meta", seed=0)
    assert [(s.channels, s.squeeze_channels) for s in seg.plan.sites] == [
        (s.channels, s.squeeze_channels) for s in cls.plan.sites]
    assert [s.path.removeprefix("backbone.") for s in seg.plan.sites] == [
        s.path.removeprefix("features.") for s in cls.plan.sites]


@pytest.mark.slow
def test_a_folder_saved_from_a_tagged_detector_loads_back(tmp_path):
    """COCO_V1 names the frozen-BatchNorm architecture (built here with random weights: nothing is downloaded)."""
    name = "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn.COCO_V1"
    injected, report = se_inject.inject(name, se_inject.Settings(fill=True), seed=0)
    norms = {type(m) for m in injected.backbone.body.modules()
             if isinstance(m, (torch.nn.BatchNorm2d, torchvision.ops.FrozenBatchNorm2d))}
    assert norms == {torchvision.ops.FrozenBatchNorm2d}
    se_inject.save(injected, report.plan, tmp_path / "out")
    loaded = se_inject.load(tmp_path / "out")
    images = [torch.rand(3, 96, 128)]
    with torch.no_grad():
        assert _equal(loaded(images), injected.eval()(images))


def test_scan_covers_every_torchvision_model_with_its_task():
    from se_inject.tools.scan import model_names, scan_one, summarize_tasks

    assert len(model_names(source="torchvision")) == 121
    rows = [scan_one(name) for name in ("torchvision:quantized_resnet18", "torchvision:ssd300_vgg16")]
    assert [(r.task, r.status) for r in rows] == [("quantization", "no-match"), ("detection", "covered")]
    assert "fuse_model" in rows[0].reason
    assert rows[1].params_delta == sum(_se_params(c, max(8, c // 16)) for c in _vgg16_widths())  # SE-VGG-16's 13
    assert summarize_tasks(rows)["detection"]["covered"] == 1


# --- compare --bench on each task's input ------------------------------------------------------------------------


class _Recorder(nn.Module):
    """Records the positional arguments of each call; the class's module names the task (`model_task`)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.calls: list[tuple] = []

    def forward(self, *args):
        self.calls.append(args)
        return args[0]


@pytest.mark.parametrize(("task", "size", "expected"), [
    ("detection", (3, 20, 24), [[(3, 20, 24), (3, 20, 24)]]),  # a list of images
    ("optical_flow", (3, 16, 24), [(2, 3, 16, 24), (2, 3, 16, 24)]),  # two frames
    ("video", (3, 4, 8, 8), [(2, 3, 4, 8, 8)]),
    ("segmentation", (3, 8, 8), [(2, 3, 8, 8)]),
])
def test_bench_times_each_task_on_its_own_input(task, size, expected):
    from se_inject.tools.bench import paired_latency

    cls = type("Model", (_Recorder,), {"__module__": f"torchvision.models.{task}.tiny"})
    base, injected = cls(), cls()
    assert model_task(base) == task
    timing = paired_latency(base, injected, size, batch=2, rounds=2, warmup=1)
    assert timing.rounds == 2 and len(base.calls) == len(injected.calls) == 3

    def shapes(arg):
        return [tuple(t.shape) for t in arg] if isinstance(arg, list) else tuple(arg.shape)

    assert [shapes(a) for a in base.calls[0]] == expected
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else all(map(torch.equal, a, b))
               for a, b in zip(base.calls[-1], injected.calls[-1], strict=True))  # the same input for both


@pytest.mark.slow
@pytest.mark.parametrize(("name", "options"), [
    ("torchvision:ssdlite320_mobilenet_v3_large", {"fill": True}),
    ("torchvision:lraspp_mobilenet_v3_large", {"fill": True, "input_size": 64}),
    ("torchvision:mc3_18", {"input_size": "4,32,32"}),
    ("torchvision:raft_small", {"input_size": 128}),
])
def test_compare_bench_on_the_smallest_model_of_each_task(name, options):
    from se_inject.tools.compare import compare_variants

    rows = compare_variants(name, ("se",), bench=True, batches=(1,), rounds=1, **options)
    _, report = se_inject.inject(name, se_inject.Settings(fill=options.get("fill", False)), device="meta", seed=0,
                                 input_size=options.get("input_size"))
    assert rows[0].params_delta == report.after.params - report.before.params
    assert rows[0].sites == len(report.plan.sites) > 0
    assert rows[0].latency[0].base_ms > 0 and rows[0].latency[0].injected_ms > 0


@pytest.mark.slow
def test_compare_cli_on_a_video_model_leaves_cbam_out():
    from typer.testing import CliRunner

    from se_inject.cli.commands import app

    result = CliRunner().invoke(app, ["compare", "torchvision:mc3_18", "--input-size", "2,16,16", "--bench",
                                      "--rounds", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["attention"]: r for r in json.loads(result.stdout)}
    assert list(rows) == ["se", "eca", "cbam", "cbam-timm", "ese"]
    for cbam in ("cbam", "cbam-timm"):  # both spatial maps are 2-D
        assert "defined for 2-D maps" in rows[cbam]["skipped"] and not rows[cbam]["latency"]
    assert all(r["sites"] == 8 and [t["batch"] for t in r["latency"]] == [1, 8] for k, r in rows.items()
               if not k.startswith("cbam"))
    result = CliRunner().invoke(app, ["compare", "torchvision:mc3_18", "--input-size", "2,16,16", "--attention",
                                      "cbam"])
    assert result.exit_code == 2 and "defined for 2-D maps" in result.output
