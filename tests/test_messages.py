"""Messages a new user reads say what to do next: the help names every kind of MODEL, an offline `--pretrained`
names the two ways out, a model nothing matches names the recipe file, an export line names the format in words,
and a broken checkpoint is described in words, not by an unpickler's opcode."""

from __future__ import annotations

import pytest
from huggingface_hub import constants as hf_constants
from typer.testing import CliRunner

import se_inject
from se_inject.cli.commands import app
from se_inject.cli.render import export_line
from se_inject.engine.weights import read_state_dict
from se_inject.errors import NoSitesError, WeightsError

runner = CliRunner()


@pytest.mark.parametrize("args", [["--help"], ["inject", "--help"]])
def test_help_names_your_own_code(args):
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "FILE.py:factory" in result.output


def test_offline_pretrained_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsError) as error:
        se_inject.inject("test_resnet", pretrained=True, device="meta")
    message = str(error.value)
    assert "put the file in that cache" in message and "--weights FILE" in message and "weights=" in message


def test_transformer_without_match_names_the_recipe_file():
    from helpers import parallel_vit

    with pytest.raises(NoSitesError) as error:
        se_inject.inject(parallel_vit(), device="meta", input_size=32)
    assert "--recipe-file" in str(error.value) and "docs/recipes.md" in str(error.value)


@pytest.mark.parametrize(("fmt", "word"), [("exported", "torch.export"), ("torchscript", "TorchScript"),
                                           ("onnx", "ONNX")])
def test_export_line_names_the_format_once(fmt, word):
    line = export_line({"format": fmt, "path": "out/model", "batch": "dynamic", "opset": None, "max_abs_diff": None,
                        "note": ""})
    assert line.startswith(f"exported {word} to out/model (")


@pytest.mark.parametrize("content", [b"int main(){}\n", b"hello world", b"\x80\x02i"])
def test_checkpoint_that_is_no_pickle_is_described_in_words(tmp_path, content):
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as error:
        read_state_dict(path)
    message = str(error.value)
    assert "neither the zip archive nor the pickle torch.save writes" in message
    assert "operand" not in message and not message.rstrip(")").rsplit("(", 1)[-1].isdigit()
