"""The family's own SE design for each match, read from SE modules the family built (`engine.widths` reads one).

For a match, the SE modules read are, of the first source that has any in blocks of the match's class:

1. the model's own (partial SE, ``--fill``): the blocks it fills get what its other blocks of that class have;
2. the timm architecture the model was built as (its ``pretrained_cfg["architecture"]``, built on the meta device),
   at the match's slot: a timm model whose SE was taken out gets the architecture's SE back (GhostNet's
   ``conv_reduce``/``conv_expand``, TResNet's and ReXNet-R's widths);
3. that architecture's SE twin in timm's configuration tables (`engine.twins`), at the match's slot:
   ``cs3darknet_l`` takes ``cs3sedarknet_l``'s ``rd_ratio=0.25``, ``darknet21`` ``sedarknet21``'s r = 16.

Where no source has SE in blocks of the match's class, the SE modules of every class at the match's slot, from the
first source that has any (timm's EfficientNet builder makes every block's SE from one ``se_layer``: FBNetV3's
depthwise-separable blocks get its inverted residuals' hard-swish SE). Where the modules of one class follow no one
width rule, one rule with each stage's own r (MixNet's se0.5 and se0.25 stages).

Several width rules can give every module read its width (LCNet's 128 and 256 channels: round(C / 4) and C / 4 to
a multiple of 8 both give 32 and 64). Where those rules give the match's blocks different widths, the rule is the
one that gives their widths to the SE modules of the most registered models timm builds with the same generator
function (``_gen_lcnet``: ``lcnet_035``'s 88 channels -> 22 is round(C / 4), not 24); among equals, the first in
se-inject's order, which starts with the recipe's own rule (the family's documented rule, `widths.fitting_rules`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import cache, lru_cache
from typing import Any

from torch import nn

from ..layers.attention import class_path, is_attention
from .build import build_model
from .resolve import ModelSpec
from .twins import config_twins
from .widths import OwnSE, WidthRule, block_activation, design_of, fits, fitting_rules, read_own_se, staged_rules, width

Evidence = dict[str, tuple[OwnSE, ...]]  # SE modules read, by their block's class path


def with_own_designs(model: nn.Module, matches: list[Any], skipped: list[Any]) -> list[Any]:
    """Each match with the family's own SE design as its settings (`Match.defaults`), where one is found."""
    if not matches:
        return matches
    own: dict[str, list[OwnSE]] = {}
    for skip in skipped:
        if skip.already_attention and (se := read_own_se(skip.path, model.get_submodule(skip.path))) is not None:
            own.setdefault(skip.block, []).append(se)
    sources = [("the model", {cp: tuple(ses) for cp, ses in own.items()}, False), *_references(model)]
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for m in matches:
        groups.setdefault((m.recipe.name, m.block, m.defaults, m.place.slot), []).append(m)
    designs = {}
    for key, members in groups.items():
        designs[key] = _designs(members, sources, lambda cp: _generator_evidence(model, cp))
    result = []
    for m in matches:
        found = designs[(m.recipe.name, m.block, m.defaults, m.place.slot)]
        design = found.get(m.path.rpartition(".")[0], found.get(None))
        if design is not None and design.act_layer == "block":
            design = replace(design, act_layer=block_activation(model.get_submodule(m.path)) or "relu")
        result.append(replace(m, defaults=design) if design is not None else m)
    return result


def _designs(members: list[Any], sources: list[tuple[str, Evidence, bool]],
             generator: Callable[[str], list[list[OwnSE]]]) -> dict[str | None, Any]:
    """The design of a group of matches (one class, one slot, one recipe setting): {None: design} or, one per
    stage, {stage path: design}; empty where no source has SE modules for them."""
    m = members[0]
    sites = [(x.channels, x.input_channels) for x in members]
    for label, evidence, at_slot in sources:  # the match's own class
        ses = [se for se in evidence.get(m.block, ()) if not at_slot or se.place == m.place.slot]
        if not ses:
            continue
        rules = fitting_rules(ses, m.defaults)
        design = design_of(ses, m.defaults, _choose(rules, sites, lambda: generator(m.block)), label) if rules else None
        if design is not None:
            return {None: design}
        staged = staged_rules(ses, m.defaults)
        if staged:
            return {stage: design_of([se for se in ses if se.block.rpartition(".")[0] == stage], m.defaults, rule,
                                     label) for stage, rule in staged.items()}
    if m.place.slot is None:
        return {}
    for label, evidence, _ in sources:  # every class's, at the same slot (timm's builders: one se_layer)
        ses = [se for group in evidence.values() for se in group if se.place == m.place.slot]
        rules = fitting_rules(ses, m.defaults) if ses else []
        if rules:
            return {None: design_of(ses, m.defaults, rules[0], label)}
    return {}


def _choose(rules: list[WidthRule], sites: list[tuple[int, int | None]],
            more: Callable[[], list[list[OwnSE]]]) -> WidthRule:
    """The first of `rules` unless they give the sites different widths: then the one that fits every SE module of
    the most models of `more` (the first of those, in `rules`' order)."""
    if len({tuple(width(rule, c, c_in) for c, c_in in sites) for rule in rules}) <= 1:
        return rules[0]
    models = [ses for ses in more() if ses]
    return max(rules, key=lambda rule: sum(fits(rule, ses) for ses in models))  # max keeps the first of equals


def _architecture(model: nn.Module) -> str | None:
    """The registered timm model the model was built as, where timm built it."""
    import timm

    cfg = getattr(model, "pretrained_cfg", None)
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    return name if isinstance(name, str) and timm.is_model(name) else None


def _references(model: nn.Module) -> list[tuple[str, Evidence, bool]]:
    """The SE modules of the model's timm architecture, else those of its SE twins (timm's configuration tables)."""
    name = _architecture(model)
    if name is None:
        return []
    if evidence := _evidence(name):
        return [(f"timm {name}", evidence, True)]
    twins = [t.twin for t in config_twins() if t.plain == name and t.attention == "se"]
    return [(f"timm {t}", evidence, True) for t in twins if (evidence := _evidence(t))]


@lru_cache(maxsize=64)
def _evidence(name: str) -> Evidence:
    """The SE modules of a registered timm model, built on the meta device: those a block holds as a child, by the
    block's class."""
    try:
        model = build_model(ModelSpec("timm", name), device="meta")
    except Exception:  # a model that needs arguments or cannot be built on meta: nothing to read
        return {}
    found: dict[str, list[OwnSE]] = {}
    for path, block in model.named_modules():
        for child, module in block.named_children():
            if is_attention(module) and (se := read_own_se(path, block, child)) is not None:
                found.setdefault(class_path(block), []).append(se)
    return {cp: tuple(ses) for cp, ses in found.items()}


def _generator_evidence(model: nn.Module, block: str) -> list[list[OwnSE]]:
    """The SE modules in blocks of class `block` of each registered model timm builds with the generator function
    (``_gen_*``) that builds the model's architecture."""
    name = _architecture(model)
    return [list(_evidence(other).get(block, ())) for other in (_generator_models(name) if name else ())]


@cache
def _generator_models(name: str) -> tuple[str, ...]:
    import timm
    from timm.models import model_entrypoint

    def generator(model: str) -> tuple[str, str] | None:
        fn = model_entrypoint(model)
        gen = next((n for n in fn.__code__.co_names if n.startswith("_gen_")), None)
        return (fn.__module__, gen) if gen else None

    own = generator(name)
    return tuple(m for m in timm.list_models() if own is not None and generator(m) == own) if own else ()
