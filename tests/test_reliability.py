"""Every bad input gets one line and an exit code; nothing is half-written; runs are reproducible."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from typer.testing import CliRunner

import se_inject
from se_inject.cli.commands import app

runner = CliRunner()
ENV = {"COLUMNS": "200"}


def run(*args: str):
    return runner.invoke(app, list(args), env=ENV)


def one_line_error(result, code: int, *texts: str) -> None:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for text in texts:
        assert text in lines[0], lines[0]


class Evil:
    """Unpickling this creates a file: the side effect a malicious checkpoint would have."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    state = timm.create_model("test_resnet").state_dict()
    torch.save(state, d / "good.pth")
    (d / "empty.pth").write_bytes(b"")
    data = (d / "good.pth").read_bytes()
    (d / "truncated.pth").write_bytes(data[: len(data) // 2])
    (d / "random.pth").write_bytes(os.urandom(4096))
    (d / "random.safetensors").write_bytes(os.urandom(4096))
    save_file(torchvision.models.resnet18().state_dict(), str(d / "other.safetensors"))
    return d


@pytest.mark.parametrize(("file", "text"), [
    ("missing.pth", "no such file"),
    ("empty.pth", "empty file"),
    ("truncated.pth", "truncated or corrupt"),
    ("random.pth", "not a readable PyTorch checkpoint"),
    ("random.safetensors", "not a valid safetensors file"),
    ("other.safetensors", "missing keys"),
])
def test_bad_weights_files(weight_files, tmp_path, file, text):
    result = run("timm:test_resnet", "--weights", str(weight_files / file), "-o", str(tmp_path / "o"))
    one_line_error(result, 1, str(weight_files / file), text)
    assert not (tmp_path / "o").exists()


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": Evil(marker)}, tmp_path / "evil.pth")
    result = run("timm:test_resnet", "--weights", str(tmp_path / "evil.pth"), "--dry-run")
    one_line_error(result, 1, "refused", "io.open")
    assert not marker.exists()


def test_good_weights_load(weight_files):
    assert run("timm:test_resnet", "--weights", str(weight_files / "good.pth"), "--dry-run").exit_code == 0


def test_no_eligible_blocks_writes_nothing(tmp_path, monkeypatch):
    from helpers import parallel_vit_factory

    (tmp_path / "src").mkdir()
    (tmp_path / "run").mkdir()
    factory = parallel_vit_factory(tmp_path / "src")
    monkeypatch.chdir(tmp_path / "run")
    one_line_error(run(factory, "--input-size", "32"), 1, "no matching blocks", "with no convolutional block",
                   "Attention")
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.parametrize(("args", "text"), [
    (["--attention", "gc"], "se, eca, cbam, cbam-timm, ese"),
    (["--gate", "tanh"], "sigmoid, hard-sigmoid"),
    (["--recipe", "no-such-recipe"], "unknown recipe 'no-such-recipe'; choose from"),
    (["--reduction", "x"], "reduction"),
    (["--input-size", "224x0"], "input size"),
    (["--min-channels", "-1"], "min-channels"),
])
def test_bad_options_exit_2(args, text):
    one_line_error(run("timm:test_resnet", "--dry-run", *args), 2, text)


def test_reduction_larger_than_channels_clamps_and_says_so():
    result = run("timm:test_resnet", "--dry-run", "--json", "-r", "512")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert {s["squeeze_channels"] for s in data["sites"]} == {8}  # clamped to the divisor
    assert any("exceeds the channels" in n and "clamped to 8" in n for n in data["notes"])


def test_unwritable_output(tmp_path):
    one_line_error(run("timm:test_resnet", "-o", "/proc/se-inject-test/out"), 1, "cannot write")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(run("timm:test_resnet", "-o", str(blocker)), 1, "not a directory")
    one_line_error(run("timm:test_resnet", "-o", str(blocker / "sub")), 1, "cannot write")


def test_cli_runs_are_byte_identical_with_a_seed(tmp_path):
    out = tmp_path / "o"
    digests = []
    for _ in range(2):
        assert run("timm:test_resnet", "-o", str(out), "--seed", "3", "--force").exit_code == 0
        digests.append({f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in ("model.safetensors",
                                                                                       "report.json")})
    assert digests[0] == digests[1]
    assert json.loads((out / "report.json").read_text())["seed"] == 3


def test_seed_recorded_without_seed(tmp_path):
    result = run("timm:test_resnet", "-o", str(tmp_path / "o"), "--json")
    seed = json.loads(result.stdout)["seed"]
    assert se_inject.read_plan(tmp_path / "o").seed == seed
    again = run("timm:test_resnet", "-o", str(tmp_path / "p"), "--seed", str(seed))
    assert again.exit_code == 0
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == (tmp_path / "p" / "model.safetensors").read_bytes()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _kill_while_writing(args: list[str], watch: Path, pattern: str) -> None:
    """Start se-inject, SIGKILL it as soon as a temporary matching `pattern` appears in `watch`."""
    process = subprocess.Popen([sys.executable, "-m", "se_inject.cli.commands", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if any(watch.glob(pattern)):
                break
            time.sleep(0.001)
        else:
            pytest.fail("the save finished before it could be interrupted")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


@pytest.mark.slow  # real kills at random moments; tests/test_security.py kills deterministically at every step
def test_sigkill_during_save_keeps_the_previous_output(tmp_path):
    out = tmp_path / "o"
    base = ["timm:wide_resnet50_2", "-o", str(out)]
    assert subprocess.run([sys.executable, "-m", "se_inject.cli.commands", *base, "--seed", "0"],
                          capture_output=True).returncode == 0
    previous = {f: _digest(out / f) for f in ("model.safetensors", "report.json")}
    _kill_while_writing([*base, "--seed", "1", "--force"], tmp_path, ".se-inject-*/model.safetensors")
    assert {f: _digest(out / f) for f in previous} == previous  # the complete previous output
    se_inject.load(out)
    # the killed run's temporary is cleared by the next run, which completes
    assert subprocess.run([sys.executable, "-m", "se_inject.cli.commands", *base, "--seed", "1", "--force"],
                          capture_output=True).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == [".se-inject.json", "model.safetensors", "report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert _digest(out / "model.safetensors") != previous["model.safetensors"]


@pytest.mark.slow  # real kills at random moments; tests/test_security.py kills deterministically at every step
def test_sigkill_during_first_save_leaves_no_output(tmp_path):
    out = tmp_path / "o"
    _kill_while_writing(["timm:wide_resnet50_2", "-o", str(out), "--seed", "0"], tmp_path, ".se-inject-*")
    assert not out.exists()  # nothing that looks like a checkpoint
    assert subprocess.run([sys.executable, "-m", "se_inject.cli.commands", "timm:test_resnet", "-o", str(out)],
                          capture_output=True).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # the staging folder is gone too


def test_exceptions_are_quoted_by_their_first_line():
    """One way to quote an exception in a one-line message: its first line, without torch's build paths, cut at a
    word; with `kind`, its type in front (alone when the message is empty)."""
    from se_inject.errors import describe

    e = RuntimeError("shapes differ (Triggered internally at /pytorch/aten/src/ATen/native/X.cpp:12)\nsecond line")
    assert describe(e) == "shapes differ"
    assert describe(e, kind=True) == "RuntimeError: shapes differ"
    assert describe(KeyError(), kind=True) == "KeyError" and describe(ValueError("")) == ""
    long = ValueError("word " * 100)
    assert len(describe(long, 50)) <= 50 and describe(long, 50).endswith("word…")
