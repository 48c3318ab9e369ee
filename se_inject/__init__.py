"""se-inject: put Squeeze-and-Excitation blocks into timm/torchvision models where the SE paper puts them.

Importing the package is cheap; torch is imported on first use of a function that needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    CheckpointError,
    NoSitesError,
    OutputExistsError,
    RecipeFileError,
    SEInjectError,
    SurgeryError,
    UnknownModelError,
    UnknownRecipeError,
    UsageError,
    WeightsError,
)

__version__ = "0.1.0"

_LAZY = {
    "get_recipe": "engine.recipe_files",
    "list_recipes": "engine.recipe_files",
    "load_recipe_file": "engine.recipe_files",
    "inject": "api",
    "Report": "report",
    "make_plan": "engine.planning",
    "wrap_features": "io.features",
    "find_sites": "engine.find",
    "apply_plan": "engine.surgery",
    "count": "engine.measure",
    "Plan": "engine.plan",
    "Site": "engine.plan",
    "Settings": "settings",
    "SESettings": "settings",
    "create_attention": "layers.attention",
    "list_attention": "layers.attention",
    "SqueezeExcite": "layers.squeeze_excite",
    "build_model": "engine.build",
    "resolve_model": "engine.resolve",
    "ModelSpec": "engine.resolve",
    "save": "api",
    "load": "io.checkpoint",
    "read_plan": "io.checkpoint",
    "new_parameters": "tools.finetune",
}

if TYPE_CHECKING:
    from .api import inject, save
    from .engine.build import build_model
    from .engine.find import find_sites
    from .engine.measure import count
    from .engine.plan import Plan, Site
    from .engine.planning import make_plan
    from .engine.recipe_files import get_recipe, list_recipes, load_recipe_file
    from .engine.resolve import ModelSpec, resolve_model
    from .engine.surgery import apply_plan
    from .io.checkpoint import load, read_plan
    from .io.features import wrap_features
    from .layers.attention import create_attention, list_attention
    from .layers.squeeze_excite import SqueezeExcite
    from .report import Report
    from .settings import SESettings, Settings
    from .tools.finetune import new_parameters


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names, the lazily loaded ones included (tab completion)."""
    return sorted({*globals(), *_LAZY})


__all__ = [
    "CheckpointError",
    "ModelSpec",
    "NoSitesError",
    "OutputExistsError",
    "Plan",
    "RecipeFileError",
    "Report",
    "SEInjectError",
    "SESettings",
    "Settings",
    "Site",
    "SqueezeExcite",
    "SurgeryError",
    "UnknownModelError",
    "UnknownRecipeError",
    "UsageError",
    "WeightsError",
    "__version__",
    "apply_plan",
    "build_model",
    "count",
    "create_attention",
    "find_sites",
    "get_recipe",
    "inject",
    "list_attention",
    "list_recipes",
    "load",
    "load_recipe_file",
    "make_plan",
    "new_parameters",
    "read_plan",
    "resolve_model",
    "save",
    "wrap_features",
]
