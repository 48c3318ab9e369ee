"""Overwriting an output folder is all or nothing: a writer that fails midway leaves the previous output whole."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import se_inject


class Unserialisable:
    pass


def test_a_failing_writer_leaves_the_previous_output_whole(tmp_path):
    model, report = se_inject.inject("timm:test_resnet", seed=1)
    directory = tmp_path / "out"
    se_inject.save(model, report, directory)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    other, other_report = se_inject.inject("timm:test_resnet", seed=2)
    # The weights are written first, then the report's writer fails: nothing of the new output may land.
    with pytest.raises(TypeError):
        se_inject.save(other, replace(other_report, notes=(Unserialisable(),)), directory, force=True)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # same files, same bytes, no temporaries
    loaded = se_inject.load(directory)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
