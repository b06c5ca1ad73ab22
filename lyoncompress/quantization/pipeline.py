"""The ``quantize`` verb: factorized artifact -> quantized artifact.

Each compressed layer's chain (and low-rank term) goes through ``quantize_chain``;
the payload tensors are stored as ``P.factors.{ℓ}.{field}`` (``qdata``, ``scale``,
``values`` …, see ``formats``) and the layer entry gets a ``quantization`` record.
Round-to-nearest is run on the same factors in the same pass, so the report shows
the error the rescaling saved.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from lyoncompress.artifact import Artifact, companion_files, load_artifact, write_artifact
from lyoncompress.butterfly import Chain
from lyoncompress.checkpoint import Checkpoint, open_checkpoint
from lyoncompress.errors import InputError
from lyoncompress.plan import make_plan
from lyoncompress.quantization.calibration import QuantCalibration, calibrate, output_error
from lyoncompress.quantization.chain import QuantizedChain, quantize_chain
from lyoncompress.quantization.formats import get_format
from lyoncompress.quantization.payloads import layer_chains
from lyoncompress.quantization.rescale import resolve
from lyoncompress.recipe import QuantizeConfig, Recipe, parse_size

Progress = Callable[[str, int, int], None]
# Integer grids waste most of their range unless the factors' ranges are equalised first;
# then neither the per-index search nor error feedback wins on every chain (benchmarks/RESULTS.md),
# so ``auto`` runs both and keeps the better on the layer's own objective. With calibration
# data the objective is the layer's held-out output error, and equalising (which only looks
# at weight ranges) made it worse on MiniLM: int4 end to end 1.10x the float error with
# ``auto`` against 1.34x with ``equalize+auto`` and 1.20x for plain rounding.
INTEGER_FORMATS = ("int8", "int4")


def default_rescale(fmt: str, calibrated: bool = False) -> str:
    if fmt not in INTEGER_FORMATS:
        return "left-to-right"
    return "auto" if calibrated else "equalize+auto"


def _sources(path: Path, dense: bool) -> tuple[Checkpoint, dict[str, dict[str, Any]], dict[str, Any]]:
    """The tensors to read, the layer table to quantize, and the config to carry.

    With ``dense``, a plain weight becomes the one-factor chain ``(1, m, n, 1)``: its
    twiddle is the matrix itself, so it is stored and loaded like any other chain.
    """
    checkpoint = open_checkpoint(path)
    try:
        artifact: Artifact | None = load_artifact(path)
    except InputError:
        artifact = None
    if artifact is not None:
        already = [name for name, entry in artifact.layers.items() if entry.get("quantization")]
        if already:
            raise InputError(
                f"{path} is already quantized ({already[0]} …); quantize the factorized artifact"
            )
        config = {k: v for k, v in artifact.config.items() if k != "quantization_config"}
        return checkpoint, {name: dict(entry) for name, entry in artifact.layers.items()}, config
    if not dense:
        raise InputError(
            f"{path} is not a factorized artifact; run `lyoncompress factorize` first, "
            "or pass --dense to quantize its dense weights as they are"
        )
    layers = {}
    for layer in make_plan(checkpoint, Recipe()).layers:
        m, n = layer.shape
        layers[layer.name] = {
            "structure": "dense",
            "in_features": n,
            "out_features": m,
            "chain": [[1, m, n, 1]],
            "lowrank_rank": 0,
            "bias": layer.has_bias,
            "dtype": str(checkpoint.infos[layer.weight_name].dtype).removeprefix("torch."),
            "quantization": None,
        }
    return checkpoint, layers, dict(checkpoint.config or {})


def _twiddles(checkpoint: Checkpoint, name: str, entry: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
    """The layer's float twiddles by group: ``factors`` (and ``lowrank``)."""
    if entry["structure"] == "dense":
        m, n = entry["out_features"], entry["in_features"]
        return {"factors": [checkpoint.load(f"{name}.weight").reshape(1, 1, m, n)]}
    groups = {"factors": [checkpoint.load(f"{name}.factors.{i}.twiddle") for i in range(len(entry["chain"]))]}
    if entry["lowrank_rank"]:
        groups["lowrank"] = [checkpoint.load(f"{name}.lowrank.{i}.twiddle") for i in range(2)]
    return groups


def _dense(chains: dict[str, Chain], twiddles: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    return sum(chains[group].to_dense([t.double() for t in ts]) for group, ts in twiddles.items())


def quantize(
    artifact: str | Path,
    out: str | Path,
    config: QuantizeConfig | None = None,
    reference: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Quantize every compressed layer of ``artifact`` into a new artifact at ``out``.

    Args:
        artifact: folder written by ``factorize`` (or any checkpoint with ``config.dense``).
        out: new artifact folder.
        config: format, rescaling, groups and calibration (default ``QuantizeConfig()``:
            int8, ``equalize+auto``). With ``config.calib`` the factorized model runs on
            the data; each layer's rescaling then minimises the output error on its
            captured inputs instead of the weight error, and the report adds the
            held-out output error next to round-to-nearest's.
        reference: folder with the tokenizer for text calibration data (default: the artifact).
        force: replace an existing ``out``.
        progress: called after each quantized layer with (name, done, total).

    Returns:
        The report, with each layer's error next to round-to-nearest's.

    Example:
        >>> report = quantize("fact/", "q/", QuantizeConfig(format="int8"))
        >>> report["layers"][0]["bits_per_weight"]
        8.25
    """
    config = config or QuantizeConfig()
    fmt, group_size, calib = config.format, config.group_size, config.calib
    get_format(fmt)
    rescale = config.rescale or default_rescale(fmt, calibrated=calib is not None)
    resolve(rescale)
    dense = config.dense
    source, layers, model_config = _sources(Path(artifact), dense)
    calibration = None
    if calib is not None:
        calibration = calibrate(
            Path(artifact), list(layers), calib, config.calib_samples, Path(reference) if reference else None
        )
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {}

    def finish_report() -> dict[str, Any]:
        report.update(
            command="quantize",
            source=str(artifact),
            format=fmt,
            rescale=rescale,
            group_size=group_size,
            calib=calib,
            layers=rows,
            seconds=round(time.perf_counter() - started, 3),
        )
        return report

    stream = _stream(source, layers, fmt, rescale, group_size, rows, progress, calibration)
    write_artifact(
        Path(out),
        stream,
        layers,
        model_config,
        finish_report,
        parse_size(config.max_shard_size),
        force,
        companion_files(Path(artifact)),
    )
    return report


def _stream(
    source: Checkpoint,
    layers: dict[str, dict[str, Any]],
    fmt: str,
    rescale: str,
    group_size: int | None,
    rows: list[dict[str, Any]],
    progress: Progress | None,
    calibration: dict[str, QuantCalibration] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    # the tensor that starts each layer's group; the rest of the group is skipped
    first = {
        (f"{n}.weight" if e["structure"] == "dense" else f"{n}.factors.0.twiddle"): n
        for n, e in layers.items()
    }
    replaced = tuple(f"{n}.{group}." for n in layers for group in ("factors", "lowrank")) + tuple(
        f"{n}.weight" for n, e in layers.items() if e["structure"] == "dense"
    )
    for tensor_name in source.names():
        if tensor_name in first:
            layer = first[tensor_name]
            inputs = None if calibration is None else calibration[layer]
            yield from _quantize_layer(source, layer, layers[layer], fmt, rescale, group_size, rows, inputs)
            if progress is not None:
                progress(layer, len(rows), len(layers))
        elif not tensor_name.startswith(replaced):
            yield tensor_name, source.load(tensor_name)


def _quantize_layer(
    source: Checkpoint,
    name: str,
    entry: dict[str, Any],
    fmt: str,
    rescale: str,
    group_size: int | None,
    rows: list[dict[str, Any]],
    calibration: QuantCalibration | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    begin = time.perf_counter()
    chains, twiddles = layer_chains(entry), _twiddles(source, name, entry)
    reference = _dense(chains, twiddles)
    quantized: dict[str, QuantizedChain] = {}
    baseline: dict[str, list[torch.Tensor]] = {}
    for group, chain in chains.items():
        calib = None if calibration is None else calibration.train
        held_out = None if calibration is None else calibration.gram_val
        quantized[group] = quantize_chain(chain, twiddles[group], fmt, rescale, group_size, calib, held_out)
        baseline[group] = quantize_chain(chain, twiddles[group], fmt, "none", group_size).dequantized(
            torch.float64
        )
    approx = _dense(chains, {g: q.dequantized(torch.float64) for g, q in quantized.items()})
    rtn = _dense(chains, baseline)
    norm = reference.norm().clamp_min(1e-30)
    params = sum(chain.params for chain in chains.values())
    bits = sum(q.bits_per_weight * q.chain.params for q in quantized.values()) / params
    entry["quantization"] = {
        "format": fmt,
        "rescale": rescale,
        "group_size": group_size,
        "bits_per_weight": round(bits, 4),
    }
    row = {
        "name": name,
        "format": fmt,
        "rescale": rescale,
        "bits_per_weight": round(bits, 4),
        "rel_error": float((reference - approx).norm() / norm),
        "rtn_rel_error": float((reference - rtn).norm() / norm),
    }
    if calibration is not None:
        # held-out output error ‖(W - Ŵ) Xᵀ‖ / ‖W Xᵀ‖ on rows the rescaling never saw
        row["output_error"] = output_error(reference, approx, calibration.gram_val)
        row["rtn_output_error"] = output_error(reference, rtn, calibration.gram_val)
        row["calib_rows"] = int(calibration.train.shape[0])
        row["held_out_rows"] = calibration.rows_val
    row["seconds"] = round(time.perf_counter() - begin, 3)
    rows.append(row)
    for group, q in quantized.items():
        for index, payload in enumerate(q.payloads):
            for field, tensor in payload.items():
                yield f"{name}.{group}.{index}.{field}", tensor
