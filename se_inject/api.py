"""The library entry point: ``inject(model, settings)`` runs open -> find -> plan -> verify -> apply -> measure and
returns the model and its `Report`."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from .engine.build import build_model, seeded
from .engine.category import architecture_category
from .engine.coverage import CallWatch, check_other_paths
from .engine.drift import Drift, compare, image_batch, random_batch
from .engine.drift import outputs as drift_outputs
from .engine.find import Findings, find_sites
from .engine.inputs import default_input_size, parse_input_size
from .engine.measure import Counts, count, count_params
from .engine.memory import check_forward_memory
from .engine.meta import is_meta, meta_copy
from .engine.plan import Plan, Skip
from .engine.planning import make_plan
from .engine.recipe_files import resolve_recipes
from .engine.resolve import ModelSpec, resolve_model
from .engine.surgery import apply_plan
from .engine.tasks import model_task
from .engine.verify import verify_plan
from .engine.weights import check_state_dict, load_weights, read_state_dict
from .errors import NoSitesError, SurgeryError, UsageError
from .io.atomic import foreign_entries, write_folder
from .io.checkpoint import REPORT_FILE, write_checkpoint, write_text
from .io.checkpoint_file import MODEL_FILE
from .io.export import export_writer, timm_architecture, timm_config, validate_export_options
from .io.features import refuse_feature_extractor
from .io.pretrained import build_pretrained, locate_pretrained
from .names import EXPORT_FORMATS, MAX_SEED
from .report import Report, default_output_name
from .settings import Settings

QUANTIZABLE_REFUSAL = (
    "torchvision's quantizable models are refused: their fuse_model() fuses blocks only of their exact class "
    "(type(m) is QuantizableBottleneck), which a block with SE is not, and eager-mode int8 conversion has no kernel "
    "for the float SE layers; put SE in the float model (torchvision:resnet18 for quantized_resnet18) instead"
)


def inject(
    model: nn.Module | str,
    settings: Settings | None = None,
    *,
    recipes: RecipeChoice = "auto",
    input_size: int | str | tuple[int, ...] | None = None,
    weights: str | Path | None = None,
    pretrained: bool = False,
    seed: int | None = None,
    device: str = "cpu",
    inplace: bool = False,
    drift: bool | str | Path | None = None,
    before_build: Callable[[Plan, str], None] | None = None,
) -> tuple[nn.Module, Report]:
    """Insert SE blocks where the recipes put them and return ``(model, report)``: open the model, find the sites on
    a meta twin (`find_sites`), plan (`make_plan`), verify (`verify_plan`), apply and check (`apply_plan`), measure.

    Args:
        model: An ``nn.Module``, or a model name (``resnet50``, ``timm:NAME``, ``torchvision:NAME``,
            ``FILE.py:factory``) built here with random weights on `device` ("meta" plans and counts only).
        settings: SE settings over the recipes' and which sites (`Settings`; default: the recipes' own).
        recipes: "auto" (every shipped recipe), recipe names, and recipe files (a ``Path`` or a ``.toml`` name).
        input_size: Planning and counting size: N, "HxW" or (C, H, W) (video: (C, T, H, W)). Default: the model's.
        weights, pretrained: A local checkpoint, or the pretrained weights the name's tag names, for a named model.
        seed: Seed of the random weights and of the SE initialisation (default: drawn, and recorded in the plan).
        device, inplace: Where a named model is built; insert into the caller's module itself, not a copy.
        drift: Compare the outputs before and after: True (random inputs), a folder of images, False; default:
            with `weights` or `pretrained`.
        before_build: Called with the plan and the default output folder name before the real build: a caller's
            last chance to refuse cheaply.
    """
    settings, seed = settings or Settings(), _seed(seed)
    source = _Source.open(model, weights=weights, pretrained=pretrained, inplace=inplace)
    task, size = _task_and_size(source, input_size, drift)
    check_forward_memory(source.planning, size)  # verified (a dry run too) and run at this size
    findings = find_sites(source.planning, _recipes(recipes, settings), size, count_base=True)
    plan, notes = _plan_found(source, findings, settings, seed)
    first = next(m for m in findings.matches if m.path == plan.sites[0].path)
    reduction = settings.reduction or first.recipe.defaults.reduction or 16  # names the default output folder
    if before_build is not None:
        before_build(plan, default_output_name(plan, reduction, source.display_name))
    base = source.build(device, seed, weights)
    plan, refused = _verified(base, plan, findings)
    planning, plan, after, unrun = _apply_checked(source.planning, plan, size, source.fresh_planning, findings)
    injected, drifted = planning, None  # a meta run: the applied planning model is the result
    if base is not source.planning:
        measure = (weights is not None or pretrained) if drift is None else drift is not False
        injected, drifted = _apply_measuring_drift(base, plan, size, inplace=inplace or source.spec is not None,
                                                   drift=measure, images=drift if _is_folder(drift) else None,
                                                   classes=task == "classification")
    kept = {s.path for s in plan.sites}
    return injected, Report(
        model=str(source.spec) if source.spec else type(base).__name__, plan=plan,
        skipped=_in_model_order(planning, (*findings.skipped, *refused, *unrun)), before=findings.counts,
        after=after, site_params={s.path: count_params(injected.get_submodule(s.module_path)) for s in plan.sites},
        feature_maps={m.path: m.feature_map for m in findings.matches if m.path in kept},
        notes=(*source.notes, *notes), reduction=reduction, drift=drifted,
        pretrained=source.located.weights if source.located else None)


RecipeChoice = str | Path | list[str | Path] | tuple[str | Path, ...]


def _is_folder(value: Any) -> bool:
    return isinstance(value, (str, Path)) and not isinstance(value, bool)


def _recipes(recipes: RecipeChoice, settings: Settings) -> list[Any]:
    """The recipes `recipes` names (names, and files: a ``Path`` or a name ending in ``.toml``), with the rules of
    the settings' placement."""
    chosen = [recipes] if isinstance(recipes, (str, Path)) else list(recipes)
    files = tuple(r for r in chosen if isinstance(r, Path) or str(r).endswith(".toml"))
    names = [str(r) for r in chosen if r not in files] or "auto"
    return [r.for_placement(settings.placement) for r in resolve_recipes(names, files)]


def _verified(base: nn.Module, plan: Plan, findings: Findings) -> tuple[Plan, tuple[Skip, ...]]:
    """`verify_plan` on the real model: the sites whose rewrite computes what the block did."""
    plan, refused = verify_plan(base, plan, {m.path: m.call for m in findings.matches if m.call is not None})
    if not plan.sites:
        reasons = "; ".join(sorted({f"{s.path or 'the model'}: {s.reason}" for s in refused})[:3])
        raise NoSitesError(f"no block to put SE in: every rewrite failed its verification ({reasons})", "unverified")
    return plan, refused


def _task_and_size(source: _Source, input_size: int | str | tuple[int, ...] | None,
                   drift: Any) -> tuple[str, tuple[int, ...]]:
    """The model's task and its planning input size; refuses what the task cannot take."""
    task = model_task(source.planning)
    if task == "quantization":
        raise NoSitesError(QUANTIZABLE_REFUSAL, "quantizable")
    if _is_folder(drift) and task in ("video", "optical_flow"):
        raise UsageError(f"--images (drift=FOLDER) takes single images; a {task.replace('_', ' ')} model needs "
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
    base: nn.Module, plan: Plan, size: tuple[int, ...], *, inplace: bool, drift: bool, images: Any, classes: bool,
) -> tuple[nn.Module, Drift | None]:
    """Apply `plan` to the real `base`; with `drift`, compare the outputs before and after on a fixed batch (of the
    `images` folder's images, else random)."""
    if not drift:
        return apply_plan(base, plan, inplace=inplace), None
    batch, described = image_batch(images, size, base) if images is not None else random_batch(size, model=base)
    before = drift_outputs(base, batch)
    injected = apply_plan(base, plan, inplace=inplace)
    return injected, compare(before, drift_outputs(injected, batch), described, classes=classes)


def _apply_checked(
    planning: nn.Module, plan: Plan, size: tuple[int, ...], fresh: Callable[[], nn.Module], findings: Findings
) -> tuple[nn.Module, Plan, Counts, tuple[Skip, ...]]:
    """Apply `plan` to the meta model `planning`, count it, and prove that every inserted module runs exactly once
    per call of its block, on every forward path (`se_inject.engine.coverage`: the counting forward is watched, the
    other paths run once more); sites that do not are refused, and the plan is applied again to a `fresh` meta
    model without them; the output shapes must be the base model's (`findings`). Returns the applied model, the
    plan, its counts and the refused sites."""
    refused: list[Skip] = []
    while True:
        apply_plan(planning, plan, inplace=True)
        with CallWatch(planning, plan) as watch:
            after = count(planning, size)
        problems = watch.problems() or check_other_paths(planning, plan, size, watch)
        if not problems and after.output_shapes != findings.counts.output_shapes:
            raise SurgeryError(f"surgery changed the output shapes: {findings.counts.output_shapes} -> "
                               f"{after.output_shapes}")
        if not problems:
            return planning, plan, after, tuple(refused)
        refused += [Skip(s.path, s.block, s.recipe, problems[s.path]) for s in plan.sites if s.path in problems]
        plan = replace(plan, sites=tuple(s for s in plan.sites if s.path not in problems))
        if not plan.sites:
            reasons = "; ".join(f"{p}: {r}" for p, r in list(problems.items())[:3])
            raise NoSitesError(f"no block to put SE in: no inserted module runs as planned ({reasons})", "unverified")
        planning = fresh()


def _no_match_message(model: nn.Module, findings: Findings) -> str:
    """Why no recipe matched, as `scan` says it: for a transformer or MLP, that no block ends a residual branch in a
    channels-last projection, the place token SE takes."""
    category = architecture_category(model)
    found = ", ".join(c.rsplit(".", 1)[-1] for c in findings.block_classes[:8]) or "none"
    if category in ("transformer", "MLP"):
        return (f"no matching blocks: this is a {category} with no convolutional block, and none of its blocks ends a "
                f"residual branch in one channels-last projection, where token SE goes (parallel branches summed, "
                f"several token streams); {len(findings.recipes)} recipes tried. Its blocks: {found}. "
                f"To choose a place yourself, name its blocks in a recipe file (--recipe-file, Python: recipes=[PATH]; "
                f"docs/recipes.md, docs/transformers.md)")
    return (f"no matching blocks ({category}): none of the {len(findings.recipes)} recipes names its blocks ({found}); "
            "write a recipe for them (see `se-inject recipes` and docs/recipes.md) and pass it: recipes=[PATH] "
            "(--recipe-file)")


def _in_model_order(model: nn.Module, skipped: tuple[Skip, ...]) -> tuple[Skip, ...]:
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    return tuple(sorted(skipped, key=lambda s: order.get(s.path, -1)))


def save(
    model: nn.Module,
    result: Report | Plan,
    directory: str | Path,
    *,
    force: bool = False,
    exports: tuple[str, ...] | list[str] = (),
    export_batch: int | None = None,
    opset: int | None = None,
) -> Report | None:
    """Save `model` into the folder `directory`, all or nothing (the CLI writes the same folder): the checkpoint
    (weights and plan), ``config.json`` where the result is exactly a timm architecture (so plain timm loads the
    folder), the `exports` asked for (``torchscript``, ``exported``, ``onnx``; batch axis dynamic unless
    `export_batch` fixes it, `opset` for ONNX), and ``report.json`` when `result` is `inject`'s report rather than a
    bare plan. An existing folder is replaced only with ``force=True``. Returns the final report (its output folder,
    timm architecture and exports), or None for a plan."""
    report, plan = (result, result.plan) if isinstance(result, Report) else (None, result)
    validate_export_options(tuple(exports), batch=export_batch, opset=opset)
    directory = Path(directory)
    architecture = timm_architecture(plan)
    results: list[Any] = []
    files = {MODEL_FILE: write_checkpoint(model, plan)}
    if architecture:
        pretrained = report is not None and report.pretrained is not None
        files["config.json"] = write_text(timm_config(architecture, base=plan.model, pretrained=pretrained))
    for fmt in dict.fromkeys(exports):
        name = f"model{EXPORT_FORMATS[fmt]}"
        files[name] = export_writer(model, plan, fmt, directory / name, results, batch=export_batch,
                                    opset=opset if fmt == "onnx" else None)
    final: list[Report] = []
    if report is not None:
        foreign = foreign_entries(directory)
        if foreign:  # our naming, not ours: left alone, and said
            names = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            report = replace(report, notes=(*report.notes, f"left alone: {len(foreign)} entries named like "
                                            f"se-inject's temporaries that se-inject did not make ({names})"))

        def write_report(path: Path, report: Report = report) -> None:  # runs last: the exports' results are in
            final.append(replace(report, output=str(directory), timm_architecture=architecture,
                                 exports=tuple(results)))
            path.write_text(json.dumps(final[0].to_dict(), indent=2) + "\n", encoding="utf-8")

        files[REPORT_FILE] = write_report
    write_folder(directory, files, force=force, outputs=True)
    return final[0] if final else None
