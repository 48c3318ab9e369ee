"""SE feature extractors: timm's features_only wrappers around the SE model, from inject and from load."""

from __future__ import annotations

import pytest
import timm
import torch

import se_inject
from se_inject.errors import UsageError
from se_inject.layers import SqueezeExcite


def _n_se(model: torch.nn.Module) -> int:
    return sum(isinstance(m, SqueezeExcite) for m in model.modules())


def _plain_features(name: str, se_model: torch.nn.Module, **kwargs):
    """timm's own extractor of the plain model, holding the SE model's base weights."""
    plain = timm.create_model(name, features_only=True, **kwargs)
    state = se_model.state_dict()
    own = plain.state_dict()
    plain.load_state_dict({k: state[k] for k in own}, strict=True)
    return plain.eval()


@pytest.mark.parametrize(("name", "kwargs"), [
    ("test_convnext", {"out_indices": (1, 2, 3)}),  # FeatureListNet
    ("test_efficientnet", {"out_indices": (1, 2)}),  # EfficientNetFeatures: a class of its own
    ("test_resnet", {"feature_cls": "fx", "out_indices": (2, 3)}),  # FeatureGraphNet
])
def test_inject_builds_timms_feature_extractor_around_the_se_model(name, kwargs):
    model, report = se_inject.inject(name, se_inject.Settings(init="identity", fill=True), seed=0)
    features = se_inject.wrap_features(model, report.plan, **kwargs)
    reference = timm.create_model(name, features_only=True, **kwargs)
    assert type(features) is type(reference)
    assert 0 < _n_se(features) <= len(report.plan.sites)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = features.eval()(x)
        expected = _plain_features(name, features, **kwargs)(x) if name == "test_efficientnet" else None
    assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in reference.eval()(x)]
    if expected is not None:  # identity init: the SE extractor computes what the plain one does
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_a_hook_feature_extractor_of_timm_is_refused_with_what_to_do():
    hooked = timm.create_model("xception41", features_only=True)
    with pytest.raises(UsageError, match=r"features_only=True"):
        se_inject.inject(hooked, device="meta")
    with pytest.raises(UsageError, match=r"features_only=True"):
        se_inject.inject(timm.create_model("resnet18", features_only=True, feature_cls="fx"), device="meta")


def test_features_only_is_for_timm_names():
    model, report = se_inject.inject("torchvision:resnet18", device="meta")
    with pytest.raises(UsageError, match="BackboneWithFPN"):
        se_inject.wrap_features(model, report.plan)


def test_load_gives_a_feature_extractor_and_takes_one_as_model(tmp_path):
    model, report = se_inject.inject("test_convnext", seed=0)
    se_inject.save(model, report.plan, tmp_path / "out")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.eval().forward_intermediates(x, indices=(1, 2, 3), intermediates_only=True)
        features = se_inject.load(tmp_path / "out", features_only=True, out_indices=(1, 2, 3))
        assert all(torch.equal(a, b) for a, b in zip(features(x), expected, strict=True))
        given = se_inject.load(tmp_path / "out", model=timm.create_model("test_convnext", features_only=True,
                                                                         out_indices=(1, 2, 3)))
        assert type(given) is type(features)
        assert all(torch.equal(a, b) for a, b in zip(given(x), expected, strict=True))
