"""Exports that run without se-inject: TorchScript, torch.export and ONNX files, and plain-timm folders.

Every export is loaded back right after writing and compared with the eager model; the maximum absolute
difference is returned.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ExportError, OutputExistsError, SEInjectError
from .plan import Plan

FORMATS = {"torchscript": ".pt", "exported": ".pt2", "onnx": ".onnx"}


@dataclass(frozen=True)
class ExportResult:
    format: str
    path: str
    max_abs_diff: float | None  # None where the file could not be run back (ONNX without onnxruntime)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "path": self.path, "max_abs_diff": self.max_abs_diff, "note": self.note}


def example_input(plan: Plan, *, batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *plan.input_size), generator=generator)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def export_writer(model: nn.Module, plan: Plan, fmt: str, final: Path, results: list[ExportResult]) -> Any:
    """A writer (``fn(target_path)``) that exports `model` in `fmt`, loads the file back, compares it with the eager
    model and appends the outcome to `results`. `final` is the path the file will be renamed to."""
    if fmt not in FORMATS:
        raise SEInjectError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    label, save, run_back = _WRITERS[fmt]

    def write(target: Path) -> None:
        training = model.training
        model.eval()
        x = example_input(plan).to(next((p.device for p in model.parameters()), torch.device("cpu")))
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit's deprecation notices, exporter chatter
                expected = model(x)
                try:
                    save(model, x, target)
                    got = run_back(target, x)
                except ExportError:
                    raise
                except Exception as e:
                    raise ExportError(f"{label} export failed: {_first_line(e)}") from None
        finally:
            model.train(training)
        if got is None:
            results.append(ExportResult(fmt, str(final), None, "checked with onnx; install onnxruntime to run it"))
        else:
            results.append(ExportResult(fmt, str(final), _max_diff(got, expected)))

    return write


def export(model: nn.Module, plan: Plan, fmt: str, path: str | Path, *, force: bool = False) -> ExportResult:
    """Write `model` in `fmt` to `path` (atomically), load it back and compare with the eager model."""
    from .checkpoint import write_atomically

    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to overwrite it")
    results: list[ExportResult] = []
    write_atomically(path.parent, {path.name: export_writer(model, plan, fmt, path, results)}, force=True)
    return results[0]


def _save_torchscript(model: nn.Module, x: torch.Tensor, target: Path) -> None:
    torch.jit.script(model).save(str(target))


def _run_torchscript(target: Path, x: torch.Tensor) -> torch.Tensor:
    return torch.jit.load(str(target))(x)


def _save_exported(model: nn.Module, x: torch.Tensor, target: Path) -> None:
    torch.export.save(torch.export.export(model, (x,)), str(target))


def _run_exported(target: Path, x: torch.Tensor) -> torch.Tensor:
    return torch.export.load(str(target)).module()(x)


def _save_onnx(model: nn.Module, x: torch.Tensor, target: Path) -> None:
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'se-inject[onnx]'") from None
    with tempfile.TemporaryDirectory() as tmp:  # the exporter writes next to its target; keep that out of sight
        tmp_file = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (x,), str(tmp_file), dynamo=True, external_data=False, verbose=False)
        onnx.checker.check_model(onnx.load(str(tmp_file)))
        target.write_bytes(tmp_file.read_bytes())


def _run_onnx(target: Path, x: torch.Tensor) -> torch.Tensor | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})[0])


_WRITERS = {  # format: (name in messages, write the file, load it back and run it)
    "torchscript": ("TorchScript", _save_torchscript, _run_torchscript),
    "exported": ("torch.export", _save_exported, _run_exported),
    "onnx": ("ONNX", _save_onnx, _run_onnx),
}


# --- plain timm --------------------------------------------------------------------------------------------------


def timm_architecture(plan: Plan) -> str | None:
    """The timm model name whose architecture the injected model is exactly, if any.

    Candidates are ``<attention><base name>`` (``resnet50`` -> ``seresnet50``); a candidate counts when its
    state_dict has the same keys and shapes and, given the same random weights and norm statistics, it computes the
    same outputs (checked on fresh CPU builds, independent of any model's own, possibly degenerate, weights).
    """
    import timm

    from .models import build_model
    from .surgery import apply_plan

    if plan.model is None or not plan.sites:
        return None
    kinds = {s.attention.kind for s in plan.sites}
    if len(kinds) != 1 or any(s.attention.gain != 1.0 for s in plan.sites):
        return None
    candidate = f"{kinds.pop()}{plan.model.name.split('.', 1)[0]}"
    if not timm.is_model(candidate):
        return None
    with torch.device("meta"):
        reference = timm.create_model(candidate)
    ours = apply_plan(build_model(plan.model, device="meta"), plan, inplace=True)  # cheaper than copying `model`
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    if {k: tuple(v.shape) for k, v in reference.state_dict().items()} != shapes:
        return None
    if any(set(dict(m.named_buffers())) - set(shapes) for m in (reference, ours)):
        return None  # state outside the state_dict: cannot be given the same values
    state = _random_state(ours)
    x = torch.randn(1, plan.input_size[0], 48, 48, generator=torch.Generator().manual_seed(0))
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


def timm_config(architecture: str, num_classes: int | None = None) -> str:
    """``config.json`` for ``timm.create_model("local-dir:DIR", pretrained=True)``."""
    import timm

    pretrained_cfg = dict(timm.models.get_pretrained_cfg(architecture).to_dict())
    for key in ("url", "hf_hub_id", "hf_hub_filename", "hf_hub_revision", "file", "source", "tag"):
        pretrained_cfg.pop(key, None)
    config: dict[str, Any] = {"architecture": architecture, "pretrained_cfg": pretrained_cfg}
    if num_classes is not None:
        config["num_classes"] = num_classes
    return json.dumps(config, indent=2, sort_keys=True, default=list) + "\n"
