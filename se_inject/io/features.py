"""SE feature extractors: timm's ``features_only`` wrappers (FeatureListNet, FeatureHookNet, the fx FeatureGraphNet,
FeatureGetterNet) put around a model with SE, exactly as ``timm.create_model(name, features_only=True, ...)`` puts
them around the plain model.

SE goes into the classification model first (its plan, checkpoint and counts are the classification model's), then
the model is wrapped. Injecting into a wrapper object itself is refused: hook-based wrappers cannot be copied and
the fx one has no blocks left to match.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..engine.models import ModelSpec, check_state_dict, load_state, split_tag
from ..engine.plan import Plan
from ..engine.surgery import apply_plan
from ..errors import UsageError
from ..layers.attention import attention_classes


class _Captured(Exception):
    def __init__(self, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]):
        super().__init__()
        self.cls, self.args, self.kwargs = cls, args, kwargs


def _feature_classes() -> tuple[type, ...]:
    from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet, FeatureListNet
    from timm.models._features_fx import FeatureGraphNet

    return FeatureListNet, FeatureDictNet, FeatureHookNet, FeatureGraphNet, FeatureGetterNet


def is_feature_extractor(model: nn.Module) -> bool:
    """Whether `model` is one of timm's ``features_only`` wrappers."""
    return isinstance(model, _feature_classes())


@contextmanager
def _recording() -> Iterator[None]:
    """timm's feature classes with a constructor that raises its arguments (the classes stay, so the builder's
    ``issubclass`` checks see the real hierarchy)."""

    def init(self: Any, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        raise _Captured(type(self), args, kwargs)

    saved = {cls: cls.__dict__["__init__"] for cls in _feature_classes()}
    for cls in saved:
        cls.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        for cls, original in saved.items():
            cls.__init__ = original  # type: ignore[method-assign]


def feature_wrapper(
    spec: ModelSpec | None, **feature_kwargs: Any
) -> tuple[type, tuple[Any, ...], dict[str, Any]] | nn.Module:
    """The wrapper class and its arguments ``timm.create_model(name, features_only=True, **feature_kwargs)`` puts
    around the model (learnt from a meta-device build with the wrapper's constructor intercepted); or, for families
    whose feature extractor is a model class of its own (EfficientNet's, MobileNetV3's), that model on meta."""
    if spec is None or spec.source != "timm":
        raise UsageError(
            "features_only builds timm feature extractors, from a timm model name; for torchvision models put the "
            "SE model into torchvision's own extractors (BackboneWithFPN, create_feature_extractor)"
        )
    import timm

    try:
        with _recording(), torch.device("meta"):
            own = timm.create_model(split_tag(spec.name)[0], pretrained=False, features_only=True, **feature_kwargs)
    except _Captured as captured:
        return captured.cls, captured.args, captured.kwargs
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise UsageError(f"timm cannot build a feature extractor of {spec.name} with {feature_kwargs}: {e}") from None
    return own


def wrap_features(model: nn.Module, plan: Plan, **feature_kwargs: Any) -> nn.Module:
    """The SE `model` (`plan` applied) as the feature extractor timm builds for the plan's model with
    `feature_kwargs` (``out_indices``, ``feature_cls``, ...): timm's wrapper around it, or, where the family's
    extractor is a class of its own, that class with the plan applied and `model`'s weights."""
    found = feature_wrapper(plan.model, **feature_kwargs)
    if isinstance(found, nn.Module):
        return _own_class(model, plan, found)
    cls, args, kwargs = found
    _register_fx_leaves()
    features = cls(model, *args, **kwargs)
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg:
        features.pretrained_cfg = features.default_cfg = {k: v for k, v in cfg.items()
                                                          if k not in ("num_classes", "classifier")}
    return features


def _own_class(model: nn.Module, plan: Plan, features: nn.Module) -> nn.Module:
    names = dict(features.named_modules())
    kept = tuple(site for site in plan.sites if site.path in names)
    features = apply_plan(features, replace(plan, sites=kept), inplace=True)
    state = model.state_dict()
    wanted = features.state_dict()
    check_state_dict(features, {k: state[k] for k in wanted if k in state}, "the SE model's weights")
    load_state(features, {k: state[k] for k in wanted})
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    return features.to(device).train(model.training)


def refuse_feature_extractor(model: nn.Module) -> None:
    """A typed error saying how to get an SE feature extractor, for one of timm's wrappers given to `inject`."""
    if not is_feature_extractor(model):
        return
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or "NAME"
    raise UsageError(
        f"this is a timm feature extractor ({type(model).__name__}), not a model se-inject can rewrite; build the "
        f"SE model from the name and wrap it as timm's features_only=True does: model, report = "
        f"se_inject.inject({name!r}); se_inject.wrap_features(model, report.plan, out_indices=...), or load a saved "
        "SE model as one: se_inject.load(DIR, features_only=True)"
    )


def feature_options(model: nn.Module) -> dict[str, Any]:
    """``features_only`` options that rebuild a wrapper like `model` (its out_indices)."""
    info = getattr(model, "feature_info", None)
    indices = getattr(info, "out_indices", None)
    return {"out_indices": tuple(indices)} if indices is not None else {}


def _register_fx_leaves() -> None:
    """The attention modules stay leaves when timm's fx extractor traces an SE model (their forward branches on
    the autograd mode, which a trace must not freeze)."""
    from timm.models._features_fx import register_notrace_module


    for cls in attention_classes():
        register_notrace_module(cls)
