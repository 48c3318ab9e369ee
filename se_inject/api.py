"""The library entry point: ``inject(model)`` runs load -> find -> plan -> apply -> measure and returns a report."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from torch import nn

from .engine.coverage import CallWatch, check_other_paths
from .engine.drift import Drift, compare, image_batch, random_batch
from .engine.drift import outputs as drift_outputs
from .engine.find import Findings, Match, find_sites
from .engine.measure import Counts, count, count_params
from .engine.memory import check_forward_memory
from .engine.meta import is_meta, meta_copy
from .engine.models import (
    ModelSpec,
    build_model,
    check_state_dict,
    default_input_size,
    load_weights,
    parse_input_size,
    read_state_dict,
    resolve_model,
    seeded,
)
from .engine.patterns import architecture_category
from .engine.plan import Plan, Settings, Site, Skip
from .engine.recipes import resolve_recipes
from .engine.surgery import apply_plan
from .engine.tasks import model_task
from .engine.verify import verify_plan
from .errors import NoSitesError, SurgeryError, UsageError
from .io.atomic import foreign_entries
from .io.checkpoint import MODEL_FILE, REPORT_FILE, write_atomically, write_checkpoint, write_text
from .io.export import FORMATS, export_writer, timm_architecture, timm_config, validate_export_options
from .io.features import refuse_feature_extractor, wrap_features
from .io.pretrained import build_pretrained, locate_pretrained
from .layers.attention import attention_spec, list_attention
from .names import GATES, INITS, MAX_DIVISOR, MAX_SEED, PLACEMENTS, VARIANTS


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
                "attention": s.attention.kind,
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


QUANTIZABLE_REFUSAL = (
    "torchvision's quantizable models are refused: their fuse_model() fuses blocks only of their exact class "
    "(type(m) is QuantizableBottleneck), which a block with SE is not, and eager-mode int8 conversion has no kernel "
    "for the float SE layers; put SE in the float model (torchvision:resnet18 for quantized_resnet18) instead"
)


def default_output_name(plan: Plan, reduction: int, model: str = "model") -> str:
    """``<model>-<attention><r>``: ``resnet50-se16`` for timm's resnet50, ``torchvision-resnet50-se16`` for
    torchvision's (the two would collide otherwise), ``resnet50-eca`` for variants without r."""
    if plan.model is None:
        name = model
    elif plan.model.source == "torchvision":
        name = f"torchvision-{plan.model.short_name}"
    else:
        name = plan.model.short_name
    kind = plan.sites[0].attention.kind
    return f"{name}-{kind}{reduction if VARIANTS[kind].uses_reduction else ''}"


def _positive_int(name: str, value: Any, minimum: int = 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"invalid {name} {value!r}: expected an integer >= {minimum}")
    return value


def validate_settings(settings: Settings) -> Settings:
    """Raise UsageError (exit 2) for option values that cannot work."""
    _positive_int("reduction", settings.reduction)
    if (_positive_int("divisor", settings.divisor) or 0) > MAX_DIVISOR:
        raise UsageError(f"invalid divisor {settings.divisor}: expected an integer in [1, {MAX_DIVISOR}]")
    _positive_int("min-channels", settings.min_channels, minimum=0)
    if settings.attention not in list_attention():
        raise UsageError(f"unknown attention {settings.attention!r}; choose from {', '.join(list_attention())}")
    if settings.gate is not None and settings.gate not in GATES:
        raise UsageError(f"unknown gate {settings.gate!r}; choose from {', '.join(GATES)}")
    if settings.init not in INITS:
        raise UsageError(f"unknown init {settings.init!r}; choose from {', '.join(INITS)}")
    if settings.placement not in PLACEMENTS:
        raise UsageError(f"unknown placement {settings.placement!r}; choose from {', '.join(PLACEMENTS)}")
    return settings


def _site(match: Match, settings: Settings) -> Site:
    defaults = match.defaults or match.recipe.defaults
    from_input = defaults.squeeze_from == "input" and match.input_channels is not None
    variant = VARIANTS[settings.attention]  # its own rounding and bias replace the recipe's (timm's CbamModule)
    rounding = variant.rounding if defaults.rounding == "divisible" and variant.rounding else defaults.rounding
    spec = attention_spec(
        settings.attention,
        match.channels,
        reduction=settings.reduction or defaults.reduction,
        divisor=settings.divisor or (variant.divisor if defaults.rounding == "divisible" else None)
        or defaults.divisor,
        round_limit=defaults.round_limit,
        squeeze_base=match.input_channels if from_input else None,
        rounding=rounding if settings.divisor is None else "divisible",
        bias=next(b for b in (settings.bias, variant.bias, defaults.bias) if b is not None),
        gate=settings.gate,
        recipe_gate=defaults.gate,
        init=settings.init,
        host_gain=match.place.slot_gain,
        act=defaults.act,
        layout=defaults.layout,
        norm=defaults.norm,
        channels_last=match.channels_last,
        prefix_tokens=match.prefix_tokens,
    )
    return Site(
        path=match.path,
        recipe=match.recipe.name,
        block=match.block,
        anchor=match.anchor,
        position="after" if match.place.position == "after" else "before",
        slot=match.place.slot,
        name=match.place.name,
        attention=spec,
        pattern=match.pattern,
        fixed_args=dict(match.fixed_args),
        placement=match.place.placement,
        source=match.place.source,
    )


def make_plan(
    findings: Findings, settings: Settings, *, model: ModelSpec | None, seed: int
) -> tuple[Plan, tuple[str, ...]]:
    """Turn findings into a frozen plan, applying the filters. Returns the plan and notes for the report."""
    kept = [
        m
        for m in findings.matches
        if (not settings.include or any(fnmatchcase(m.path, g) for g in settings.include))
        and not any(fnmatchcase(m.path, g) for g in settings.exclude)
        and m.channels >= settings.min_channels
    ]
    if not findings.matches:
        already = sum(s.already_attention for s in findings.skipped)
        if already and already == len(findings.skipped):
            first = findings.skipped[0]
            detail = first.reason.removeprefix("already has channel attention ").strip("()")
            raise NoSitesError(
                f"no block to put SE in: all {already} matching blocks already have channel attention "
                f"(e.g. {first.path or 'the model'}: {detail})",
                "already-attention",
                already,
            )
        tried = ", ".join(findings.recipes)
        if findings.skipped:
            reasons = "; ".join(sorted({s.reason for s in findings.skipped}))
            raise NoSitesError(
                f"no block to put SE in: recipes {tried} matched blocks but skipped all ({reasons})", "ineligible"
            )
        found = ", ".join(c.rsplit(".", 1)[-1] for c in findings.block_classes[:8]) or "none"
        raise NoSitesError(f"no matching blocks: tried recipes {tried}; the model's block classes: {found}")
    already = [s for s in findings.skipped if s.already_attention]
    if already and not settings.fill:
        lacking = len(findings.matches) + sum(not s.already_attention for s in findings.skipped)
        detail = already[0].reason.removeprefix("already has channel attention ").strip("()")
        raise NoSitesError(
            f"partial SE: {len(already)} matching blocks already have channel attention (e.g. {already[0].path}: "
            f"{detail}), {lacking} lack it, as the model's design has it; --fill (fill=True) adds SE to those",
            "partial-attention",
            len(already),
        )
    if not kept:
        removed = ", ".join(m.path for m in findings.matches[:6]) + (", ..." if len(findings.matches) > 6 else "")
        raise NoSitesError(f"the filters removed all {len(findings.matches)} sites ({removed})", "filtered")
    sequence = next((m for m in kept if m.channels_last and len(m.shape) == 3), None)
    if sequence is not None and not VARIANTS[settings.attention].any_rank:
        raise UsageError(
            f"--attention {settings.attention} needs 2-D positions for its spatial map, but {sequence.path} takes a "
            f"token sequence {tuple(sequence.shape[1:])} (tokens, channels); use "
            f"{', '.join(k for k, v in VARIANTS.items() if v.any_rank)}"
        )
    flat = next((m for m in kept if len(m.shape) != 4), None)
    if flat is not None and not VARIANTS[settings.attention].any_rank:
        raise UsageError(
            f"--attention {settings.attention} is defined for 2-D maps (its spatial attention is a 2-D map over H, W), "
            f"but {flat.path} takes a {len(flat.shape) - 2}-D map {tuple(flat.shape[1:])}; use "
            f"{', '.join(k for k, v in VARIANTS.items() if v.any_rank)}"
        )
    sites = tuple(_site(m, settings) for m in kept)
    notes = []
    small = [s for s in sites if settings.reduction and settings.reduction > s.channels]
    if small:
        notes.append(
            f"reduction {settings.reduction} exceeds the channels of {len(small)} sites "
            f"(e.g. {small[0].path}: {small[0].channels}); their squeeze width is clamped to "
            f"{small[0].squeeze_channels}"
        )
    conventions = {m.recipe.name: (m.defaults or m.recipe.defaults).convention for m in kept}
    for name, convention in conventions.items():
        if convention and settings.divisor is None and settings.attention in ("se", "cbam"):
            notes.append(f"squeeze width ({name}): {convention}")
    if len(kept) < len(findings.matches):
        notes.append(f"filters removed {len(findings.matches) - len(kept)} of {len(findings.matches)} sites")
    plan = Plan(
        model=model,
        sites=sites,
        input_size=findings.input_size,
        init=settings.init,
        seed=seed,
        settings=settings.to_dict(),
    )
    return plan, tuple(notes)


def inject(
    model: nn.Module | str,
    settings: Settings | None = None,
    *,
    recipe: str | list[str] | tuple[str, ...] = "auto",
    recipe_files: tuple[str | Path, ...] | list[str | Path] = (),
    input_size: int | str | tuple[int, ...] | None = None,
    weights: str | Path | None = None,
    pretrained: bool = False,
    seed: int | None = None,
    device: str = "cpu",
    inplace: bool = False,
    drift: bool | None = None,
    images: str | Path | None = None,
    before_build: Callable[[Plan, str], None] | None = None,
    features_only: bool = False,
    out_indices: tuple[int, ...] | list[int] | None = None,
    feature_cls: str | None = None,
    **options: Any,
) -> tuple[nn.Module, Report]:
    """Insert SE blocks where the recipes put them and return ``(model, report)``.

    The pipeline's steps, each usable on its own: build (`resolve_model`, `build_model`), find (`find_sites`, on a
    meta-device twin), plan (`make_plan`), verify (`verify_plan`), apply (`apply_plan`, then `check_calls`),
    measure (`count`, drift).

    Args:
        model: An ``nn.Module``, or a model name (``resnet50``, ``timm:NAME``, ``torchvision:NAME``) built here with
            random weights on `device` ("meta" plans and counts without allocating anything).
        settings: What to insert (`Settings`: attention variant, reduction, divisor, bias, gate, init, filters,
            fill); keyword `options` named like its fields override it (``inject("resnet50", reduction=8)``).
        recipe: "auto" (every recipe that matches) or recipe name(s).
        recipe_files: Extra recipe files.
        input_size: (C, H, W), HxW or N used for shapes and counts; default from the model's config.
        weights: Local checkpoint loaded into the base model first (name only).
        pretrained: Load the pretrained weights the model name's tag names (``resnet50.a1_in1k``,
            ``torchvision:resnet50.IMAGENET1K_V2``; no tag: the library's default) through timm's or torchvision's
            own loader and cache. Raises WeightsError at once when they are not cached and cannot be downloaded.
        seed: Seed of the random weights and of the SE init; random (and recorded in the plan) when None.
        inplace: Modify `model` itself instead of a copy.
        drift: Compare the outputs before and after surgery (default: when `weights`, `images` or `pretrained`).
        images: A folder of images for the drift measurement instead of random inputs.
        before_build: Called with the plan and the default output folder name once planning (on the meta device)
            is done, before the model is built with real weights: a caller's last chance to refuse cheaply (the CLI
            checks the output folder there).
        features_only, out_indices, feature_cls: Return the SE model as the feature extractor
            ``timm.create_model(name, features_only=True, out_indices=..., feature_cls=...)`` builds (timm model
            names); the plan and the counts are the classification model's, which is what `save` takes.
    """
    settings = resolve_settings(settings, options)
    seed = _seed(seed)
    recipes = [r.for_placement(settings.placement) for r in resolve_recipes(recipe, tuple(recipe_files))]
    source = _Source.open(model, weights=weights, pretrained=pretrained, inplace=inplace)
    task, size = _task_and_size(source, input_size, images)
    if str(device) != "meta":  # the saved model will run at this size: refuse one no machine here can hold
        check_forward_memory(source.planning, size)
    findings = find_sites(source.planning, recipes, size, count_base=True)  # one forward: shapes and base counts
    plan, notes = _plan_found(source, findings, settings, seed)
    first = next(m for m in findings.matches if m.path == plan.sites[0].path)
    reduction = settings.reduction or first.recipe.defaults.reduction
    if before_build is not None:
        before_build(plan, default_output_name(plan, reduction, source.display_name))
    base = source.build(device, seed, weights)
    plan, refused = verify_plan(base, plan, {m.path: m.call for m in findings.matches if m.call is not None})
    if not plan.sites:
        reasons = "; ".join(sorted({f"{s.path or 'the model'}: {s.reason}" for s in refused})[:3])
        raise NoSitesError(f"no block to put SE in: every rewrite failed its verification ({reasons})", "unverified")
    planning, plan, after, unrun = _apply_checked(source.planning, plan, size, source.fresh_planning)
    if after.output_shapes != findings.counts.output_shapes:
        raise SurgeryError(f"surgery changed the output shapes: {findings.counts.output_shapes} -> "
                           f"{after.output_shapes}")
    if base is source.planning:  # a meta run: the applied planning model is the result
        injected, drifted = planning, None
    else:
        injected, drifted = _apply_measuring_drift(base, plan, size, inplace=inplace or source.spec is not None,
                                                   drift=drift, weights=weights, images=images,
                                                   pretrained=pretrained, classes=task in ("classification",))
    site_params = {s.path: count_params(injected.get_submodule(s.module_path)) for s in plan.sites}
    if features_only:
        chosen = {k: v for k, v in (("out_indices", out_indices), ("feature_cls", feature_cls)) if v is not None}
        injected = wrap_features(injected, plan, **chosen)
        source.notes += (f"features_only: {type(injected).__name__} over the SE model; plan and counts are the "
                         "classification model's",)
    return injected, Report(
        model=str(source.spec) if source.spec else type(base).__name__,
        plan=plan,
        skipped=_in_model_order(planning, (*findings.skipped, *refused, *unrun)),
        before=findings.counts,
        after=after,
        site_params=site_params,
        feature_maps={m.path: m.shape[1:] for m in findings.matches if m.path in {s.path for s in plan.sites}},
        notes=(*source.notes, *notes),
        reduction=reduction,
        drift=drifted,
        pretrained=source.located.weights if source.located else None,
    )


def _task_and_size(source: _Source, input_size: int | str | tuple[int, ...] | None,
                   images: str | Path | None) -> tuple[str, tuple[int, ...]]:
    """The model's task and its planning input size; refuses what the task cannot take."""
    task = model_task(source.planning)
    if task == "quantization":
        raise NoSitesError(QUANTIZABLE_REFUSAL, "quantizable")
    if images is not None and task in ("video", "optical_flow"):
        raise UsageError(f"--images takes single images; a {task.replace('_', ' ')} model needs "
                         f"{'clips' if task == 'video' else 'pairs of frames'}: leave it out for random inputs")
    default_size = default_input_size(source.spec, source.planning)
    if task == "detection":
        source.notes += ("detection: planning and MACs cover the model's transform and backbone (model.backbone), "
                         "where SE goes; the heads' work depends on the detections. Parameters cover the whole model",)
    return task, parse_input_size(input_size, task, default_size) or default_size


def _plan_found(source: _Source, findings: Findings, settings: Settings, seed: int) -> tuple[Plan, tuple[str, ...]]:
    """`make_plan`, with a no-match error that says what the model is (a transformer, ...)."""
    try:
        return make_plan(findings, settings, model=source.spec, seed=seed)
    except NoSitesError as e:
        if e.reason != "no-match":
            raise
        raise NoSitesError(_no_match_message(source.planning, findings), e.reason, e.existing) from None


def resolve_settings(settings: Settings | None, options: dict[str, Any]) -> Settings:
    """`settings` (default `Settings()`) with `options` named like its fields, validated (UsageError, exit 2)."""
    names = {f.name for f in fields(Settings)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise UsageError(f"unknown option {unknown[0]!r}; settings are {', '.join(sorted(names))}")
    lists = {k: tuple(v) for k, v in options.items() if k in ("include", "exclude") and v is not None}
    return validate_settings(replace(settings or Settings(), **{**options, **lists}))


def _seed(seed: int | None) -> int:
    if seed is None:
        return secrets.randbelow(2**31)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UsageError(f"invalid seed {seed!r}: expected an integer in [0, {MAX_SEED}] (torch's seed range)")
    return seed


@dataclass
class _Source:
    """Where the model comes from: a name (built on the meta device to plan, for real once the plan stands) or the
    caller's module (planned on a meta copy)."""

    spec: ModelSpec | None
    planning: nn.Module
    base: nn.Module | None = None
    located: Any = None
    notes: tuple[str, ...] = ()

    @classmethod
    def open(cls, model: nn.Module | str, *, weights: Any, pretrained: bool, inplace: bool) -> _Source:
        if pretrained and weights is not None:
            raise UsageError("pretrained weights and a weights file exclude each other: pass one")
        if not isinstance(model, str):
            refuse_feature_extractor(model)
            if weights is not None or pretrained:
                raise UsageError("weights= and pretrained= are for model names; load weights into your module "
                                 "before calling inject")
            return cls(None, model if is_meta(model) and inplace else meta_copy(model), base=model)
        spec = resolve_model(model)
        located, notes = None, ()
        if pretrained:
            located = locate_pretrained(spec)  # fails here, before any build, when the weights cannot be had
            spec = located.spec
        elif "." in spec.name and spec.source != "python":
            notes = (f"random weights: the tag in {spec} names pretrained weights, loaded only with pretrained=True "
                     "(--pretrained)",)
        return cls(spec, build_model(spec, device="meta"), located=located, notes=notes)

    @property
    def display_name(self) -> str:
        return type(self.base).__name__ if self.base is not None else "model"

    def fresh_planning(self) -> nn.Module:
        """A new meta twin, for planning again."""
        return build_model(self.spec, device="meta") if self.spec is not None else meta_copy(self.base)

    def build(self, device: str, seed: int, weights: str | Path | None) -> nn.Module:
        """The model the plan is applied to: the caller's, or a name built once the plan stands (a model with no
        place for SE costs no real build); on the meta device, the planning twin itself."""
        if self.base is not None:
            return self.base
        assert self.spec is not None
        if str(device) == "meta":
            base = self.planning
        elif self.located is not None:
            with seeded(seed):  # parts the checkpoint does not cover (none in practice) stay reproducible
                base = build_pretrained(self.located, device=device)
        else:
            base = build_model(self.spec, device=device, seed=seed)
        if weights is not None:
            if base is self.planning:  # nothing to load into: still check that the file fits
                check_state_dict(self.planning, read_state_dict(weights), str(weights))
            else:
                load_weights(base, weights)
        return base


def _apply_measuring_drift(
    base: nn.Module, plan: Plan, size: tuple[int, ...], *, inplace: bool, drift: bool | None, weights: Any,
    images: Any, pretrained: bool, classes: bool,
) -> tuple[nn.Module, Drift | None]:
    """Apply `plan` to the real `base`; with `drift` (default: when the weights are meaningful), compare the outputs
    before and after on a fixed batch."""
    measure = (weights is not None or images is not None or pretrained) if drift is None else drift
    if not measure:
        return apply_plan(base, plan, inplace=inplace), None
    batch, described = image_batch(images, size, base) if images is not None else random_batch(size, model=base)
    before = drift_outputs(base, batch)
    injected = apply_plan(base, plan, inplace=inplace)
    return injected, compare(before, drift_outputs(injected, batch), described, classes=classes)


def _apply_checked(
    planning: nn.Module, plan: Plan, size: tuple[int, ...], fresh: Callable[[], nn.Module]
) -> tuple[nn.Module, Plan, Counts, tuple[Skip, ...]]:
    """Apply `plan` to the meta model `planning`, count it, and prove that every inserted module runs exactly once
    per call of its block, on every forward path (`se_inject.engine.coverage`: the counting forward is watched, the
    other paths run once more); sites that do not are refused, and the plan is applied again to a `fresh` meta
    model without them. Returns the applied model, the plan, its counts and the refused sites."""
    refused: list[Skip] = []
    while True:
        apply_plan(planning, plan, inplace=True)
        with CallWatch(planning, plan) as watch:
            after = count(planning, size)
        problems = watch.problems() or check_other_paths(planning, plan, size, watch)
        if not problems:
            return planning, plan, after, tuple(refused)
        refused += [Skip(s.path, s.block, s.recipe, problems[s.path]) for s in plan.sites if s.path in problems]
        plan = replace(plan, sites=tuple(s for s in plan.sites if s.path not in problems))
        if not plan.sites:
            reasons = "; ".join(f"{p}: {r}" for p, r in list(problems.items())[:3])
            raise NoSitesError(f"no block to put SE in: no inserted module runs as planned ({reasons})", "unverified")
        planning = fresh()


def _no_match_message(model: nn.Module, findings: Findings) -> str:
    """Why no recipe matched, as `scan` says it: a transformer or MLP has no convolutional block for SE."""
    category = architecture_category(model)
    found = ", ".join(c.rsplit(".", 1)[-1] for c in findings.block_classes[:8]) or "none"
    if category in ("transformer", "MLP"):
        return (f"no matching blocks: this is a {category} with no convolutional block (its only convolutions are a "
                f"stem, patch embedding, positional encoding or attention pooling), and SE recalibrates the channels "
                f"of a convolutional block's feature map; {len(findings.recipes)} recipes tried. Its blocks: {found}")
    return (f"no matching blocks ({category}): none of the {len(findings.recipes)} recipes names its blocks ({found}); "
            "write a recipe for them (see `se-inject recipes` and the README's recipe format) and pass --recipe-file")


def _in_model_order(model: nn.Module, skipped: tuple[Skip, ...]) -> tuple[Skip, ...]:
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    return tuple(sorted(skipped, key=lambda s: order.get(s.path, -1)))


def save_injected(
    model: nn.Module,
    report: Report,
    directory: str | Path,
    *,
    force: bool = False,
    exports: tuple[str, ...] = (),
    export_batch: int | None = None,
    opset: int | None = None,
) -> Report:
    """The save step: checkpoint and report, ``config.json`` where the result is exactly a timm architecture (so
    plain timm loads the folder), and the requested exports (batch axis dynamic unless `export_batch` fixes it;
    `opset` for ONNX), all written atomically. Returns the final report."""

    validate_export_options(exports, batch=export_batch, opset=opset)
    directory = Path(directory)
    architecture = timm_architecture(report.plan)
    results: list[Any] = []
    files = {MODEL_FILE: write_checkpoint(model, report.plan)}
    if architecture:
        files["config.json"] = write_text(timm_config(architecture, base=report.plan.model,
                                                      pretrained=report.pretrained is not None))
    for fmt in dict.fromkeys(exports):
        name = f"model{FORMATS[fmt]}"
        files[name] = export_writer(model, report.plan, fmt, directory / name, results, batch=export_batch,
                                    opset=opset if fmt == "onnx" else None)
    final: list[Report] = []

    def write_report(path: Path) -> None:  # runs last: the exports' results are in by then
        final.append(replace(report, output=str(directory), timm_architecture=architecture, exports=tuple(results)))
        path.write_text(json.dumps(final[0].to_dict(), indent=2) + "\n", encoding="utf-8")

    files[REPORT_FILE] = write_report
    foreign = foreign_entries(directory)
    if foreign:  # our naming, not ours: left alone, and said
        names = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        report = replace(report, notes=(*report.notes, f"left alone: {len(foreign)} entries named like se-inject's "
                                        f"temporaries that se-inject did not make ({names})"))
    write_atomically(directory, files, force=force, outputs=True)
    return final[0]
