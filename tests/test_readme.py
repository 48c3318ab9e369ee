"""Every python and bash snippet of the README and of each docs/ page runs, top to bottom, as a newcomer would paste
it, each page in a fresh folder; and every link between the pages leads somewhere.

ResNet-50 becomes ResNet-18 (same family, same recipes, a quarter of the time), and pretrained weights are random
files placed in a temporary cache (and as `resnet18.safetensors`, the file the `--weights` examples name), so
nothing is downloaded. Lines that cannot run here are skipped, each with its reason (`SKIPPED`); anything else in a
bash block must be an `se-inject` command.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import hf_cache
from safetensors.torch import save_file
from typer.testing import CliRunner

from se_inject.cli.commands import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 350  # a user's guide; reference prose goes to docs/
SUBSTITUTIONS = (("torchvision:resnet50.IMAGENET1K_V2", "torchvision:resnet18.IMAGENET1K_V1"), ("resnet50", "resnet18"))
SKIPPED = {  # a line's start -> why it is not run here
    "pip install": "installs packages (no network here; the test runs in the installed environment)",
    "python -m pytest": "the test suite itself",
    "ruff check": "the linter, run by CI",
    "lint-imports": "the import contracts, run by CI",
    "python benchmarks/": "benchmarks: minutes of measurement",
    "python train.py": "timm's training script lives in timm's repository, and needs ImageNet",
}
NEEDS_CACHE = re.compile(r"pretrained=True|--pretrained")  # outside comments: the library's cached weights

runner = CliRunner()


def blocks(page: Path) -> list[tuple[int, str, str]]:
    """(line, language, text) of every fenced python, bash and toml block, in page order."""
    text = page.read_text(encoding="utf-8")
    found = []
    for m in re.finditer(r"^```(\w+)\n(.*?)^```", text, re.S | re.M):
        if m.group(1) in ("python", "bash", "toml"):
            body = m.group(2)
            for old, new in SUBSTITUTIONS:
                body = body.replace(old, new)
            found.append((text[: m.start()].count("\n") + 1, m.group(1), body))
    return found


def needs_cache(text: str) -> bool:
    return any(NEEDS_CACHE.search(line.split("#", 1)[0]) for line in text.splitlines())


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh folder with resnet18's weights in timm's (Hugging Face) and torchvision's (torch.hub) caches, and as a
    local file."""
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
    save_file(state, str(tmp_path / "resnet18.safetensors"))
    return tmp_path


def run_bash(text: str, where: str) -> list[str]:
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
            assert args[0] == "se-inject", f"{where}: {part!r} is neither run nor skipped with a reason"
            if any(a.startswith("torchvision:") for a in args):
                args.append("--dry-run")  # plans and locates the weights; the torchvision builds are tested elsewhere
            result = runner.invoke(app, args[1:], env={"COLUMNS": "300"})
            assert result.exit_code == 0, f"{where}: {part}\n{result.stderr}"
    return skipped


def run_python(text: str, where: str) -> None:
    exec(compile(text, where, "exec"), {"__name__": "readme"})


def run_page(page: Path, workdir: Path, *, pretrained: bool) -> list[str]:
    skipped = []
    for line, language, text in blocks(page):
        where = f"{page.relative_to(ROOT)}:{line}"
        if not pretrained and needs_cache(text):
            continue
        if language == "toml":  # the recipe examples: the first is the file the bash example names
            if not (workdir / "toy.toml").exists():
                (workdir / "toy.toml").write_text(text)
            continue
        if language == "python" and "def make():" in text:  # the worked example's own model, `mynets.py`
            (workdir / "mynets.py").write_text(text)
            continue
        if language == "bash":
            skipped += run_bash(text, where)
        else:
            run_python(text, where)
    if page == README:
        assert (workdir / "resnet18-se16" / "config.json").is_file()  # the quickstart's folder, which plain timm reads
    return skipped


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_snippets_without_pretrained_weights(page, workdir):
    run_page(page, workdir, pretrained=False)


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_snippets_top_to_bottom(page, workdir):
    skipped = run_page(page, workdir, pretrained=True)
    made = {"README.md": ["out", "out-mine", "resnet18-a1", "resnet18-mine"], "cli.md": ["a1", "from-file"],
            "fine-tuning.md": ["finetuned", "resnet18-a1-se16"]}
    assert all((workdir / d).is_dir() for d in made.get(page.name, []))
    if page.name == "fine-tuning.md":
        assert any("train.py" in s for s in skipped)


def test_every_page_has_runnable_snippets_or_none_claimed():
    """The pages the README sends a newcomer to with commands are the ones this test runs."""
    runnable = {p.name for p in PAGES if blocks(p)}
    assert {"README.md", "cli.md", "recipes.md", "tasks.md", "fine-tuning.md"} <= runnable


def test_links_between_pages_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if re.match(r"\w+://", target):
                continue
            path = (page.parent / target).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_readme_is_a_first_read():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= README_MAX_LINES
