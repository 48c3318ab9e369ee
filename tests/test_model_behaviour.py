"""An injected model behaves like any PyTorch model: it pickles (torch.save, pickle, deepcopy, spawned processes)
and rebuilds in a fresh process with identical outputs, and it traces with torch.fx (with and without autograd) and
feature-extracts wherever the base model does."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys

import pytest
import timm
import torch
from torchvision.models.feature_extraction import create_feature_extractor

import se_inject


@pytest.fixture(scope="module", params=[
    "timm:test_resnet", *(pytest.param(n, marks=pytest.mark.slow) for n in ("torchvision:resnet18",
                                                                             "torchvision:mobilenet_v2"))])
def injected(request):
    model, report = se_inject.inject(request.param, seed=0, input_size=32)
    return model.eval(), report


def _out(model, x):
    with torch.no_grad():
        return model(x)


def test_pickle_deepcopy_and_torch_save_round_trip(injected):
    model, _ = injected
    x = torch.randn(2, 3, 32, 32)
    expected = _out(model, x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert torch.equal(_out(other, x), expected)
        assert type(other).__name__ == type(model).__name__


@pytest.mark.slow
def test_a_fresh_process_rebuilds_the_pickled_model(tmp_path):
    model, _ = se_inject.inject("torchvision:mobilenet_v2", seed=0, input_size=32)  # rewritten and fused blocks
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.save({"model": model, "x": x, "y": _out(model, x)}, tmp_path / "whole.pt")
    code = ("import torch, sys\n"
            f"d = torch.load({str(tmp_path / 'whole.pt')!r}, weights_only=False)\n"
            "with torch.no_grad():\n    y = d['model'](d['x'])\n"
            "sys.exit(0 if torch.equal(y, d['y']) else 1)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def _spawned(rank, model, x, expected, failures):
    with torch.no_grad():
        if not torch.equal(model(x), expected):
            failures.put(rank)


@pytest.mark.slow
def test_spawned_processes_receive_the_model(injected):
    model, _ = injected
    x = torch.randn(1, 3, 32, 32)
    ctx = torch.multiprocessing.get_context("spawn")
    failures = ctx.SimpleQueue()
    torch.multiprocessing.spawn(_spawned, args=(model, x, _out(model, x), failures), nprocs=1, join=True)
    assert failures.empty()


@pytest.mark.parametrize("grad", [True, False])
def test_symbolic_trace_with_and_without_autograd(injected, grad):
    model, _ = injected
    x = torch.randn(2, 3, 32, 32)
    with torch.set_grad_enabled(grad):
        traced = torch.fx.symbolic_trace(model)
    assert torch.equal(_out(traced, x), _out(model, x))


def test_fx_feature_extractors(injected):
    model, report = injected
    x = torch.randn(1, 3, 32, 32)
    last = report.plan.sites[-1].path
    with torch.no_grad():
        features = create_feature_extractor(model, return_nodes=[last])(x)[last]
        expected = {}
        model.get_submodule(last).register_forward_hook(lambda _m, _a, out: expected.setdefault("y", out))
        model(x)
    assert torch.equal(features, expected["y"])


def test_timm_fx_features_only_on_a_saved_twin(tmp_path):
    """timm's own fx feature extraction on the rebuilt SE model (features_only with feature_cls="fx")."""
    model, report = se_inject.inject("timm:test_resnet", seed=0, input_size=32)
    extractor = timm.models.create_feature_extractor(model.eval(), return_nodes={"layer2": "out"})
    with torch.no_grad():
        out = extractor(torch.randn(1, 3, 32, 32))["out"]
    assert out.shape[1] == next(s.channels for s in report.plan.sites if s.path.startswith("layer2"))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_timm_model_test_forward_fx_under_inference_mode(name):
    """timm's tests/test_models.py::test_model_forward_fx traces under inference mode: the scaling must not decide
    anything on a traced value."""
    model, _ = se_inject.inject(f"torchvision:{name}", seed=0, input_size=32)
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        traced = torch.fx.symbolic_trace(model)
        assert torch.equal(traced(x), model(x))
