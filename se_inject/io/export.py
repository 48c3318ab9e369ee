"""Exports that run without se-inject: TorchScript, torch.export and ONNX files, and plain-timm folders.

The batch axis is dynamic by default (ONNX dynamic axes, a ``torch.export.Dim``; TorchScript has no fixed shapes)
or fixed to a static batch on request. Every export is loaded back right after writing, run at each batch size it
must accept (1 and 3 when dynamic) and compared with the eager model: the maximum absolute difference and the
relative error (``max |diff| / max |eager output|``) are returned, and a file whose relative error exceeds
`RELATIVE_TOLERANCE` is refused, not written.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.models import ModelSpec, build_model, split_tag, torchvision_weights_enum
from ..engine.plan import Plan
from ..engine.surgery import apply_plan
from ..engine.tasks import example_inputs, model_task
from ..errors import ExportError, describe
from .atomic import write_folder
from .preflight import check_export_options, check_output_file
from .twins import config_twins

RELATIVE_TOLERANCE = 1e-4  # float32 kernels differ by ~1e-6 of the output's magnitude; a broken export by far more
DYNAMIC_TRACE_BATCH = 2  # traced at 2: a batch of 1 would let the tracer specialise the axis to 1
DYNAMIC_CHECK_BATCHES = (1, 3)


@dataclass(frozen=True)
class ExportResult:
    """One written export and how it compared with the eager model.

    Attributes:
        batch: "dynamic" or the fixed batch size of the file's input.
        checked_batches: The batch sizes the file was run back at.
        max_abs_diff: Maximum absolute difference from the eager outputs (None where the file could not be run back:
            ONNX without onnxruntime).
        relative_diff: ``max_abs_diff / max |eager output|``, the number the verdict is based on.
        opset: The ONNX opset written (ONNX only).
    """

    format: str
    path: str
    max_abs_diff: float | None
    relative_diff: float | None = None
    batch: int | str = "dynamic"
    checked_batches: tuple[int, ...] = ()
    opset: int | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "path": self.path, "max_abs_diff": self.max_abs_diff,
                "relative_diff": self.relative_diff, "batch": self.batch,
                "checked_batches": list(self.checked_batches), "opset": self.opset, "note": self.note}


def validate_export_options(formats: tuple[str, ...] | list[str], *, batch: int | None = None,
                            opset: int | None = None) -> None:
    """Raise UsageError for an unknown format or a batch/opset that cannot apply (see `check_export_options`)."""
    check_export_options(formats, batch=batch, opset=opset)


def example_input(plan: Plan, *, batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *plan.input_size), generator=generator)


def _example_args(model: nn.Module, plan: Plan, batch: int, device: torch.device) -> tuple[Any, ...]:
    """The forward's arguments: `example_input` for one-tensor models, the task's own inputs for the others
    (a detector's list of images, RAFT's two frames), same seed."""
    if model_task(model) in ("detection", "optical_flow"):
        return example_inputs(model, plan.input_size, batch=batch, device=device,
                              generator=torch.Generator().manual_seed(0))
    return (example_input(plan, batch=batch).to(device),)


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output, flattened in order: a tensor, or (named) tuples, lists and dicts of them
    (TorchScript of torchvision's inception_v3/googlenet returns ``InceptionOutputs(logits, aux=None)``). Nones,
    such as an absent auxiliary output, are dropped."""
    if output is None:
        return []
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, tuple | list):
        return [t for item in output for t in output_tensors(item)]
    raise ExportError(f"cannot compare a model output of type {type(output).__name__}")


def compare_outputs(got: Any, expected: Any) -> tuple[float, float]:
    """``(max |diff|, relative error)`` over all output tensors; the relative error is the maximum absolute
    difference over the maximum magnitude of the eager output."""
    got_tensors, expected_tensors = output_tensors(got), output_tensors(expected)
    if len(got_tensors) != len(expected_tensors):
        raise ExportError(f"the export returns {len(got_tensors)} tensors, the eager model {len(expected_tensors)}")
    worst_abs, worst_rel = 0.0, 0.0
    for g, e in zip(got_tensors, expected_tensors, strict=True):
        g, e = torch.as_tensor(g).detach().double().cpu(), e.detach().double().cpu()
        if g.shape != e.shape:
            raise ExportError(f"the export returns shape {tuple(g.shape)}, the eager model {tuple(e.shape)}")
        diff = float((g - e).abs().max()) if e.numel() else 0.0
        scale = float(e.abs().max()) if e.numel() else 0.0
        worst_abs = worst(worst_abs, diff)
        worst_rel = worst(worst_rel, diff / scale if scale else (0.0 if diff == 0 else float("inf")))
    return worst_abs, worst_rel


def worst(*values: float) -> float:
    """The largest of `values`, NaN if any is NaN (Python's `max` drops a NaN that is not first)."""
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def export_writer(model: nn.Module, plan: Plan, fmt: str, final: Path, results: list[ExportResult], *,
                  batch: int | None = None, opset: int | None = None) -> Any:
    """A writer (``fn(target_path)``) that exports `model` in `fmt`, loads the file back, compares it with the eager
    model at the batch sizes the file must accept and appends the outcome to `results`. `final` is the path the
    file will be renamed to. `batch` fixes the batch axis (default: dynamic); `opset` is ONNX's."""
    validate_export_options([fmt], batch=batch, opset=opset)
    label, save, load_back = _WRITERS[fmt]
    task = model_task(model)
    if task in ("detection", "optical_flow") and fmt != "torchscript":
        raise ExportError(f"{label} export of a {task.replace('_', ' ')} model is not supported (it takes "
                          f"{'a list of images' if task == 'detection' else 'two frames'}); use torchscript")
    note = ""
    if fmt == "torchscript" and batch is not None:
        batch, note = None, f"TorchScript has no fixed shapes: static batch {batch} does not apply; dynamic"
    trace_batch, check_batches = (DYNAMIC_TRACE_BATCH, DYNAMIC_CHECK_BATCHES) if batch is None else (batch, (batch,))

    def write(target: Path) -> None:
        training = model.training
        model.eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        inputs = {b: _example_args(model, plan, b, device) for b in dict.fromkeys((trace_batch, *check_batches))}
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit's deprecation notices, exporter chatter
                try:
                    written_opset = save(model, inputs[trace_batch][0], target, dynamic=batch is None, opset=opset)
                    run = load_back(target)
                    diffs = None if run is None else [compare_outputs(run(*inputs[b]), model(*inputs[b]))
                                                      for b in check_batches]
                except ExportError:
                    raise
                except Exception as e:
                    raise ExportError(f"{label} export failed: {describe(e, kind=True)}") from None
        finally:
            model.train(training)
        if diffs is None:
            results.append(ExportResult(fmt, str(final), None, None, batch or "dynamic", (), written_opset,
                                        "checked with onnx; install onnxruntime to run it"))
            return
        max_abs, relative = worst(*(d[0] for d in diffs)), worst(*(d[1] for d in diffs))
        if not relative <= RELATIVE_TOLERANCE:
            raise ExportError(f"{label} export differs from the eager model: relative error {relative:.2g} > "
                              f"{RELATIVE_TOLERANCE:g} (max |diff| {max_abs:.3g}); nothing written")
        results.append(ExportResult(fmt, str(final), max_abs, relative, batch or "dynamic", check_batches,
                                    written_opset, note))

    return write


def export(model: nn.Module, plan: Plan, fmt: str, path: str | Path, *, force: bool = False,
           batch: int | None = None, opset: int | None = None) -> ExportResult:
    """Write `model` in `fmt` to `path` (atomically), load it back and compare with the eager model.

    Args:
        batch: Fix the batch axis to this size; default: dynamic (the file accepts any batch).
        opset: ONNX opset (default: the exporter's).
    """

    path = Path(path)
    validate_export_options([fmt], batch=batch, opset=opset)
    check_output_file(path, force=force)
    results: list[ExportResult] = []
    write_folder(path.parent, {path.name: export_writer(model, plan, fmt, path, results, batch=batch,
                                                            opset=opset)}, force=True)
    return results[0]


def _batch_dim() -> Any:
    return torch.export.Dim("batch", min=1)


def _save_torchscript(model: nn.Module, x: torch.Tensor, target: Path, *, dynamic: bool, opset: int | None) -> None:
    torch.jit.script(model).save(str(target))


def _load_torchscript(target: Path) -> Callable[[torch.Tensor], Any]:
    return torch.jit.load(str(target))


def _save_exported(model: nn.Module, x: torch.Tensor, target: Path, *, dynamic: bool, opset: int | None) -> None:
    shapes = ({0: _batch_dim()},) if dynamic else None
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=shapes), str(target))


def _load_exported(target: Path) -> Callable[[torch.Tensor], Any]:
    return torch.export.load(str(target)).module()


def _save_onnx(model: nn.Module, x: torch.Tensor, target: Path, *, dynamic: bool, opset: int | None) -> int:
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'se-inject[onnx]'") from None
    with tempfile.TemporaryDirectory() as tmp:  # the exporter writes next to its target; keep that out of sight
        tmp_file = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (x,), str(tmp_file), dynamo=True, external_data=False, verbose=False,
                          input_names=["input"], dynamic_shapes=({0: _batch_dim()},) if dynamic else None,
                          opset_version=opset)
        proto = onnx.load(str(tmp_file))
        onnx.checker.check_model(proto)
        target.write_bytes(tmp_file.read_bytes())
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _load_onnx(target: Path) -> Callable[[torch.Tensor], Any] | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(y) for y in session.run(None, {name: x.cpu().numpy()})]

    return run


_WRITERS = {  # format: (name in messages, write the file (returns the ONNX opset), load it back as a callable)
    "torchscript": ("TorchScript", _save_torchscript, _load_torchscript),
    "exported": ("torch.export", _save_exported, _load_exported),
    "onnx": ("ONNX", _save_onnx, _load_onnx),
}


# --- plain timm --------------------------------------------------------------------------------------------------


def timm_architecture(plan: Plan) -> str | None:
    """The timm model name whose architecture the injected model is exactly, if any.

    Candidates are ``<attention><base name>`` (``resnet50`` -> ``seresnet50``), for a family prefix
    ``<prefix>_<attention><rest>`` (``nf_resnet26`` -> ``nf_seresnet26``), and the models timm's configuration
    tables make of the base plus attention (``regnetx_002`` -> ``regnety_002``, see `se_inject.twins`); a candidate
    counts when its state_dict has the same keys and shapes and, given the same random weights and norm statistics,
    it computes the same outputs (checked on fresh CPU builds, independent of any model's own, possibly degenerate,
    weights).
    """
    import timm


    if plan.model is None or not plan.sites:
        return None
    kinds = {s.attention.attn_layer for s in plan.sites}
    if len(kinds) != 1 or any(s.attention.module_gain != 1.0 for s in plan.sites):  # timm's modules have no gain
        return None
    kind, base = kinds.pop(), plan.model.name.split(".", 1)[0]
    prefix, _, rest = base.partition("_")
    names = [f"{kind}{base}", *([f"{prefix}_{kind}{rest}"] if rest else [])]
    names += [t.twin for t in config_twins() if t.plain == base and t.attention == kind]
    candidate = next((name for name in names if timm.is_model(name)), None)
    if candidate is None:
        return None
    reference = build_model(ModelSpec("timm", candidate), device="meta")
    ours = apply_plan(build_model(plan.model, device="meta"), plan, inplace=True)  # cheaper than copying `model`
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    if {k: tuple(v.shape) for k, v in reference.state_dict().items()} != shapes:
        return None
    if any(set(dict(m.named_buffers())) - set(shapes) for m in (reference, ours)):
        return None  # state outside the state_dict: cannot be given the same values
    state = _random_state(ours)
    x = torch.randn(1, plan.input_size[0], 32, 32, generator=torch.Generator().manual_seed(0))  # small: cheap
    try:
        outputs = []
        for m in (reference, ours):
            m.load_state_dict(state, strict=True, assign=True)
            with torch.no_grad():
                outputs.append(m.eval()(x))
    except Exception:
        return None
    return candidate if torch.allclose(*outputs, rtol=1e-4, atol=1e-5) else None


def _random_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Deterministic, non-degenerate values for every state_dict entry (a golden-ratio sequence, three times
    cheaper than randn): weights scaled by fan-in, positive variances, BN weights near 1."""
    state = {}
    for i, (key, t) in enumerate(model.state_dict().items()):
        if not t.is_floating_point():
            state[key] = torch.zeros(t.shape, dtype=t.dtype)
            continue
        value = torch.arange(t.numel(), dtype=torch.float32).add_(i * 0.37).mul_(0.6180339887).frac_()
        if key.endswith("running_var"):
            value.add_(0.5)
        elif t.dim() > 1:
            value.sub_(0.5).mul_(3.4 / max(1, t[0].numel()) ** 0.5)
        else:
            value.sub_(0.5).mul_(0.2).add_(1.0 if key.endswith("weight") else 0.0)
        state[key] = value.reshape(t.shape).to(t.dtype)
    return state


PREPROCESSING_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "num_classes")
ARCHITECTURE_KEYS = ("first_conv", "classifier", "pool_size", "fixed_input_size", "min_input_size")
PROVENANCE_KEYS = ("license", "origin_url", "paper_ids", "paper_name", "notes", "description", "test_input_size",
                   "test_crop_pct", "test_pool_size", "label_names", "label_offset")


def timm_config(architecture: str, num_classes: int | None = None, *, base: Any = None,
                pretrained: bool = False) -> str:
    """``config.json`` for ``timm.create_model("local-dir:DIR", pretrained=True)``.

    timm reads its ``pretrained_cfg`` as the whole description of the weights (missing keys take timm's defaults,
    not the architecture's), so it is written from what is true of the saved weights: the base model's preprocessing
    (a timm base's own pretrained cfg; a torchvision base's weights transforms: bilinear resize and centre crop) and,
    only when the weights are a library's pretrained ones, their provenance (license, paper, evaluation size). The
    architecture contributes only structural keys (first conv, classifier, pool size).
    """
    import timm

    structure = timm.models.get_pretrained_cfg(architecture).to_dict()
    pretrained_cfg: dict[str, Any] = {k: structure[k] for k in ARCHITECTURE_KEYS if structure.get(k) is not None}
    if base is not None and base.source == "torchvision":
        pretrained_cfg.update(torchvision_preprocessing(base.name, pretrained=pretrained))
    else:
        base_cfg = timm.models.get_pretrained_cfg(base.name) if base is not None and base.source == "timm" else None
        source = (base_cfg or timm.models.get_pretrained_cfg(architecture)).to_dict()
        keys = PREPROCESSING_KEYS + (PROVENANCE_KEYS if pretrained else ())
        pretrained_cfg.update({k: source[k] for k in keys if source.get(k) is not None})
    pretrained_cfg["architecture"] = architecture
    config: dict[str, Any] = {"architecture": architecture, "pretrained_cfg": pretrained_cfg}
    if num_classes is not None:
        config["num_classes"] = num_classes
    return json.dumps(config, indent=2, sort_keys=True, default=list) + "\n"


def torchvision_preprocessing(name: str, *, pretrained: bool) -> dict[str, Any]:
    """A timm ``pretrained_cfg`` for a torchvision classification model: its weights' own preset (resize, crop,
    interpolation, mean/std; the tag's weights, else the library's default weights), and with `pretrained`, where
    the weights come from."""

    arch, tag = split_tag(name)
    weights = torchvision_weights_enum(arch)[tag or "DEFAULT"]
    preset = weights.transforms()
    crop, resize = preset.crop_size[0], preset.resize_size[0]
    cfg: dict[str, Any] = {
        "input_size": (3, crop, crop),
        "interpolation": preset.interpolation.value,
        "crop_pct": round(crop / resize, 4),
        "crop_mode": "center",
        "mean": tuple(preset.mean),
        "std": tuple(preset.std),
        "num_classes": len(weights.meta["categories"]),
    }
    if pretrained:
        cfg["origin_url"] = weights.url
        cfg["description"] = f"torchvision {weights}"
    return cfg
