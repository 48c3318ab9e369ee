"""timm's SE twins, read from timm itself: models whose configuration equals another's but for channel attention.

timm builds its ByobNet, RegNet, CSPNet, NFNet and VoVNet models from configuration tables (``model_cfgs``); where two
registered models' tables differ only in their attention layer (``attn_layer``/``attn_kwargs``, RegNet's ``se_ratio``,
VoVNet's ``attn``), the one with attention is the family's own SE design of the other: ``regnetx_002`` ->
``regnety_002``, ``resnet33ts`` -> ``seresnet33ts``, ``darknet21`` -> ``sedarknet21``, ``nf_resnet26`` ->
``nf_seresnet26``. Finding reads the twin's SE as the plain model's family design (`engine.designs`: ``cs3darknet_l``
takes ``cs3sedarknet_l``'s rd_ratio 0.25), and the save step names the twin in ``config.json`` once the result is
checked to compute exactly what the twin computes. (VoVNet's tables have no pair: ``vovnet39a`` is not residual,
``ese_vovnet39b`` is.)
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from functools import cache
from typing import Any

# The attention layers of a twin (timm's ``get_attn`` names) se-inject makes: "se" SE, "eca" ECA, "cbam" CBAM,
# "ese" effective SE.
CHANNEL_ATTENTION = ("se", "eca", "cbam", "ese")


def _strip_byob(cfg: Any) -> tuple[Any, set[str]]:
    kinds: set[str] = set()

    def block(b: Any) -> Any:
        if isinstance(b, (tuple, list)):
            return tuple(block(x) for x in b)
        if b.attn_layer:
            kinds.add(b.attn_layer)
        return dataclasses.replace(b, attn_layer=None, attn_kwargs=None)

    if cfg.attn_layer:
        kinds.add(cfg.attn_layer)
    return dataclasses.replace(cfg, blocks=block(cfg.blocks), attn_layer=None, attn_kwargs={}), kinds


def _strip_regnet(cfg: Any) -> tuple[Any, set[str]]:
    return dataclasses.replace(cfg, se_ratio=0.0), {"se"} if cfg.se_ratio else set()


def _strip_csp(cfg: Any) -> tuple[Any, set[str]]:
    stages = cfg.stages
    kinds = {a for a in stages.attn_layer if a}
    n = len(stages.depth)
    stripped = dataclasses.replace(stages)  # __post_init__ pads the fields again
    stripped.attn_layer, stripped.attn_kwargs = (None,) * n, (None,) * n
    return dataclasses.replace(cfg, stages=stripped), kinds


def _strip_nfnet(cfg: Any) -> tuple[Any, set[str]]:
    return dataclasses.replace(cfg, attn_layer=None, attn_kwargs={}), {cfg.attn_layer} if cfg.attn_layer else set()


def _strip_vovnet(cfg: dict[str, Any]) -> tuple[Any, set[str]]:
    return tuple(sorted({**cfg, "attn": ""}.items())), {cfg["attn"]} if cfg["attn"] else set()


def _families() -> dict[str, tuple[dict[str, Any], Any]]:
    from timm.models import byobnet, cspnet, nfnet, regnet, vovnet

    return {"byobnet": (byobnet.model_cfgs, _strip_byob), "regnet": (regnet.model_cfgs, _strip_regnet),
            "cspnet": (cspnet.model_cfgs, _strip_csp), "nfnet": (nfnet.model_cfgs, _strip_nfnet),
            "vovnet": (vovnet.model_cfgs, _strip_vovnet)}


def config_families() -> tuple[str, ...]:
    """The timm model modules (``timm.models.<name>``) whose twins come from their configuration tables."""
    return tuple(_families())


@dataclasses.dataclass(frozen=True)
class Twin:
    """A registered timm model (`plain`) and one whose configuration adds only channel attention (`twin`)."""

    family: str
    plain: str
    twin: str
    attention: str  # the twin's attention layer, timm's name ("se", "eca", "gca", ...)


@cache
def config_twins() -> tuple[Twin, ...]:
    """Every pair of registered timm models in the configuration-table families that differ only in attention."""
    import timm

    pairs: list[Twin] = []
    for family, (cfgs, strip) in _families().items():
        groups: dict[str, list[tuple[str, set[str]]]] = defaultdict(list)
        for name, cfg in cfgs.items():
            if not timm.is_model(name):
                continue
            stripped, kinds = strip(cfg)
            groups[repr(stripped)].append((name, kinds))
        for members in groups.values():
            plain = [n for n, kinds in members if not kinds]
            pairs += [Twin(family, p, n, "+".join(sorted(kinds))) for p in plain for n, kinds in members if kinds]
    return tuple(sorted(pairs, key=lambda t: (t.family, t.plain, t.twin)))


def twin_names(name: str) -> tuple[str, ...]:
    """The timm models that are `name` plus channel attention, by configuration (empty outside those families)."""
    return tuple(t.twin for t in config_twins() if t.plain == name)
