"""The inject command's checks before any work: options that contradict each other or cannot work are refused, and
the files it names are looked at (a regular --weights file, an --images folder, a writable --output), all before torch
is imported."""

from __future__ import annotations

import os
from pathlib import Path

from ..engine.files import open_regular
from ..errors import SEInjectError, UsageError, WeightsError
from ..io.preflight import check_export_options, check_output_folder


def inject_preflight(*, dry_run: bool, output: Path | None, force: bool, formats: tuple[str, ...],
                     weights: Path | None, images: Path | None, pretrained: bool, static_batch: int | None,
                     opset: int | None) -> list[str]:
    """Everything about an inject command that can be checked before torch is imported: raises for options that
    contradict each other or cannot work, returns notes for options that will not be used."""
    check_export_options(formats, batch=static_batch, opset=opset)
    notes = []
    if dry_run:
        if formats:
            raise UsageError("--export writes files and --dry-run writes nothing: drop one of them")
        if images is not None:
            raise UsageError("--dry-run computes no outputs, so --images has nothing to measure: drop one of them")
        if output is not None or force:
            notes.append("dry run: --output/--force unused, nothing is written")
        if weights is not None:
            notes.append("dry run: the weights file was checked against the model; drift is not measured")
        if pretrained:
            notes.append("dry run: the pretrained weights were located, not loaded; drift is not measured")
    elif output is not None:
        check_output_folder(output, force=force)
    if weights is not None:
        os.close(open_regular(weights, lambda why: WeightsError(f"{weights}: {why}")))  # read (and capped) later
    if images is not None:
        if not images.is_dir():
            raise SEInjectError(f"--images {images}: not a folder")
        if weights is None and not pretrained:
            notes.append("--images without --weights or --pretrained: the drift is measured against the base "
                         "model's random weights")
    return notes
