"""Model names, default input sizes and local weights."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from helpers import randomize_norm_stats
from safetensors.torch import save_file

import se_inject
from se_inject import UnknownModelError, UsageError, WeightsError
from se_inject.engine.build import build_model
from se_inject.engine.inputs import default_input_size, parse_input_size
from se_inject.engine.resolve import ModelSpec, resolve_model


def test_bare_names_prefer_timm_and_prefixes_force_the_source():
    assert resolve_model("resnet50") == ModelSpec("timm", "resnet50")
    assert resolve_model("torchvision:resnet50") == ModelSpec("torchvision", "resnet50")
    assert resolve_model("timm:resnet50.a1_in1k") == ModelSpec("timm", "resnet50.a1_in1k")
    assert resolve_model("resnext101_32x8d").source == "timm"
    assert resolve_model("mnasnet0_5") == ModelSpec("torchvision", "mnasnet0_5")  # only torchvision has it


@pytest.mark.parametrize("name", ["resnt50", "torchvision:resnt50", "timm:mnasnet0_5"])
def test_unknown_names_suggest_the_closest(name):
    with pytest.raises(UnknownModelError) as info:
        resolve_model(name)
    assert info.value.suggestions
    assert info.value.exit_code == 1


def test_unknown_source():
    with pytest.raises(UsageError, match="unknown model source"):
        resolve_model("keras:resnet50")


def test_default_input_sizes():
    assert default_input_size(ModelSpec("torchvision", "inception_v3")) == (3, 299, 299)
    assert default_input_size(ModelSpec("torchvision", "resnet50")) == (3, 224, 224)
    spec = ModelSpec("timm", "inception_v3")
    assert default_input_size(spec, build_model(spec, device="meta")) == (3, 299, 299)


@pytest.mark.parametrize(("value", "expected"), [(224, (3, 224, 224)), ("160", (3, 160, 160)),
                                                 ("192x256", (3, 192, 256)), ("1,64,64", (1, 64, 64))])
def test_parse_input_size(value, expected):
    assert parse_input_size(value) == expected


@pytest.mark.parametrize("value", [0, -1, "0", "a", "1,2,3,4", "3,0,4", True])
def test_parse_input_size_rejects(value):
    with pytest.raises(UsageError):
        parse_input_size(value)


@pytest.mark.parametrize("name", ["timm:test_vit", "timm:test_resnet", "torchvision:mobilenet_v2"])
def test_meta_build_skips_the_init_but_not_the_structure(name):
    """The meta build returns the weight init's in-place ops at once: names, shapes, dtypes and the parameter/buffer
    split are those of a real build."""
    spec = resolve_model(name)
    meta, real = build_model(spec, device="meta"), build_model(spec)
    def layout(model):
        return [(k, tuple(v.shape), v.dtype, isinstance(v, torch.nn.Parameter), getattr(v, "requires_grad", False))
                for k, v in [*model.named_parameters(), *model.named_buffers()]]
    assert layout(meta) == layout(real) and all(t.is_meta for t in meta.state_dict().values())
    with torch.device("meta"):  # outside the build, in-place ops on meta tensors behave as torch's
        t = torch.empty(2, 3)
    assert t.unsqueeze_(0).shape == (1, 2, 3)


def test_meta_build_of_a_constructor_that_computes_with_tensors():
    """torchvision's RegNet computes its widths with tensors: it is built on the CPU with every parameter and buffer
    moved to the meta device as it is registered; afterwards (also after a constructor that raised) modules are
    built as usual again."""
    from se_inject.engine.build import empty_weights

    spec = resolve_model("torchvision:regnet_y_400mf")
    with pytest.raises(NotImplementedError), torch.device("meta"):  # the direct route fails
        torchvision.models.get_model("regnet_y_400mf")
    meta, real = build_model(spec, device="meta"), build_model(spec)
    assert [(k, v.shape, v.dtype) for k, v in meta.state_dict().items()] == [
        (k, v.shape, v.dtype) for k, v in real.state_dict().items()]
    assert all(t.is_meta for t in meta.state_dict().values())
    assert all(p.requires_grad for p in meta.parameters()) and isinstance(meta.fc.weight, torch.nn.Parameter)
    with pytest.raises(RuntimeError, match="boom"), empty_weights():
        raise RuntimeError("boom")
    layer = torch.nn.BatchNorm2d(4)
    assert not any(t.is_meta for t in layer.state_dict().values())


def test_meta_build_allocates_nothing():
    model = build_model(ModelSpec("timm", "resnet50"), device="meta")
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_weights_load_into_the_base_before_surgery(tmp_path, fmt):
    source = randomize_norm_stats(timm.create_model("test_resnet"))
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)
    model, _ = se_inject.inject("timm:test_resnet", weights=path, seed=0)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_weights_for_another_architecture_name_the_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(torchvision.models.resnet18().state_dict(), str(path))
    with pytest.raises(WeightsError) as info:
        se_inject.inject("torchvision:resnet34", weights=path, device="meta")
    assert "missing keys" in str(info.value)
    assert "layer" in str(info.value)
    with pytest.raises(WeightsError, match="shape mismatches"):
        se_inject.inject("torchvision:resnet50", weights=path, device="meta")


def _during_build(monkeypatch, cls, work):
    """Run `work` in a second thread while `cls` is being constructed (its ``__init__`` has run) and return its
    result: the window in which a build could disturb the rest of the process."""
    import threading

    init, results = cls.__init__, []

    def init_then_work(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if threading.current_thread() is threading.main_thread():  # not in the work's own builds
            thread = threading.Thread(target=lambda: results.append(work()))
            thread.start()
            thread.join()

    monkeypatch.setattr(cls, "__init__", init_then_work)
    return results


def test_a_tagged_torchvision_build_leaves_other_threads_loading_weights(tmp_path, monkeypatch):
    """Building ``squeezenet1_0.IMAGENET1K_V1`` (the architecture of those weights, without them) patches nothing: a
    second thread that loads those very weights meanwhile gets them, through the real load functions."""
    from torchvision.models._api import WeightsEnum

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.SqueezeNet1_0_Weights.IMAGENET1K_V1
    state = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v
             for k, v in torchvision.models.squeezenet1_0().state_dict().items()}
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1])
    loads, get_state_dict = torch.nn.Module.load_state_dict, WeightsEnum.get_state_dict

    def load():
        model = torchvision.models.squeezenet1_0(weights=weights)
        patched = torch.nn.Module.load_state_dict is not loads or WeightsEnum.get_state_dict is not get_state_dict
        return patched, all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    results = _during_build(monkeypatch, torchvision.models.SqueezeNet, load)
    built = build_model(resolve_model("torchvision:squeezenet1_0.IMAGENET1K_V1"), seed=0)
    assert results == [(False, True)]
    assert not torch.equal(built.classifier[1].weight, state["classifier.1.weight"])  # random weights here
    assert built.classifier[1].out_channels == len(weights.meta["categories"])


def test_a_meta_build_that_computes_with_tensors_leaves_other_threads_modules_alone(monkeypatch):
    """torchvision's RegNet is built for the meta device by moving each tensor there as it is registered (torch's
    process-wide registration hooks): a module another thread builds meanwhile keeps real tensors."""
    results = _during_build(monkeypatch, torchvision.models.RegNet, lambda: torch.nn.Linear(2, 2).weight.is_meta)
    meta = build_model(resolve_model("torchvision:regnet_y_400mf"), device="meta")
    assert all(t.is_meta for t in meta.state_dict().values())
    assert results[-1] is False  # the last build is the one under the hooks (the direct meta build failed first)
