"""Fine-tune-ready output: identity initialisation, gradient flow, drift, exports and the rest of the toolchain."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torchvision
from helpers import randomize_norm_stats
from safetensors.torch import save_file
from torch import nn

import se_inject
from se_inject.io.export import export
from se_inject.layers.squeeze_excite import SqueezeExcite

CASES = [  # one small model per recipe and library; the bigger ones behind `slow`
    ("timm", "test_resnet", 64),
    ("torchvision", "resnet18", 64),
    pytest.param("torchvision", "googlenet", 96, marks=pytest.mark.slow),
    pytest.param("timm", "inception_v3", 96, marks=pytest.mark.slow),
    pytest.param("torchvision", "mobilenet_v2", 64, marks=pytest.mark.slow),
    ("timm", "test_efficientnet", 64),
    pytest.param("torchvision", "mnasnet0_5", 64, marks=pytest.mark.slow),
]


def _model(source: str, name: str) -> nn.Module:
    model = timm.create_model(name) if source == "timm" else torchvision.models.get_model(name)
    return randomize_norm_stats(model).eval()


@pytest.mark.parametrize(("source", "name", "size"), CASES)
def test_identity_init_preserves_the_function(source, name, size):
    model = _model(source, name)
    # test_efficientnet: partial
    injected, _report = se_inject.inject(model, se_inject.Settings(init="identity", fill=True), seed=0)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected, got = model(x), injected.eval()(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    paper, _ = se_inject.inject(model, se_inject.Settings(init="paper", fill=True), seed=0)
    with torch.no_grad():
        assert not torch.allclose(paper.eval()(x), expected, rtol=1e-3)  # the check is not trivial


def test_identity_init_learns():
    """fc2 gets gradients at step 0 (norms reported here); fc1 from the first update on (its path runs through fc2)."""
    model = _model("torchvision", "resnet18").train()
    injected, _ = se_inject.inject(model, se_inject.Settings(init="identity"), seed=0)
    se_modules = [m for m in injected.modules() if isinstance(m, SqueezeExcite)]
    optimizer = torch.optim.SGD([p for m in se_modules for p in m.parameters()], lr=0.1)
    x, target = torch.randn(4, 3, 64, 64), torch.randint(0, 1000, (4,))
    nn.functional.cross_entropy(injected(x), target).backward()
    fc2_norms = [m.fc2.weight.grad.norm().item() for m in se_modules]
    print("identity init fc2 grad norms:", [f"{n:.2e}" for n in fc2_norms])
    assert all(n > 0 for n in fc2_norms)
    assert all(m.fc2.bias.grad.norm() > 0 for m in se_modules)
    gates = [torch.sigmoid(m.fc2(torch.zeros(1, m.fc2.in_channels, 1, 1))) for m in se_modules]
    assert all(torch.allclose(g, torch.full_like(g, 0.5)) for g in gates)  # not a saturated sigmoid
    optimizer.step()
    optimizer.zero_grad()
    nn.functional.cross_entropy(injected(x), target).backward()
    assert all(m.fc1.weight.grad.norm() > 0 for m in se_modules)


@pytest.mark.slow
def test_drift_moves_the_right_way(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_model("timm", "resnet18").state_dict(), str(path))
    _, paper = se_inject.inject("timm:resnet18", weights=path, seed=0)
    _, identity = se_inject.inject("timm:resnet18", se_inject.Settings(init="identity"), weights=path, seed=0)
    assert paper.drift.relative_l2 > 0.05
    assert identity.drift.relative_l2 == 0.0 and identity.drift.top1_agreement == 1.0
    assert paper.to_dict()["drift"]["inputs"].startswith("8 random")


def test_drift_on_images(tmp_path):
    from torchvision.io import write_png

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        write_png(torch.randint(0, 255, (3, 40 + i, 50), dtype=torch.uint8), str(images / f"{i}.png"))
    _, report = se_inject.inject(_model("timm", "test_resnet"), drift=images, seed=0)
    assert report.drift.inputs == f"3 images from {images}"
    assert report.drift.relative_l2 > 0


@pytest.fixture(scope="module")
def small():
    model, report = se_inject.inject(_model("torchvision", "resnet18"), seed=0)
    return model.eval(), report


@pytest.mark.slow
def test_torchscript_loads_without_se_inject(small, tmp_path):
    model, report = small
    export(model, report.plan, "torchscript", tmp_path / "m.pt")
    x = torch.randn(1, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "y.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        m = torch.jit.load({str(tmp_path / 'm.pt')!r})
        x, y = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'y.pt')!r})
        assert torch.allclose(m(x), y, atol=1e-5)
        assert not any(k.startswith("se_inject") for k in sys.modules)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=120)


@pytest.mark.slow
def test_plain_timm_loads_the_folder(tmp_path):
    model, report = se_inject.inject("timm:resnet18", seed=0)  # by name, as the CLI does
    randomize_norm_stats(model)  # timm's zero-init-last would make the comparison trivial
    final = se_inject.save(model, report, tmp_path / "out")
    assert final.timm_architecture == "seresnet18"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architecture"] == "seresnet18"
    x = torch.randn(1, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model.eval()(x), tmp_path / "y.pt")
    code = textwrap.dedent(f"""
        import sys, timm, torch
        m = timm.create_model("local-dir:{tmp_path / 'out'}", pretrained=True).eval()
        x, y = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'y.pt')!r})
        with torch.no_grad():
            torch.testing.assert_close(m(x), y)  # to float rounding: se-inject fuses the residual addition
        assert "se_inject" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=120)


def test_no_timm_config_when_not_a_timm_architecture(tmp_path):
    model, report = se_inject.inject("timm:test_resnet", se_inject.Settings(init="identity"), seed=0)
    final = se_inject.save(model, report, tmp_path / "out")
    assert final.timm_architecture is None
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.slow
def test_torch_compile_fullgraph_captures(small):
    model, _ = small
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


@pytest.mark.slow
def test_torch_compile_inductor(small):
    model, _ = small
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(torch.compile(model, fullgraph=True)(x), model(x), atol=1e-4)


@pytest.mark.slow
def test_channels_last_and_trace(small):
    model, _ = small
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        cl = model.to(memory_format=torch.channels_last)
        assert torch.allclose(cl(x.to(memory_format=torch.channels_last)), expected, atol=1e-5)
        model.to(memory_format=torch.contiguous_format)
        traced = torch.jit.trace(model, x)
        assert torch.allclose(traced(x), expected, atol=1e-5)


@pytest.mark.slow
def test_cli_export_command(tmp_path):
    from typer.testing import CliRunner

    from se_inject.cli.commands import app

    runner = CliRunner()
    out = tmp_path / "o"
    assert runner.invoke(app, ["timm:test_resnet", "-o", str(out), "--seed", "0"]).exit_code == 0
    result = runner.invoke(app, ["export", str(out), "--format", "exported", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["path"] == str(out / "model.pt2") and data["max_abs_diff"] < 1e-5
    again = runner.invoke(app, ["export", str(out), "--format", "exported"])
    assert again.exit_code == 1 and "--force" in again.stderr
    bad = runner.invoke(app, ["export", str(out), "--format", "tflite"])
    assert bad.exit_code == 2
