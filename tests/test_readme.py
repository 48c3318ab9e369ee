"""Every python and bash snippet of the README runs, top to bottom, as a newcomer would paste it.

ResNet-50 becomes ResNet-18 (same family, same recipes, a quarter of the time), and pretrained weights are random
files placed in a temporary cache, so nothing is downloaded. Lines that cannot run here are skipped, each with its
reason (`SKIPPED`); anything else in a bash block must be an `se-inject` command.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import hf_cache
from typer.testing import CliRunner

from se_inject.cli.commands import app

README = Path(__file__).resolve().parent.parent / "README.md"
SUBSTITUTIONS = (("torchvision:resnet50.IMAGENET1K_V2", "torchvision:resnet18.IMAGENET1K_V1"), ("resnet50", "resnet18"))
SKIPPED = {  # a line's start -> why it is not run here
    "pip install": "installs packages (no network here; the test runs in the installed environment)",
    "python -m pytest": "the test suite itself",
    "ruff check": "the linter, run by CI",
    "lint-imports": "the import contracts, run by CI",
    "python benchmarks/": "benchmarks: minutes of measurement",
    "python train.py": "timm's training script lives in timm's repository, and needs ImageNet",
}

runner = CliRunner()


def blocks() -> list[tuple[int, str, str]]:
    """(line, language, text) of every fenced python, bash and toml block, in README order."""
    text = README.read_text(encoding="utf-8")
    found = []
    for m in re.finditer(r"^```(\w+)\n(.*?)^```", text, re.S | re.M):
        if m.group(1) in ("python", "bash", "toml"):
            body = m.group(2)
            for old, new in SUBSTITUTIONS:
                body = body.replace(old, new)
            found.append((text[: m.start()].count("\n") + 1, m.group(1), body))
    return found



@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh folder with resnet18's weights in timm's (Hugging Face) and torchvision's (torch.hub) caches."""
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    state = {k: v.clone() for k, v in torchvision.models.resnet18().state_dict().items()}
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache(tmp_path / "hf", "timm/resnet18.a1_in1k", state)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1])
    return tmp_path


def run_bash(text: str, line: int) -> list[str]:
    """Run each `se-inject` command of a bash block; returns the lines skipped."""
    skipped = []
    for command in text.splitlines():
        command = command.split("  #", 1)[0].strip()
        if not command:
            continue
        for part in (p.strip() for p in command.split("&&")):
            reason = next((why for start, why in SKIPPED.items() if part.startswith(start)), None)
            if reason:
                skipped.append(f"{part} ({reason})")
                continue
            args = shlex.split(part)
            assert args[0] == "se-inject", f"README line {line}: {part!r} is neither run nor skipped with a reason"
            if any(a.startswith("torchvision:") for a in args):
                args.append("--dry-run")  # plans and locates the weights; the torchvision builds are tested elsewhere
            result = runner.invoke(app, args[1:], env={"COLUMNS": "300"})
            assert result.exit_code == 0, f"README line {line}: {part}\n{result.stderr}"
    return skipped


def run_python(text: str, line: int) -> None:
    namespace = {"__name__": "readme", "loader": [(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))]}
    exec(compile(text, f"README.md:{line}", "exec"), namespace)


def run_readme(workdir: Path, *, pretrained: bool) -> list[str]:
    skipped = []
    for line, language, text in blocks():
        if not pretrained and "pretrained" in text:
            continue
        if language == "toml":  # the recipe examples: the first is the file the bash example names
            if not (workdir / "toy.toml").exists():
                (workdir / "toy.toml").write_text(text)
            continue
        if language == "python" and "def make():" in text:  # the worked example's own model, `mynets.py`
            (workdir / "mynets.py").write_text(text)
            continue
        if language == "bash":
            skipped += run_bash(text, line)
        else:
            run_python(text, line)
    assert (workdir / "resnet18-se16" / "config.json").is_file()  # the quickstart's folder, which plain timm reads
    return skipped


def test_readme_blocks_without_pretrained_weights(workdir):
    run_readme(workdir, pretrained=False)


@pytest.mark.slow
def test_readme_top_to_bottom(workdir):
    skipped = run_readme(workdir, pretrained=True)
    assert any("train.py" in s for s in skipped)
    assert (workdir / "out").is_dir() and (workdir / "out-mine").is_dir() and (workdir / "a1").is_dir()
