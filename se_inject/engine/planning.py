"""Planning: findings and the user's settings in, a frozen plan out (`make_plan`). Changes no model."""

from __future__ import annotations

from fnmatch import fnmatchcase

from ..errors import NoSitesError, UsageError
from ..layers.attention import site_attention
from ..names import VARIANTS
from ..settings import Settings, site_settings
from .find import Findings, Match
from .plan import Plan, Site
from .resolve import ModelSpec


def _site(match: Match, settings: Settings) -> Site:
    composed = site_settings(match.defaults or match.recipe.defaults, settings)  # the one rule: `site_settings`
    spec = site_attention(composed, match.channels, input_channels=match.input_channels,
                          host_gain=match.place.slot_gain, init=settings.init, channels_last=match.channels_last,
                          prefix_tokens=match.prefix_tokens)
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
    kind = settings.attn_layer or "se"
    sequence = next((m for m in kept if m.channels_last and len(m.shape) == 3), None)
    if sequence is not None and not VARIANTS[kind].any_rank:
        raise UsageError(
            f"--attention {kind} needs 2-D positions for its spatial map, but {sequence.path} takes a token sequence "
            f"{tuple(sequence.shape[1:])} (tokens, channels); use "
            f"{', '.join(k for k, v in VARIANTS.items() if v.any_rank)}"
        )
    flat = next((m for m in kept if len(m.shape) != 4), None)
    if flat is not None and not VARIANTS[kind].any_rank:
        raise UsageError(
            f"--attention {kind} is defined for 2-D maps (its spatial attention is a 2-D map over H, W), "
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
        if convention and settings.rd_divisor is None and kind in ("se", "cbam"):
            notes.append(f"squeeze width ({name}): {convention}")
    if len(kept) < len(findings.matches):
        notes.append(f"filters removed {len(findings.matches) - len(kept)} of {len(findings.matches)} sites")
    plan = Plan(
        model=model,
        sites=sites,
        input_size=findings.input_size,
        init=settings.init,
        seed=seed,
        settings=settings,
    )
    return plan, tuple(notes)
