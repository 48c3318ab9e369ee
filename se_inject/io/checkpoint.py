"""Saving and loading: a folder with ``model.safetensors`` (weights + the plan in its metadata) and ``report.json``.

A folder is staged complete and swapped in with one atomic step (see `atomic`), so an interrupted run leaves either
the previous output or the complete new one. ``load`` validates the plan and the weights' digest, rebuilds the base
model (timm/torchvision names only; code only when trusted), replays the plan and loads the weights strictly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..engine.build import build_model
from ..engine.coverage import check_calls
from ..engine.meta import as_meta
from ..engine.plan import Plan
from ..engine.resolve import ModelSpec, registered
from ..engine.schema import plan_from_data
from ..engine.surgery import apply_plan
from ..engine.weights import check_state_dict, load_state
from ..errors import CheckpointError, SEInjectError, WeightsError
from .checkpoint_file import (
    DIGEST_PLACEHOLDER,
    DTYPES,
    WEIGHTS_HASH_KEY,
    check_file_size,
    check_weights_digest,
    model_file,
    read_metadata,
    read_reason,
    write_safetensors_file,
)
from .features import feature_options, is_feature_extractor, wrap_features

REPORT_FILE = "report.json"
PLAN_KEY = "se_inject.plan"
PLAN_HASH_KEY = "se_inject.plan_sha256"


def library_versions() -> dict[str, str]:
    import timm
    import torchvision


    return {"se_inject": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "torchvision": torchvision.__version__}


def checkpoint_metadata(plan: Plan) -> dict[str, str]:
    text = plan.to_json()
    return {
        "format": "pt",
        PLAN_KEY: text,
        PLAN_HASH_KEY: hashlib.sha256(text.encode()).hexdigest(),
        WEIGHTS_HASH_KEY: DIGEST_PLACEHOLDER,  # the writer fills in the digest of the tensors it streams
        "se_inject.versions": json.dumps(library_versions(), sort_keys=True),
    }


def state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict, detached; refuses a model without data."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if any(t.is_meta for t in state.values()):
        raise SEInjectError("the model lives on the meta device and has no weights to save")
    return state


def write_checkpoint(model: nn.Module, plan: Plan) -> Callable[[Path], None]:
    """A writer of `model`'s weights with `plan` in the metadata; refuses, before anything is written, a plan that
    `load` would refuse (the same schema and limits apply at save as at load)."""
    try:
        plan_from_data(json.loads(plan.to_json()))
    except CheckpointError as e:
        raise SEInjectError(f"cannot save: a folder with this plan would not load ({e})") from None

    def write(path: Path) -> None:
        write_safetensors_file(path, state_for_saving(model), checkpoint_metadata(plan))

    return write


def write_text(text: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(text, encoding="utf-8")

    return write



def read_plan(path: str | Path) -> Plan:
    """The plan stored in a saved checkpoint, verified against its checksum and validated field by field."""

    file = model_file(path)
    metadata = read_metadata(file)
    text = metadata.get(PLAN_KEY)
    if text is None:
        raise CheckpointError(f"{file}: no se-inject plan in its metadata (a plain checkpoint? use --weights)")
    if metadata.get(PLAN_HASH_KEY) != hashlib.sha256(text.encode()).hexdigest():
        raise CheckpointError(f"{file}: the plan in its metadata was modified (checksum mismatch)")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{file}: the plan in its metadata is not valid JSON ({str(e)[:120]})") from None
    try:
        return plan_from_data(data)
    except CheckpointError as e:
        raise CheckpointError(f"{file}: {e}") from None



def _check_model_spec(spec: ModelSpec, file: Path, metadata: dict[str, str], trust_code: bool) -> None:
    """Only registry names are built from a folder; code named by it runs only with `trust_code`."""
    if spec.source == "python":
        if not trust_code:
            raise CheckpointError(
                f"{file}: the plan's model is code ({spec.name}); se-inject never runs code named by a folder. "
                "Pass the model yourself: load(DIR, model=...) or --model FILE.py:FACTORY; or, if you trust this "
                "folder, trust_code=True / --trust-code"
            )
        return
    if not registered(spec):
        saved = _saved_version(metadata, spec.source)
        installed = library_versions()[spec.source]
        raise CheckpointError(f"{file}: plan field 'model.name': {spec.source} {installed} has no model "
                              f"{spec.name!r} (the folder was saved with {spec.source} {saved})")


def _saved_version(metadata: dict[str, str], library: str) -> str:
    """The library's version the folder records (untrusted text: any parse failure reads as unknown)."""
    try:
        saved = json.loads(metadata.get("se_inject.versions", "{}")).get(library)
    except (ValueError, AttributeError, RecursionError):
        saved = None
    return saved[:40] if isinstance(saved, str) else "another version"


def _check_anchors(model: nn.Module, plan: Plan, file: Path) -> None:
    """Each site's anchor is a child module of its block (a graph node anchor is checked when the block is traced;
    a missing block is reported by `apply_plan`, naming the site's path)."""
    for i, site in enumerate(plan.sites):
        if not site.anchor or site.anchor.startswith("%"):
            continue
        try:
            block = model.get_submodule(site.path)
        except AttributeError:
            continue
        try:
            block.get_submodule(site.anchor)
        except AttributeError:
            raise CheckpointError(f"{file}: plan field 'sites[{i}].anchor': {site.path or 'the model'} has no child "
                                  f"module {site.anchor[:80]!r}") from None


def _header_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The file's tensors as meta tensors (names, shapes, dtypes from its header): no data is read."""
    from safetensors import SafetensorError, safe_open

    codes = {code: dtype for dtype, code in DTYPES.items()}
    tensors = {}
    try:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no iterator)
                piece = f.get_slice(key)
                dtype = codes.get(piece.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{file}: tensor {key[:80]!r} has dtype {piece.get_dtype()[:20]!r}, which "
                                          "se-inject does not write")
                tensors[key] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{file}: cannot read the weights ({read_reason(e)})") from None
    return tensors


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    try:
        check_state_dict(model, state, f"{file}: the weights")
    except WeightsError as e:
        raise CheckpointError(f"{e} (they do not match the plan)") from None
    _check_dtypes(model, state, file)


def _check_dtypes(model: nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    """Integer and bool tensors have the model's dtype; floating-point ones may all be saved in another precision
    (a model saved after ``.half()``), but one precision for each of the model's: a single F16 tensor among F32 ones
    would load, then fail the first forward."""
    own = model.state_dict(keep_vars=True)
    saved_as: dict[torch.dtype, tuple[str, torch.dtype]] = {}
    for key, tensor in state.items():
        expected = own[key]
        first = saved_as.setdefault(expected.dtype, (key, tensor.dtype))
        if tensor.is_floating_point() != expected.is_floating_point() or (
            not tensor.is_floating_point() and tensor.dtype != expected.dtype
        ):
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {tensor.dtype} in the file, the model expects "
                                  f"{expected.dtype} (a damaged header?)")
        if tensor.dtype != first[1]:
            raise CheckpointError(f"{file}: tensor {key[:80]!r} is {tensor.dtype} in the file, {first[0][:80]!r} "
                                  f"(also {expected.dtype} in the model) is {first[1]}: mixed precisions (a damaged "
                                  "or edited file?)")


def _check_calls(model: nn.Module, plan: Plan, file: Path) -> None:
    """Every inserted module must run exactly once per call of its block, on the planned map, on every forward path
    (`se_inject.engine.coverage`): a plan whose module would be dead code, or sit on another map, is refused, naming
    the plan field it contradicts."""
    problems = check_calls(model, plan)
    if problems:
        path, problem = next(iter(problems.items()))
        index = next(i for i, s in enumerate(plan.sites) if s.path == path)
        field = f"plan field 'sites[{index}].{problem.field}': " if problem.field else ""
        raise CheckpointError(f"{file}: the plan does not fit the model: {field}{problem}")


def load(
    path: str | Path,
    *,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
    trust_code: bool = False,
    verify_weights: bool = True,
    features_only: bool = False,
    out_indices: tuple[int, ...] | list[int] | None = None,
    feature_cls: str | None = None,
) -> nn.Module:
    """Rebuild a saved model: base model from the plan's spec (or `model`), replay the plan, load weights strictly.

    Nothing named by the folder is imported or executed: only timm and torchvision models are built by registry
    name. A plan whose model is code (``FILE.py:factory``) needs `model` (the base model, built by you) or
    `trust_code=True`. The plan is validated field by field and the weights against their digest first
    (`verify_weights=False` skips the digest, a full read of the file, for very large checkpoints).

    With `features_only` (or a timm feature extractor as `model`, whose out_indices are kept) the result is the
    feature extractor timm's ``create_model(name, features_only=True, out_indices=..., feature_cls=...)`` builds,
    around the SE model.

    Returns the model in eval mode on `device`.
    """
    from safetensors import SafetensorError, safe_open

    if model is not None and is_feature_extractor(model):
        features_only, out_indices, model = True, out_indices or feature_options(model).get("out_indices"), None
    file = model_file(path)
    plan = read_plan(file)
    if model is None and plan.model is None:
        raise CheckpointError(f"{file}: saved from a model object; pass the base model: load(path, model=...)")
    if model is None:
        assert plan.model is not None
        _check_model_spec(plan.model, file, read_metadata(file), trust_code)
    check_file_size(file)
    # Everything the plan says is checked against the model on the meta device first (its anchors, its channels,
    # every tensor's shape and dtype in the file): nothing is allocated, and nothing but the header read, for a plan
    # that does not fit.

    try:
        if model is None:
            assert plan.model is not None
            probe = build_model(plan.model, device="meta")
        else:
            probe = as_meta(model)
        _check_anchors(probe, plan, file)
        probe = apply_plan(probe, plan, inplace=probe is not model)  # never changes the caller's model
        _check_calls(probe, plan, file)
    except CheckpointError:
        raise
    except SEInjectError as e:
        raise CheckpointError(f"{file}: the plan does not fit the model: {e}") from None
    _check_state(probe, _header_tensors(file), file)
    if verify_weights:
        check_weights_digest(file)
    try:
        with safe_open(str(file), "pt") as f:
            # Cloned into torch's own (64-byte aligned) memory: kernels then take the same paths as for the saved
            # model, and outputs are bit-identical.
            state = {key: f.get_tensor(key).clone() for key in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{file}: cannot read the weights ({read_reason(e)})") from None
    _check_state(probe, state, file)
    try:
        if model is not None:
            rebuilt = apply_plan(model, plan)
        elif set(dict(probe.named_buffers())) - set(state):
            # The model has state that is not in the file (non-persistent buffers), which only a real build computes.
            assert plan.model is not None
            rebuilt = apply_plan(build_model(plan.model, seed=plan.seed), plan, inplace=True)
        else:  # weights are assigned from the file into the meta build: no init cost
            rebuilt = probe
    except SEInjectError as e:
        raise CheckpointError(f"{file}: the plan does not fit the model: {e}") from None
    try:
        load_state(rebuilt, state)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: cannot load the weights into the model ({read_reason(e)})") from None
    if features_only:
        options = {k: v for k, v in (("out_indices", out_indices), ("feature_cls", feature_cls)) if v is not None}
        rebuilt = wrap_features(rebuilt, plan, **options)
    return rebuilt.to(device).eval()
