"""The report of an injection: the plan, what was skipped and why, and exact counts before and after."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .engine.drift import Drift
from .engine.measure import Counts
from .engine.plan import Plan, Skip
from .names import VARIANTS


@dataclass(frozen=True)
class Report:
    """What an injection did: the plan, what was skipped and why, and exact counts before and after.

    Attributes:
        model: The model's name ("timm:resnet50") or class name.
        plan: The plan that was applied.
        skipped: Matched blocks that got no SE, with the reason.
        before, after: Counts of the base and the injected model at batch 1 and ``plan.input_size``.
        site_params: Parameters of each inserted module, by site path.
        feature_maps: (C, H, W) each SE scales at ``plan.input_size``, by site path.
        notes: Things the user should know (clamped squeeze widths, filtered sites).
        reduction: The reduction of the first site's recipe or the user's; names the default output folder.
        output: Where the checkpoint went (None until saved).
        drift: How far the injected model's outputs are from the base model's (when measured).
        timm_architecture: The timm model the saved folder loads as in plain timm (``local-dir:``), if any.
        exports: What each export wrote and its maximum difference from the eager model.
        pretrained: The pretrained weights the base model was loaded with (``timm/resnet50.a1_in1k``,
            ``ResNet50_Weights.IMAGENET1K_V2``), if any.
    """

    model: str
    plan: Plan
    skipped: tuple[Skip, ...]
    before: Counts
    after: Counts
    site_params: dict[str, int]
    feature_maps: dict[str, tuple[int, int, int]]
    notes: tuple[str, ...] = ()
    reduction: int = 16
    output: str | None = None
    drift: Drift | None = None
    timm_architecture: str | None = None
    exports: tuple[Any, ...] = ()
    pretrained: str | None = None

    @property
    def default_output(self) -> str:
        """``<model>-<attention><r>``, e.g. ``resnet50-se16`` (see `default_output_name`)."""
        return default_output_name(self.plan, self.reduction, self.model)

    def site_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "path": s.path,
                "module": s.module_path,
                "recipe": s.recipe,
                "pattern": s.pattern or None,
                "placement": s.placement,
                "source": s.source or ("paper" if s.placement == "paper" else ""),
                "block": s.block,
                "anchor": s.anchor,  # where inside the block: the child (or fx node) the SE is placed against,
                "position": s.position,  # "after" its output or "before" its input ("" anchor: the block's output)
                "slot": s.slot,  # the attribute the block's forward already calls there, filled (None: rewritten)
                "attention": s.attention.attn_layer,
                "channels": s.channels,
                "squeeze_channels": s.squeeze_channels,
                "feature_map": list(self.feature_maps[s.path]),
                "params": self.site_params[s.path],
                "macs": self.after.attention_macs.get(s.module_path, 0),
                "elementwise_ops": self.after.attention_elementwise.get(s.module_path, 0),
            }
            for s in self.plan.sites
        ]

    def to_dict(self) -> dict[str, Any]:
        def delta(key: str) -> dict[str, int]:
            b, a = getattr(self.before, key), getattr(self.after, key)
            return {"before": b, "after": a, "delta": a - b}

        return {
            "model": self.model,
            "input_size": list(self.plan.input_size),
            "recipes": list(self.plan.recipes),
            "init": self.plan.init,
            "seed": self.plan.seed,
            "sites": self.site_rows(),
            "skipped": [
                {"path": s.path, "block": s.block, "recipe": s.recipe, "reason": s.reason} for s in self.skipped
            ],
            "already_attention": [s.path for s in self.skipped if s.already_attention],
            "params": delta("params"),
            "macs": delta("macs"),
            "se_elementwise_ops": self.after.attention_elementwise_ops - self.before.attention_elementwise_ops,
            "notes": list(self.notes),
            "drift": self.drift.to_dict() if self.drift else None,
            "output": self.output,
            "timm_architecture": self.timm_architecture,
            "exports": [e.to_dict() for e in self.exports],
            "pretrained": self.pretrained,
        }


def default_output_name(plan: Plan, reduction: int, model: str = "model") -> str:
    """``<model>-<attention><r>``: ``resnet50-se16`` for timm's resnet50, ``torchvision-resnet50-se16`` for
    torchvision's (the two would collide otherwise), ``resnet50-eca`` for variants without r."""
    if plan.model is None:
        name = model
    elif plan.model.source == "torchvision":
        name = f"torchvision-{plan.model.short_name}"
    else:
        name = plan.model.short_name
    kind = plan.sites[0].attention.attn_layer
    return f"{name}-{kind}{reduction if VARIANTS[kind].uses_reduction else ''}"
