"""``quantize --calib``: the inputs each ``ButterflyLinear`` of a factorized artifact sees.

The factorized model (not the reference) is run on the calibration data, because its
quantized layers will see the inputs of the factorized layers before them. The rows
come from ``capture.capture_rows``: the fitting rows themselves, and the second moment
of the held-out batches (``data.held_out``).
"""

from __future__ import annotations

from pathlib import Path

from lyoncompress.artifact import load_artifact
from lyoncompress.capture import CapturedRows, capture_rows
from lyoncompress.data import VAL_EVERY, calibration_batches
from lyoncompress.errors import InputError
from lyoncompress.layers import ButterflyLinear
from lyoncompress.models import load_compressed


def calibrate(
    artifact: Path, names: list[str], calib: str, samples: int, tokenizer: Path | None
) -> dict[str, CapturedRows]:
    """Inputs of the layers ``names`` of the factorized ``artifact`` on ``calib`` (a data
    file as ``eval --data`` takes, or ``builtin``); text is tokenized with the tokenizer
    in ``tokenizer`` (default: the artifact folder). Up to ``samples`` fitting rows per
    layer, and the moment of up to ``samples`` held-out rows."""
    config = load_artifact(artifact).config
    model = load_compressed(artifact)
    modules = dict(model.named_modules())
    for name in names:
        if not isinstance(modules.get(name), ButterflyLinear):
            raise InputError(
                f"{name!r} is not a ButterflyLinear of the factorized model; is the artifact intact?"
            )
    batches = calibration_batches(tokenizer or artifact, config, calib, samples)
    try:
        captured = capture_rows(model, names, batches, samples)
    except (OSError, ValueError, RuntimeError) as err:
        # the tokenizer loads lazily with the first batch (OSError), and data of the wrong
        # width fails in the model's first matmul (RuntimeError): both are bad --calib input
        raise InputError(
            f"--calib {calib}: the factorized model could not run on it ({err}); check the data's "
            "feature count, or pass --reference with the folder that holds the tokenizer for text"
        ) from err
    for name, rows in captured.items():
        if rows.train.shape[0] == 0 or rows.rows_val == 0:
            missing = "held-out" if rows.train.shape[0] else "fitting"
            raise InputError(
                f"layer {name}: the calibration data gave it no {missing} rows; "
                f"--calib needs at least {VAL_EVERY} batches"
            )
    return captured
