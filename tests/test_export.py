"""Exports with a real batch axis: each file is loaded back here (torch.jit.load, torch.export.load, onnxruntime)
and compared with the eager model at several batch sizes; the reported error is not trusted."""

from __future__ import annotations

import importlib.util
import json
from collections import namedtuple

import pytest
import torch
import torchvision
from typer.testing import CliRunner

import se_inject
from se_inject.cli.commands import app
from se_inject.errors import ExportError, UsageError
from se_inject.io import export as export_module
from se_inject.io.export import RELATIVE_TOLERANCE, compare_outputs, export, output_tensors

EXTENSIONS = {"torchscript": "pt", "exported": "pt2", "onnx": "onnx"}
FORMATS = list(EXTENSIONS)


def load_export(path, fmt):
    """The file as a callable on one tensor, loaded with the format's own runtime."""
    if fmt == "torchscript":
        return torch.jit.load(str(path))
    if fmt == "exported":
        return torch.export.load(str(path)).module()
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def assert_matches_eager(model, loaded, batch, size=64):
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    got = output_tensors(got)[0]
    assert got.shape == expected.shape == (batch, 1000)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=RELATIVE_TOLERANCE * scale)


class _Exports(dict):
    """Each format exported once, when first asked for, with the defaults (ONNX at opset 18): ``{format: (path,
    result)}``; the folder holds nothing else (no temporaries)."""

    def __init__(self, model, plan, folder):
        super().__init__()
        self.model, self.plan, self.folder = model, plan, folder

    def __missing__(self, fmt):
        if fmt == "onnx":
            pytest.importorskip("onnx")
        path = self.folder / f"m.{EXTENSIONS[fmt]}"
        self[fmt] = path, export(self.model, self.plan, fmt, path, opset=18 if fmt == "onnx" else None)
        assert sorted(p.name for p in self.folder.iterdir()) == sorted(p.name for p, _ in self.values())
        return self[fmt]


@pytest.fixture(scope="module")
def dynamic_exports(injected_test_resnet, tmp_path_factory):
    model, report = injected_test_resnet
    return _Exports(model, report.plan, tmp_path_factory.mktemp("exports"))


# TorchScript in the fast suite; torch.export and ONNX (each a minute-long export on a CPU) behind `slow`.
@pytest.mark.parametrize("fmt", [f if f == "torchscript" else pytest.param(f, marks=pytest.mark.slow) for f in FORMATS])
def test_export_runs_at_batch_1_and_3(injected_test_resnet, dynamic_exports, fmt):
    model, _ = injected_test_resnet
    path, result = dynamic_exports[fmt]
    assert result.batch == "dynamic" and result.checked_batches == (1, 3)
    loaded = load_export(path, fmt)
    for batch in (1, 3):
        assert_matches_eager(model, loaded, batch)
    if result.max_abs_diff is not None:
        assert result.relative_diff <= RELATIVE_TOLERANCE


@pytest.mark.slow
def test_onnx_batch_axis_is_symbolic_and_opset_as_asked(dynamic_exports):
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(dynamic_exports["onnx"][0]))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # a named, symbolic batch axis
    assert [d.dim_value for d in dims[1:]] == [3, 64, 64]
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}
    assert dynamic_exports["onnx"][1].opset == 18


@pytest.mark.slow
def test_static_batch(injected_test_resnet, tmp_path):
    model, report = injected_test_resnet
    result = export(model, report.plan, "exported", tmp_path / "m.pt2", batch=2)
    assert result.batch == 2 and result.checked_batches == (2,)
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    assert_matches_eager(model, loaded, 2)
    with pytest.raises(Exception):  # noqa: B017, PT011 (the guard's error type is torch's business)
        loaded(torch.randn(3, 3, 64, 64))
    if importlib.util.find_spec("onnx") is not None:
        import onnx

        export(model, report.plan, "onnx", tmp_path / "m.onnx", batch=2)
        dims = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_value for d in dims] == [2, 3, 64, 64]
    scripted = export(model, report.plan, "torchscript", tmp_path / "m.pt", batch=2)
    assert scripted.batch == "dynamic" and "does not apply" in scripted.note  # said, not ignored


@pytest.mark.slow
def test_torchscript_of_named_tuple_outputs(tmp_path):
    """Scripted torchvision GoogLeNet returns GoogLeNetOutputs(logits, aux1=None, aux2=None), eager a tensor."""
    base = torchvision.models.googlenet(init_weights=False, aux_logits=True).eval()
    model, report = se_inject.inject(base, se_inject.Settings(include=["inception3a"]), seed=0, input_size=64,
                                     inplace=True)
    result = export(model.eval(), report.plan, "torchscript", tmp_path / "g.pt")
    loaded = torch.jit.load(str(tmp_path / "g.pt"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = loaded(x)
        assert isinstance(out, tuple) and out[1] is None
        torch.testing.assert_close(out[0], model(x), rtol=0, atol=1e-4 * model(x).abs().max().item())
    assert result.relative_diff <= RELATIVE_TOLERANCE


def test_compare_outputs_is_relative_and_flattens_tuples():
    Outputs = namedtuple("Outputs", ["logits", "aux"])
    expected = torch.full((2, 3), 5e9, dtype=torch.float64)
    got = expected + torch.tensor([[1.2e4, 0, 0], [0, 0, 0]], dtype=torch.float64)
    max_abs, relative = compare_outputs(Outputs(got, None), expected)
    assert max_abs == pytest.approx(1.2e4, rel=1e-3)
    assert relative == pytest.approx(1.2e4 / 5e9, rel=1e-3)
    assert compare_outputs([torch.zeros(1)], torch.zeros(1)) == (0.0, 0.0)
    with pytest.raises(ExportError, match="2 tensors"):
        compare_outputs((got, got), expected)
    with pytest.raises(ExportError, match="shape"):
        compare_outputs(got[:1], expected)


def test_an_export_that_disagrees_is_refused_and_not_written(injected_test_resnet, tmp_path, monkeypatch):
    model, report = injected_test_resnet
    label, save, load_back = export_module._WRITERS["torchscript"]

    def load_wrong(path):
        loaded = load_back(path)
        return lambda x: loaded(x) * 1.01  # 1% off: far above the tolerance, far below "obviously broken"

    monkeypatch.setitem(export_module._WRITERS, "torchscript", (label, save, load_wrong))
    with pytest.raises(ExportError, match="relative error"):
        export(model, report.plan, "torchscript", tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", [0, -1])
def test_an_export_that_returns_nan_is_refused_and_not_written(injected_test_resnet, tmp_path, monkeypatch, where):
    model, report = injected_test_resnet
    label, save, load_back = export_module._WRITERS["torchscript"]

    def load_nan(path):
        loaded = load_back(path)

        def run(x):
            out = loaded(x).clone()
            out.view(-1)[where] = float("nan")
            return out

        return run

    monkeypatch.setitem(export_module._WRITERS, "torchscript", (label, save, load_nan))
    with pytest.raises(ExportError, match="relative error nan"):
        export(model, report.plan, "torchscript", tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_compare_outputs_keeps_nan():
    expected = (torch.ones(3), torch.ones(2))
    for got in ((torch.tensor([1.0, float("nan"), 1.0]), torch.ones(2)),
                (torch.ones(3), torch.tensor([float("nan"), 1.0]))):
        max_abs, relative = compare_outputs(got, expected)
        assert max_abs != max_abs and relative != relative  # NaN, whichever tensor holds it


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"fmt": "tflite"}, "unknown export format"),
        ({"fmt": "onnx", "opset": 9}, "opset"),
        ({"fmt": "exported", "opset": 18}, "ONNX exports only"),
        ({"fmt": "exported", "batch": 0}, "static batch"),
    ],
)
def test_invalid_export_options(injected_test_resnet, tmp_path, kwargs, text):
    model, report = injected_test_resnet
    fmt = kwargs.pop("fmt")
    with pytest.raises(UsageError, match=text):
        export(model, report.plan, fmt, tmp_path / "m", **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_export_options(tmp_path):
    runner = CliRunner()
    out = tmp_path / "o"
    assert runner.invoke(app, ["timm:test_resnet", "-o", str(out), "--seed", "0", "--input-size", "64"]).exit_code == 0
    result = runner.invoke(app, ["export", str(out), "--format", "torchscript", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["batch"] == "dynamic" and data["checked_batches"] == [1, 3]
    assert data["relative_diff"] <= RELATIVE_TOLERANCE and data["opset"] is None
    loaded = torch.jit.load(data["path"])
    model = se_inject.load(out)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    text = runner.invoke(app, ["export", str(out), "-f", "torchscript", "--force"], env={"COLUMNS": "60"})
    assert text.exit_code == 0, text.stderr
    assert "batch dynamic" in text.stdout and "relative error" in text.stdout and "max |diff|" in text.stdout
    assert len(text.stdout.strip().splitlines()) == 1  # piped: one line, never wrapped


def test_cli_export_refuses_an_existing_file_before_loading(tmp_path, monkeypatch):
    (tmp_path / "model.pt").write_bytes(b"previous")
    monkeypatch.setattr("se_inject.io.checkpoint.load", lambda *a, **k: pytest.fail("loaded the model"))
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(tmp_path), "-f", "torchscript"])
    assert result.exit_code == 1 and "already exists" in result.stderr
    assert (tmp_path / "model.pt").read_bytes() == b"previous"
    bad = runner.invoke(app, ["export", str(tmp_path), "-f", "onnx", "--opset", "9"])
    assert bad.exit_code == 2 and "opset" in bad.stderr
