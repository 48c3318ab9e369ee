"""timm's own model tests (timm's ``tests/test_models.py``), run on se-inject's results: forward, backward,
TorchScript under timm's JIT settings, torch.fx, feature extraction, forward_intermediates and
``timm.utils.reparameterize_model``. An SE model passes what its base model passes.

Adapted from timm: the model under test is ``se_inject.inject(name)``'s result, built at a small input size (64) so
the sample runs in seconds; the fast suite takes the tiny models, the `slow` marker the rest.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models._features_fx import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import se_inject

FAST = ["test_resnet", "test_efficientnet", "regnetx_002"]
SLOW = ["mobilenetv2_035", "efficientnet_lite0", "mobileone_s0", "cspdarknet53", "vovnet39a", "fastvit_t8"]
SIZE = 64

MODELS = [*FAST, *(pytest.param(name, marks=pytest.mark.slow) for name in SLOW)]


def _result(name: str, *, features: bool = False) -> torch.nn.Module:
    """The SE result of timm model `name` (``fill``: models with SE in some blocks get it in the others), or its
    feature extractor, the one ``timm.create_model(name, features_only=True)`` builds."""
    model, report = se_inject.inject(f"timm:{name}", se_inject.Settings(fill=True), seed=0, input_size=SIZE)
    assert report.plan.sites
    return se_inject.wrap_features(model, report.plan) if features else model


@pytest.fixture(scope="module")
def results():
    """One SE result per model name for this module, built on first use; tests copy it before changing it."""
    built: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in built:
            built[name] = _result(name)
        return copy.deepcopy(built[name])

    return get


@pytest.fixture
def timm_jit_settings():
    """timm's test configuration: the profiling executor on, profiling mode off (restored afterwards)."""
    executor = torch._C._jit_set_profiling_executor(True)
    mode = torch._C._jit_set_profiling_mode(False)
    yield
    torch._C._jit_set_profiling_executor(executor)
    torch._C._jit_set_profiling_mode(mode)


def _inputs(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE)


@pytest.mark.parametrize("name", MODELS)
def test_model_forward(results, name):
    model = results(name).eval()
    outputs = model(_inputs())
    assert outputs.shape[0] == 1
    assert not torch.isnan(outputs).any()


@pytest.mark.parametrize("name", MODELS)
def test_model_backward(results, name):
    """Every parameter, the SE modules' included, gets a gradient (timm builds with ``num_classes=42``; here the
    result's classifier is reset to 42)."""
    model = results(name)
    model.reset_classifier(42)
    model.train()
    outputs = model(_inputs(2))
    if isinstance(outputs, tuple):
        outputs = torch.cat(outputs)
    outputs.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert outputs.shape[-1] == 42
    assert not torch.isnan(outputs).any()


@pytest.mark.usefixtures("timm_jit_settings")
@pytest.mark.parametrize("name", MODELS)
def test_model_forward_torchscript(name):
    with timm.set_scriptable(True):
        model = _result(name).eval()
    x = _inputs()
    with torch.no_grad():
        expected = model(x)
        outputs = torch.jit.script(model)(x)
    assert outputs.shape[0] == 1
    assert not torch.isnan(outputs).any()
    torch.testing.assert_close(outputs, expected)


def _fx_model(model: torch.nn.Module) -> torch.nn.Module:
    """timm's `_create_fx_model` for eval: a feature extractor returning the graph's last node."""
    tracer_kwargs = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions(),
                     "param_shapes_constant": True}
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_fx(results, name):
    """Traced under inference mode, the graph computes exactly what the model computes (timm compares with ==)."""
    model = results(name).eval()
    with torch.inference_mode():
        x = _inputs()
        outputs = model(x)
        fx_outputs = torch.cat(tuple(_fx_model(model)(x).values()))
    assert torch.equal(fx_outputs, outputs)
    assert not torch.isnan(outputs).any()


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_features(name):
    model = _result(name, features=True).eval()
    expected = model.feature_info.channels()
    assert len(expected) >= 4
    outputs = model(_inputs())
    assert len(outputs) == len(expected)
    for channels, output in zip(expected, outputs, strict=True):
        assert output.shape[:2] == (1, channels)
        assert not torch.isnan(output).any()


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_intermediates(results, name):
    model = results(name).eval()
    x = _inputs()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert len(intermediates) == len(model.feature_info)
        torch.testing.assert_close(final, model.forward_features(x))


def _calibrated(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Norm statistics of `x` (one training-mode pass), so activations keep their scale: with PyTorch's defaults a
    deep random network's activations grow by orders of magnitude and float32 rounding dominates the comparison."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def _tiny_mobileone() -> torch.nn.Module:
    """A two-stage ByobNet of timm's MobileOne blocks (four conv branches, the stem one too): mobileone_s0's blocks
    in a model that injects and runs in a second."""
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

    stages = tuple(ByoBlockCfg(type="one", d=2, c=c, s=2, gs=0, br=1.0) for c in (24, 32))
    cfg = ByoModelCfg(blocks=stages, stem_chs=16, stem_type="one", stem_pool="", num_features=0,
                      block_kwargs={"num_conv_branches": 4})
    model, report = se_inject.inject(ByobNet(cfg, num_classes=10), seed=0, input_size=32)
    assert [site.slot for site in report.plan.sites] == ["attn"] * 5
    return model


@pytest.mark.parametrize("name", ["tiny-mobileone", *(pytest.param(n, marks=pytest.mark.slow)
                                                      for n in ("mobileone_s0", "fastvit_t8", "repvgg_a0"))])
def test_reparameterize_model(name):
    """``timm.utils.reparameterize_model`` (RepVGG-style branch fusion) on the result computes what the unfused
    result computes: in float64 to rounding, and in float32 as close to the float64 result as the unfused model is.
    (The SE result of a random mobileone_s0 amplifies float32 rounding far more than the base does, so a direct
    float32 comparison at a fixed tolerance measures rounding, not the rewrite.)"""
    x = torch.randn(2, 3, 32, 32)
    model = _calibrated(_tiny_mobileone() if name == "tiny-mobileone" else _result(name), x)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        fused64 = timm.utils.reparameterize_model(copy.deepcopy(model).double())(x.double())
        unfused, fused = model(x).double(), timm.utils.reparameterize_model(model)(x).double()
    scale = exact.abs().max()
    assert (fused64 - exact).abs().max() <= 1e-9 * scale
    assert (fused - exact).abs().max() <= 4 * (unfused - exact).abs().max() + 1e-6 * scale
