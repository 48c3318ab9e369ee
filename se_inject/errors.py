"""Typed errors. Each says what went wrong and what to do next; the CLI turns them into one line and an exit code."""

from __future__ import annotations

import re


class SEInjectError(Exception):
    """Base class. `exit_code` is what the CLI exits with: 1 for a problem with the inputs' content, 2 for bad usage."""

    exit_code = 1


class UsageError(SEInjectError, ValueError):
    """An option has an invalid value (bad reduction, unknown recipe name, malformed input size, ...)."""

    exit_code = 2


class UnknownModelError(SEInjectError, LookupError):
    """No timm or torchvision model has this name."""

    def __init__(self, name: str, suggestions: list[str] | tuple[str, ...] = (), hint: str = ""):
        self.name = name
        self.suggestions = tuple(suggestions)
        if not hint:
            hint = f"did you mean {', '.join(self.suggestions)}?" if self.suggestions else "see timm.list_models()"
        super().__init__(f"unknown model {name!r}; {hint}")


class UnknownRecipeError(UsageError, LookupError):
    """A recipe name that is not registered."""


class RecipeFileError(UsageError):
    """A recipe file that is not valid TOML or does not follow the recipe format."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


class NoSitesError(SEInjectError):
    """No recipe found a block to put SE in (or the filters removed every site).

    `reason` is "no-match" (no block a recipe names), "already-attention" (every matching block has channel
    attention already), "partial-attention" (some have it, some lack it; ``fill`` adds SE to those), "ineligible"
    (matching blocks have no place for SE), "filtered" (the filters removed all) or "unverified" (every rewrite
    failed its equivalence check, see `verify`). `existing`: how many matching blocks already have channel
    attention.
    """

    def __init__(self, message: str, reason: str = "no-match", existing: int = 0):
        super().__init__(message)
        self.reason = reason
        self.existing = existing


class SurgeryError(SEInjectError):
    """A matched block could not be rewritten (its forward cannot be traced, an anchor is missing, ...)."""


class WeightsError(SEInjectError):
    """A weights file is missing, unreadable, unsafe, or does not fit the model."""


class OutputExistsError(SEInjectError, FileExistsError):
    """The output already exists and --force was not given."""


class CheckpointError(SEInjectError):
    """A saved se-inject checkpoint is incomplete, tampered with, or does not match its plan."""


class ExportError(SEInjectError):
    """An export format is unavailable or its round-trip check failed."""


class EnvironmentProblem(SEInjectError):
    """The installed libraries do not work together (a torch and a torchvision built for different versions)."""


def torch_pair_problem(e: BaseException) -> EnvironmentProblem | None:
    """An `EnvironmentProblem` naming both versions and what to install when `e` is torchvision failing to import
    (its C++ operators were built for another torch: "operator torchvision::nms does not exist"), else None."""
    frames = []
    tb = e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    in_import = any(f.co_name == "<module>" and "torchvision" in f.co_filename.replace("\\", "/").split("/")
                    for f in frames)
    if not (re.search(r"torchvision::\w+ does not exist", str(e)) or in_import):
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version, vision_version = version("torch"), version("torchvision")
    except PackageNotFoundError:
        return None
    base = torch_version.split("+", 1)[0]
    major, minor = [*base.split("."), "0"][:2]
    matching = f"0.{int(minor) + 15}.*" if major == "2" and minor.isdigit() else "the release built for it"
    return EnvironmentProblem(
        f"torch {torch_version} and torchvision {vision_version} do not work together ({describe(e, 80)}); install "
        f"a matching pair from one index, e.g. pip install --force-reinstall 'torch=={base}' "
        f"'torchvision=={matching}' --index-url https://download.pytorch.org/whl/cpu (without --index-url for CUDA)"
    )


_BUILD_NOISE = re.compile(
    r"\s*\(Triggered internally at [^)]*\)"  # torch's C++ warnings
    r"|\s*\[enforce fail at [^\]]*\]\s*\.?"  # caffe2's checks
    r"|\s*\(?(?:at|from)?\s*(?:/|\.\./)[\w./+-]*(?:aten|c10|caffe2|torch/csrc|third_party)/[\w./+-]*(?::\d+)?\)?"
)


def describe(e: BaseException | str, limit: int = 200, *, kind: bool = False) -> str:
    """The first line of an exception's message, without library build paths, shortened at a word boundary: the one
    way se-inject quotes an exception. `kind` puts the exception's type in front (``ValueError: ...``, or the type
    alone where the message is empty)."""
    lines = str(e).strip().splitlines()
    text = _BUILD_NOISE.sub("", lines[0] if lines else "").strip() or (type(e).__name__ if lines else "")
    if kind and isinstance(e, BaseException):
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return shorten(text, limit)


def shorten(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters at a word boundary, with an ellipsis where it was cut."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:") + "…"
