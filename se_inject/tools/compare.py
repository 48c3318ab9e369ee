"""Side-by-side comparison of attention variants on one model: exact costs, and measured latency on request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..api import inject
from ..engine.models import build_model, resolve_model
from ..errors import UsageError
from ..names import VARIANTS
from ..settings import OPTION_KEYS, Settings
from .bench import Timing, paired_latency


@dataclass(frozen=True)
class CompareRow:
    attention: str
    sites: int
    params_delta: int
    macs_delta: int
    elementwise_ops: int
    params_before: int
    macs_before: int
    latency: tuple[Timing, ...] = ()
    skipped: str = ""  # why the variant was left out (not defined for the model's maps); the counts are then 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "attention": self.attention,
            "sites": self.sites,
            "params_delta": self.params_delta,
            "macs_delta": self.macs_delta,
            "elementwise_ops": self.elementwise_ops,
            "params_before": self.params_before,
            "macs_before": self.macs_before,
            "latency": [t.to_dict() for t in self.latency],
            "skipped": self.skipped,
        }


def compare_variants(
    model: str,
    attentions: tuple[str, ...] | list[str] | None = None,
    *,
    bench: bool = False,
    batches: tuple[int, ...] = (1, 8),
    rounds: int = 15,
    device: str = "cpu",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> list[CompareRow]:
    """Plan each variant on `model` (meta device) and, with `bench`, time base vs injected on `device`, on the
    task's own input (`tasks.example_inputs`: a detector's list of images, RAFT's two frames, a video clip).
    `progress` is told each step as it starts (for a status line).

    `attentions` None: every variant defined for the model's maps; one that is not (CBAM on a video or 1-D model)
    gets a row saying why (`skipped`). Named explicitly, such a variant is refused (UsageError)."""
    step = progress or (lambda text: None)
    explicit = attentions is not None
    attentions = tuple(attentions) if attentions is not None else tuple(VARIANTS)
    for attention in attentions:  # checked before the base model is built
        Settings(attn_layer=attention)
    base = None
    if bench:
        step(f"building {model}")
        base = build_model(resolve_model(model), device=device, seed=seed).eval()
    rows = []
    recipes, input_size = options.pop("recipe", "auto"), options.pop("input_size", None)
    for attention in dict.fromkeys(attentions):
        step(f"planning {attention}")
        settings = Settings.parse({**options, "attention": attention}, OPTION_KEYS)  # the CLI's option names
        try:
            _, report = inject(model, settings, recipes=recipes, input_size=input_size, device="meta", seed=seed)
        except UsageError as e:
            if explicit or VARIANTS[attention].any_rank:
                raise
            rows.append(CompareRow(attention, 0, 0, 0, 0, 0, 0, skipped=str(e)))
            continue
        data = report.to_dict()
        timings: tuple[Timing, ...] = ()
        if base is not None:
            injected, _ = inject(base, settings, recipes=recipes, input_size=input_size, seed=seed)
            timed = []
            for b in batches:
                step(f"timing {attention} at batch {b} ({rounds} paired rounds)")
                timed.append(paired_latency(base, injected.eval(), report.plan.input_size, batch=b, rounds=rounds))
            timings = tuple(timed)
        rows.append(
            CompareRow(
                attention=attention,
                sites=len(report.plan.sites),
                params_delta=data["params"]["delta"],
                macs_delta=data["macs"]["delta"],
                elementwise_ops=data["se_elementwise_ops"],
                params_before=data["params"]["before"],
                macs_before=data["macs"]["before"],
                latency=timings,
            )
        )
    return rows
