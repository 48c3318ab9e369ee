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

What "exactly" means: bit for bit (`difference`). The inserted module's gate is exactly 1 (gate(0) = 0.5 times a gain
of 2, both powers of two), so the rewritten block computes the original block's operations in the original order on
the same values. The fused forms of `engine.fusion` are exact there too: at a scale of exactly 1,
``addcmul(r, x, 1)`` rounds ``r + x`` once, as the plain addition does. Only with gates other than 1 (a trained
model) does fusion reorder floating-point work; those results agree within `FUSED_TOLERANCE`.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Hashable
from dataclasses import replace
from typing import Any, Final

import torch
from torch import nn

from ..errors import SEInjectError, describe
from ..layers.attention import create_attention, identity_gain, init_attention
from ..settings import SESettings
from .keys import config_key, freeze
from .meta import meta_copy, training_flags
from .plan import Plan, Site, Skip
from .record import Call, TensorArg, leaves, map_values
from .surgery import insert

FUSED_TOLERANCE: Final = {"rtol": 1.3e-6, "atol": 1e-5}
"""How far a fused block (`engine.fusion`) may be from its unfused form where the gates are not exactly 1: the fused
residual rounds ``r + x * s`` once where the unfused form rounds the product and the sum, and the narrow squeeze
under torch.compile takes the mean before a 1x1 convolution and a BatchNorm instead of after them. These are
`torch.testing.assert_close`'s float32 defaults, as keyword arguments; measured on timm's test_resnet with trained
gates, a fused model is within 4e-7 of the unfused one (about 2 ulp at |y| ~ 1.5). The verifier itself never needs
it: a pass-through module gives bitwise-equal results (module docstring)."""

CHECK_FLOPS: Final = 600e9
"""The most FLOPs one pass of a check at the recorded input size may take (a check runs four: eval and training,
original and rewritten, on one thread); a block over it is refused, never run. Checks on shrunk maps stay far below
it. The heaviest block the full scan verifies, sapiens2-giant's at 1024x768 tokens, takes 580; sapiens2's 5B ViT
takes 1,350 and gigabytes (its tokens cannot shrink: its rotary embeddings come from its parent), and hung the scan."""

# --- the check -----------------------------------------------------------------------------------------------------


def _float_kind(value: float) -> str:
    """A descendant's float setting by kind only (zero, one, positive, negative, nan): children are called as they
    are by both the original and the rewritten forward, so their exact values cannot decide whether the rewrite is
    equivalent, only whether a child may hand back its input (a rate of 0). Blocks of one stage with
    stochastic-depth rates rising block by block are then checked once, not once each."""
    return "nan" if math.isnan(value) else "0" if value == 0 else "1" if value == 1 else "+" if value > 0 else "-"


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
    with training_flags(block):  # a block of the caller's model, run as it is: leave its modes as they were
        try:
            work = _real_copy(block)
        except Exception as e:  # any failure refuses the site
            return f"cannot verify the rewrite ({type(e).__name__}: {describe(e)})"
        return _compare(work, site, call)


def _compare(work: nn.Module, site: Site, call: Call) -> str | None:

    inputs, original = None, None
    # Small maps first, NCHW then NHWC (SAM's blocks take (N, H, W, C): at the recorded 64x64 tokens, its global
    # attention needs gigabytes); the recorded size only where neither runs; the recorded batch of 1 last (TNT's
    # pixel stream has the batch times the patches as its first dimension: at batch 2 it no longer fits).
    shrinks = [(2, f, last) for last in (False, True) if (f := call.shrink_factor(channels_last=last)) > 1]
    for batch, shrink, last in [*shrinks, (2, 1, False), (1, 1, False)]:
        if batch == 2 and shrink == 1 and (flops := check_flops(work, call)) > CHECK_FLOPS:
            return (f"cannot verify the rewrite: checking the block at its recorded input size takes about "
                    f"{flops / 1e9:,.0f} GFLOP a pass, more than the verifier's {CHECK_FLOPS / 1e9:,.0f}; "
                    "plan at a smaller --input-size")
        inputs = call.build(batch, torch.Generator().manual_seed(0), shrink, channels_last=last)
        try:
            original = _run_modes(work, inputs)
            break
        except Exception as e:
            failure = e
    if original is None:
        return f"cannot verify the rewrite: the block fails on recorded inputs ({type(failure).__name__})"
    try:
        module = create_attention(replace(site.attention, gain=identity_gain(site.attention.gate_layer)))
        init_attention(module, "identity")
        original_block, work = work, _rewritable(work)
        insert(work, site, module)
    except SEInjectError as e:
        return str(e).removeprefix(f"{site.path}: ")
    except Exception as e:
        return f"cannot rewrite the block ({type(e).__name__}: {describe(e)})"
    taken: list[tuple[int, ...]] = []  # the shapes of the maps the module takes
    handle = module.register_forward_pre_hook(lambda _m, a: taken.append(tuple(a[0].shape)))
    try:
        rewritten = _run_modes(work, inputs)
    except Exception as e:
        return f"the rewritten block fails where the original runs ({type(e).__name__}: {describe(e)})"
    finally:
        handle.remove()
    for mode, (expected, got) in zip(("eval", "training"), zip(original, rewritten, strict=True), strict=True):
        for what, index in (("output", 0), ("inputs after the call", 1)):
            problem = difference(got[index], expected[index])
            if problem is not None:
                return f"the rewritten block's {what} differs from the original's in {mode} mode ({problem})"
        for key, value in expected[2].items():
            if difference(got[2][key], value) is not None:
                return f"the rewritten block updates {key} differently in {mode} mode"
    if shrink > 1 or not taken or site.attention.channels_last:  # token features: their axes are checked by coverage
        return None
    return _layout_problem(original_block, work, site.name, call, taken[0])


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
        isinstance(leaf, TensorArg) and len(leaf.shape) == 4 for leaf in leaves((call.args, call.kwargs))
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


def check_flops(block: nn.Module, call: Call) -> int:
    """The FLOPs of one eval-mode pass of `block` on the recorded inputs at batch 2, counted on a meta copy (0 where
    it does not run there: the real check then decides)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), training_flags(block), counter:
            args, kwargs = call.build(2, None)
            meta_copy(block).eval()(*args, **kwargs)
    except Exception:
        return 0
    return counter.get_total_flops()


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


def difference(got: Any, expected: Any) -> str | None:
    """How `got` differs from `expected`, or None where they are exactly equal: nested tuples, lists and dicts of
    the same structure, tensors of the same shape and dtype with every element equal (NaN where `expected` has NaN;
    ``-0.0 == 0.0``), other values equal by ``==``."""
    if isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor):
        return _tensor_difference(got, expected)
    if isinstance(got, (tuple, list)) and isinstance(expected, (tuple, list)) and type(got) is type(expected):
        if len(got) != len(expected):
            return f"{len(got)} items where the original has {len(expected)}"
        return next((f"item {i}: {d}" for i, (a, b) in enumerate(zip(got, expected, strict=True))
                     if (d := difference(a, b)) is not None), None)
    if isinstance(got, dict) and isinstance(expected, dict):
        if got.keys() != expected.keys():
            return f"keys {sorted(map(str, got))} where the original has {sorted(map(str, expected))}"
        return next((f"{k!r}: {d}" for k in expected if (d := difference(got[k], expected[k])) is not None), None)
    if type(got) is not type(expected):  # a tensor against a non-tensor included
        return f"{type(got).__name__} where the original has {type(expected).__name__}"
    try:
        same = bool(got == expected)
    except Exception:  # a value without a truth value for ==: not comparable, so not shown equal
        same = False
    return None if same else f"{got!r} where the original has {expected!r}"


def _tensor_difference(got: torch.Tensor, expected: torch.Tensor) -> str | None:
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return f"{tuple(got.shape)} {got.dtype} where the original has {tuple(expected.shape)} {expected.dtype}"
    with torch.no_grad():
        if torch.equal(got, expected):
            return None
        differ = got != expected
        if got.is_floating_point() or got.is_complex():
            differ &= ~(got.isnan() & expected.isnan())
        count = int(differ.sum())
        if not count:
            return None
        worst = ""
        if got.is_floating_point():
            worst = f", by up to {(got[differ] - expected[differ]).abs().max().item():.3g}"
        return f"{count} of {got.numel()} values differ{worst}"


def _clone(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.clone()
    return map_values(inputs, _clone)


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
    """One check per verdict key: the rewritten class (the exact code that ships: generated classes are one per
    code), the block's own state exactly and its descendants' with floats by kind (`config_key`), the site and the
    call. A block whose state cannot be keyed exactly is checked on its own."""
    verdicts: dict[Hashable, str | None] = {}
    probes: dict[SESettings, nn.Module] = {}  # one meta module per spec for the class probes
    kept: list[Site] = []
    refused: list[Skip] = []
    for site in plan.sites:
        call = calls.get(site.path)
        if call is None:
            refused.append(Skip(site.path, site.block, site.recipe, "cannot verify the rewrite: no recorded call"))
            continue
        block = model.get_submodule(site.path)
        config = config_key(block, _float_kind)
        key = None if config is None else (
            _rewritten_type(block, site, probes), config, site.anchor, site.position, site.slot, site.name,
            freeze(site.attention.to_dict()), freeze(site.fixed_args), call.signature())
        reason = verdicts[key] if key in verdicts else check_site(block, site, call)
        if key is not None:
            verdicts[key] = reason
        if reason is None:
            kept.append(site)
        else:
            refused.append(Skip(site.path, site.block, site.recipe, reason))
    return replace(plan, sites=tuple(kept)), tuple(refused)


def _rewritten_type(block: nn.Module, site: Site, modules: dict[SESettings, nn.Module]) -> Any:
    """The class the site's rewrite gives `block` (on a shallow copy with a meta module), or the failure's text."""
    try:
        probe = _rewritable(block)
        if site.attention not in modules:
            modules[site.attention] = create_attention(site.attention, device="meta")
        insert(probe, site, modules[site.attention])
    except Exception as e:
        return f"{type(e).__name__}: {describe(e)}"
    return type(probe)
