"""Verifying surgery: a rewritten block, with its new module passing its input through unchanged, must compute
exactly what the original block computes, on inputs shaped like the ones its parent really passes.

The planning forward (meta device) records each matched block's call: its positional and keyword arguments, with
tensors kept as shape and dtype. The non-tensor arguments (``shortcut=None``, a flag) are fixed when the block is
traced (`Call.fixed`), so torch.fx follows the branch the parent really takes. Then, once per distinct block
configuration, a real-valued copy of the block (the model's own block when it has real weights, else the meta block
materialised on the CPU and initialised) runs on random inputs built from the recording, at batch 2, next to the
same copy rewritten with an identity-initialised attention module (whose gate is exactly 1): outputs, the inputs
afterwards (in-place writes) and, in training mode, the updated buffers (BatchNorm statistics) must match, in eval
mode without autograd (where the module may scale in place) and in training mode with autograd. A site whose check
fails is refused with the reason.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .errors import SEInjectError
from .find import Skip
from .layers.attention import class_path, create_attention, identity_gain, init_attention
from .meta import meta_copy
from .plan import Plan, Site

FIXED_TYPES = (bool, int, float, str, type(None))  # argument values tracing specialises on (and a plan may hold)


@dataclass(frozen=True)
class TensorArg:
    """A recorded tensor argument: its shape, dtype, and which recorded tensor it is (the same tensor passed twice
    has the same `alias`)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    alias: int


class Opaque:
    """A recorded argument se-inject cannot rebuild (an arbitrary object)."""

    def __init__(self, value: Any):
        self.kind = type(value).__name__

    def __repr__(self) -> str:
        return f"<{self.kind}>"


@dataclass(frozen=True)
class Call:
    """How a block's parent called it (recorded by a forward pre-hook with ``with_kwargs=True``)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def fixed(self, forward: Any) -> dict[str, Any]:
        """The forward's parameters bound to a non-tensor value in this call (defaults included), by name: tracing
        specialises on these, and a call with other values fails the trace's own assertion instead of silently
        taking the other branch."""
        try:
            bound = inspect.signature(forward).bind(*self.args, **self.kwargs)
        except (TypeError, ValueError):
            return {}
        bound.apply_defaults()
        plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                 inspect.Parameter.KEYWORD_ONLY)
        params = bound.signature.parameters
        return {
            name: value for name, value in bound.arguments.items()
            if params[name].kind in plain and isinstance(value, FIXED_TYPES)
        }

    def first_tensor(self) -> TensorArg | None:
        return next((leaf for leaf in _leaves((self.args, self.kwargs)) if isinstance(leaf, TensorArg)), None)

    def signature(self) -> str:
        """A hashable description: tensors by rank and dtype, other values as they are."""
        return repr(_describe((self.args, self.kwargs)))

    def opaque(self) -> str | None:
        """The type of the first argument that cannot be rebuilt, if any."""
        for leaf in _leaves((self.args, self.kwargs)):
            if isinstance(leaf, Opaque):
                return leaf.kind
        return None

    def build(
        self, batch: int, generator: torch.Generator | None, shrink: int = 1, grow: int = 1
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Random inputs shaped like the recorded ones, with a batch dimension of 1 widened to `batch` and the
        spatial dimensions of NCHW tensors divided by `shrink` (multiplied by `grow`); without a generator, empty
        tensors on the meta device (shapes only)."""
        made: dict[int, torch.Tensor] = {}

        def make(value: Any) -> Any:
            if isinstance(value, TensorArg):
                if value.alias not in made:
                    shape = list(value.shape)
                    if shape and shape[0] == 1:
                        shape[0] = batch
                    if len(shape) in (4, 5):  # NCHW, or NCTHW (video: the frames stay)
                        shape[-2:] = [d // shrink * grow for d in shape[-2:]]
                    if generator is None:
                        made[value.alias] = torch.empty(shape, dtype=value.dtype, device="meta")
                    elif value.dtype.is_floating_point:
                        made[value.alias] = torch.randn(shape, generator=generator, dtype=torch.float32)
                    else:
                        made[value.alias] = torch.zeros(shape, dtype=value.dtype)
                return made[value.alias]
            return _map(value, make)

        return make(self.args), make(self.kwargs)

    def shrink_factor(self, smallest: int = 4) -> int:
        """The largest factor dividing every recorded NCHW tensor's height and width that leaves them at least
        `smallest` (1 when none does): the check runs on small maps of the same proportions."""
        dims = [d for leaf in _leaves((self.args, self.kwargs))
                if isinstance(leaf, TensorArg) and len(leaf.shape) in (4, 5) for d in leaf.shape[-2:]]
        if not dims:
            return 1
        common = math.gcd(*dims)
        return max((f for f in range(1, common + 1) if common % f == 0 and min(dims) // f >= smallest), default=1)


def _map(value: Any, fn: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(fn(v) for v in value)
    if isinstance(value, list):
        return [fn(v) for v in value]
    if isinstance(value, dict):
        return {k: fn(v) for k, v in value.items()}
    return value


def _leaves(value: Any) -> Iterable[Any]:
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    else:
        yield value


def _describe(value: Any) -> Any:
    if isinstance(value, TensorArg):
        return ("tensor", len(value.shape), str(value.dtype), value.alias)
    if isinstance(value, (tuple, list, dict)):
        return (type(value).__name__, _map(value, _describe))
    return value if isinstance(value, FIXED_TYPES) else repr(value)


def record_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
    """A `Call` from a forward pre-hook's arguments (tensors become `TensorArg`s; works on the meta device)."""
    aliases: dict[int, int] = {}

    def convert(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            alias = aliases.setdefault(id(value), len(aliases))
            return TensorArg(tuple(value.shape), value.dtype, alias)
        if isinstance(value, (tuple, list, dict)):
            return _map(value, convert)
        return value if isinstance(value, FIXED_TYPES) else Opaque(value)

    return Call(convert(tuple(args)), convert(dict(kwargs)))


# --- the check -----------------------------------------------------------------------------------------------------


def block_config(block: nn.Module) -> tuple[Any, ...]:
    """What a block's computation depends on besides its weights: every submodule's path, class and settings.

    The block's own settings count exactly; its descendants' float settings (a drop-path rate, a norm's eps) only
    by kind (zero, one, positive, negative, nan): the rewrite calls children as they are, so their exact values
    cannot decide whether it is equivalent, only whether a child may hand back its input (a rate of 0). Blocks of
    one stage with stochastic-depth rates rising block by block are then checked once, not once each."""
    return tuple(
        (path, class_path(m), _coarse_floats(m.extra_repr()) if path else m.extra_repr(), tuple(
            (k, _float_kind(v) if path and isinstance(v, float) else v) for k, v in sorted(vars(m).items())
            if not k.startswith("_") and k != "training" and isinstance(v, FIXED_TYPES)
        ))
        for path, m in block.named_modules()
    )


_FLOAT = re.compile(r"(?<![\w.])-?(?:\d+\.\d*|\.\d+)(?:[eE][-+]?\d+)?|(?<![\w.])-?\d+[eE][-+]?\d+")


def _float_kind(value: float) -> str:
    return "nan" if math.isnan(value) else "0" if value == 0 else "1" if value == 1 else "+" if value > 0 else "-"


def _coarse_floats(text: str) -> str:
    return _FLOAT.sub(lambda m: _float_kind(float(m.group())), text)


def materialize(block: nn.Module) -> nn.Module:
    """A CPU float32 copy of `block` with deterministic, finite values: PyTorch's default init where a module has
    one, BatchNorm statistics and affine parameters away from the identity, 0.5..1 elsewhere."""
    real = copy.deepcopy(block).to_empty(device="cpu").float()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)  # CPU only (not every device: 1 ms each)
        done: set[int] = set()  # parameters a module's own reset initialised (filling them first would be wasted)
        for m in real.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset) and not list(m.children()) and not isinstance(m, nn.modules.batchnorm._BatchNorm):
                try:
                    reset()
                except Exception:  # a custom reset that needs more: its parameters get the uniform values
                    continue
                done.update(id(t) for t in m.parameters(recurse=False))
        for t in itertools.chain(real.parameters(), real.buffers()):
            if id(t) in done:
                continue
            if t.is_floating_point():
                t.uniform_(0.5, 1.0)
            else:
                t.zero_()
        for m in real.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return real


def _real_copy(block: nn.Module) -> nn.Module:
    """A real-valued float32 CPU block to check: the block itself where it already is one (run as it is; training
    mode's buffer updates are undone, see `_run_modes`), else a materialised or converted copy."""
    tensors = list(itertools.chain(block.parameters(), block.buffers()))
    if any(t.is_meta for t in tensors):
        return materialize(block)
    if all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors):
        return block
    return copy.deepcopy(block).to(device="cpu", dtype=torch.float32)


def _rewritable(block: nn.Module) -> nn.Module:
    """A copy of `block` that the surgery may change (class, children) sharing its children and tensors."""
    clone = copy.copy(block)
    for name in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
        if name in vars(block):
            vars(clone)[name] = copy.copy(vars(block)[name])
    return clone


def check_site(block: nn.Module, site: Site, call: Call) -> str | None:
    """Why the site's rewrite of `block` is not exactly the original block with a pass-through module, or None when
    it is. `block` is left as it was: it runs as it is, then a shallow copy of it is rewritten."""
    kind = call.opaque()
    if kind is not None:
        return f"cannot verify the rewrite: the block is called with a {kind} argument"
    modes = [(m, m.training) for m in block.modules()]
    try:
        work = _real_copy(block)
    except Exception as e:  # any failure refuses the site
        return f"cannot verify the rewrite ({type(e).__name__}: {_first_line(e)})"
    try:
        return _compare(work, site, call)
    finally:
        for m, training in modes:  # a block of the caller's model, run as it is: leave its modes as they were
            m.training = training


def _compare(work: nn.Module, site: Site, call: Call) -> str | None:
    from .surgery import insert

    inputs, original = None, None
    for shrink in dict.fromkeys((call.shrink_factor(), 1)):  # small maps first; the recorded size if they fail
        inputs = call.build(2, torch.Generator().manual_seed(0), shrink)
        try:
            original = _run_modes(work, inputs)
            break
        except Exception as e:
            failure = e
    if original is None:
        return f"cannot verify the rewrite: the block fails on recorded inputs ({type(failure).__name__})"
    try:
        module = create_attention(replace(site.attention, gain=identity_gain(site.attention.gate)))
        init_attention(module, "identity")
        original_block, work = work, _rewritable(work)
        insert(work, site, module)
    except SEInjectError as e:
        return str(e).removeprefix(f"{site.path}: ")
    except Exception as e:
        return f"cannot rewrite the block ({type(e).__name__}: {_first_line(e)})"
    taken: list[tuple[int, ...]] = []  # the shapes of the maps the module takes
    handle = module.register_forward_pre_hook(lambda _m, a: taken.append(tuple(a[0].shape)))
    try:
        rewritten = _run_modes(work, inputs)
    except Exception as e:
        return f"the rewritten block fails where the original runs ({type(e).__name__}: {_first_line(e)})"
    finally:
        handle.remove()
    for mode, (expected, got) in zip(("eval", "training"), zip(original, rewritten, strict=True), strict=True):
        for what, index in (("output", 0), ("inputs after the call", 1)):
            try:
                if _equal(got[index], expected[index]):
                    continue
                torch.testing.assert_close(got[index], expected[index], equal_nan=True)
            except (AssertionError, TypeError, ValueError) as e:
                return f"the rewritten block's {what} differs from the original's in {mode} mode ({_first_line(e)})"
        for key, value in expected[2].items():
            if not torch.equal(got[2][key], value):
                return f"the rewritten block updates {key} differently in {mode} mode"
    return None if shrink > 1 or not taken else _layout_problem(original_block, work, site.name, call, taken[0])


def _layout_problem(
    original: nn.Module, work: nn.Module, name: str, call: Call, small: tuple[int, ...]
) -> str | None:
    """Whether the module `name` of the rewritten block `work` takes an NCHW map: on inputs twice the size, its
    input's dimension 1 (the channels it was built for) must stay and dimensions 2 and 3 must grow (strided layers
    round) from `small`, the map it took on the checked inputs. A channels-last map (N, H, W, C), e.g. a Linear
    layer's output, passes the check above where the inputs are not shrunk (on shrunk ones the module fails
    outright). Shapes are all it needs: it runs on meta copies. None also where the block does not run at the other
    size, with or without the module (it cannot tell)."""
    if len(small) != 4 or not any(
        isinstance(leaf, TensorArg) and len(leaf.shape) == 4 for leaf in _leaves((call.args, call.kwargs))
    ):
        return None  # no map to grow (tokens and sizes in, as XCiT's LPI)
    work = meta_copy(work).eval()
    large: list[tuple[int, ...]] = []
    handle = work.get_submodule(name).register_forward_pre_hook(lambda _m, a: large.append(tuple(a[0].shape)))
    args, kwargs = call.build(1, None, grow=2)
    try:
        with torch.no_grad():
            work(*args, **kwargs)
    except Exception as e:
        try:
            with torch.no_grad():
                meta_copy(original).eval()(*args, **kwargs)
        except Exception:
            return None
        return f"the map it would take is not NCHW: the module fails on inputs twice the size ({type(e).__name__})"
    finally:
        handle.remove()
    if large and (large[0][1] != small[1] or not all(b > d for b, d in zip(large[0][2:], small[2:], strict=True))):
        return f"the map it would take is not NCHW: {small}, then {large[0]} on inputs twice the size"
    return None


def _run_modes(block: nn.Module, inputs: Any) -> list[tuple[Any, Any, dict[str, torch.Tensor]]]:
    """Run `block` on copies of `inputs` in eval mode without autograd (where the attention module may scale in
    place) and in training mode with autograd, same random stream each time (dropout). For each mode: the output,
    the inputs afterwards, and the buffers afterwards; the buffers are put back after training mode."""
    results = []
    for training in (False, True):
        buffers = {k: v.clone() for k, v in block.named_buffers()}
        args, kwargs = _clone(inputs)
        block.train(training)
        try:
            with torch.random.fork_rng(devices=[]), torch.set_grad_enabled(training):
                torch.default_generator.manual_seed(0)
                out = block(*args, **kwargs)
            results.append((out, (args, kwargs), {k: v.clone() for k, v in block.named_buffers() if k in buffers}))
        finally:
            with torch.no_grad():
                for k, v in block.named_buffers():
                    if k in buffers:
                        v.copy_(buffers[k])
    return results


def _equal(a: Any, b: Any) -> bool:
    """Exactly equal nested outputs (the common case, cheaper than assert_close)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b


def _clone(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.clone()
    return _map(inputs, _clone)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else ""


def verify_plan(model: nn.Module, plan: Plan, calls: dict[str, Call]) -> tuple[Plan, tuple[Skip, ...]]:
    """Check every site of `plan` against `model` (meta or real; not modified), once per distinct block
    configuration, site settings and call signature. Returns the plan without the refused sites, and those sites
    as skips with the reason."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the checks run on tiny maps: threads only add synchronisation (10x on a busy CPU)
    try:
        return _verify_sites(model, plan, calls)
    finally:
        torch.set_num_threads(threads)


def _verify_sites(model: nn.Module, plan: Plan, calls: dict[str, Call]) -> tuple[Plan, tuple[Skip, ...]]:
    verdicts: dict[str, str | None] = {}
    kept: list[Site] = []
    refused: list[Skip] = []
    for site in plan.sites:
        call = calls.get(site.path)
        if call is None:
            refused.append(Skip(site.path, site.block, site.recipe, "cannot verify the rewrite: no recorded call"))
            continue
        block = model.get_submodule(site.path)
        key = json.dumps([site.block, repr(block_config(block)), site.anchor, site.position, site.slot, site.name,
                          site.attention.to_dict(), sorted(site.fixed_args.items()), call.signature()],
                         default=repr)
        if key not in verdicts:
            verdicts[key] = check_site(block, site, call)
        reason = verdicts[key]
        if reason is None:
            kept.append(site)
        else:
            refused.append(Skip(site.path, site.block, site.recipe, reason))
    return replace(plan, sites=tuple(kept)), tuple(refused)
