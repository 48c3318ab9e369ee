"""DenseNet family (recipe `densenet`): SE on each dense layer's new features (its 3x3 conv), before the concat."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from family_checks import assert_identity_reproduces
from helpers import randomize_norm_stats
from timm.models.densenet import DenseLayer
from torch import nn
from torchvision.models.densenet import _DenseLayer

import se_inject
from se_inject import RecipeFileError, load_recipe_file

LAYERS = (DenseLayer, _DenseLayer)


def _tiny(source: str, **kwargs) -> nn.Module:
    """A DenseNet of the library's own class, small enough to run in a test (growth 8, two blocks of two layers)."""
    if source == "timm":
        model = timm.models.densenet.DenseNet(growth_rate=8, block_config=(2, 2), bn_size=2, num_classes=10, **kwargs)
    else:
        model = torchvision.models.DenseNet(8, (2, 2), 16, bn_size=2, num_classes=10, **kwargs)
    return randomize_norm_stats(model).eval()


@pytest.mark.parametrize("name", ["timm:densenet121", "torchvision:densenet121"])
def test_one_se_per_dense_layer_on_its_new_features(name):
    model, report = se_inject.inject(name, device="meta", seed=0)
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, LAYERS)]
    blocks = [m for m in model.modules() if type(m).__name__ in ("DenseBlock", "_DenseBlock")]
    assert len(layers) == sum(len(b) for b in blocks) == 58  # DenseNet-121: 6 + 12 + 24 + 16 layers
    assert report.plan.recipes == ("densenet",)
    assert [s.path for s in report.plan.sites] == [f"{p}.conv2" for p, _ in layers]
    assert [s.channels for s in report.plan.sites] == [m.conv2.out_channels for _, m in layers]  # k = 32
    assert {s.squeeze_channels for s in report.plan.sites} == {8}  # 32 / 16 = 2, to a multiple of 8
    for _, layer in layers:  # the layer's forward is its own; the SE is the 3x3 conv's
        assert isinstance(layer.conv2.se, nn.Module) and type(layer) in LAYERS and not hasattr(layer.conv1, "se")


@pytest.mark.parametrize(("source", "options"), [
    ("timm", {}), ("torchvision", {}), ("torchvision", {"memory_efficient": True, "drop_rate": 0.2}),
])
def test_identity_init_reproduces_a_real_densenet(source, options):
    base = _tiny(source, **options)
    injected, report = assert_identity_reproduces(base, 32)
    assert len(report.plan.sites) == 4
    x = torch.randn(2, 3, 32, 32)
    injected.train(), base.train()
    torch.manual_seed(0)
    out = injected(x.requires_grad_())
    torch.manual_seed(0)
    assert torch.equal(out, base(x))  # training mode (dropout, checkpointing) too


def test_a_dense_layer_still_takes_a_tensor_or_a_list():
    injected, _ = se_inject.inject(_tiny("timm"), seed=0, input_size=32)
    layer = next(m for m in injected.modules() if isinstance(m, DenseLayer))
    x = torch.randn(1, layer.conv1.in_channels, 8, 8)
    with torch.no_grad():
        assert torch.equal(layer(x), layer([x[:, :3], x[:, 3:]]))


def test_in_child_needs_a_child(tmp_path):
    path = tmp_path / "r.toml"
    for place in ('after = "."', 'slot = "se"'):
        path.write_text(f'name = "x"\n[[blocks]]\nclasses = ["a.B"]\n{place}\nin_child = true\n')
        with pytest.raises(RecipeFileError, match=r"blocks\[0\]\.in_child"):
            load_recipe_file(path)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["timm", "torchvision"])
def test_densenet121_identity_script_and_export(source):
    model = timm.create_model("densenet121") if source == "timm" else torchvision.models.densenet121()
    model = randomize_norm_stats(model).eval()
    injected, _ = se_inject.inject(model, se_inject.Settings(init="identity"), seed=0, input_size=32)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = injected.eval()(x)
        assert torch.equal(expected, model(x))
        torch.testing.assert_close(torch.jit.script(injected)(x), expected)
        torch.testing.assert_close(torch.export.export(injected, (x,)).module()(x), expected)
