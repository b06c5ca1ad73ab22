"""The ``quantize`` verb: factorized artifact -> quantized artifact.

Each compressed layer's chain (and low-rank term) goes through ``quantize_chain``;
the payload tensors are stored as ``P.factors.{ℓ}.{field}`` (``qdata``, ``scale``,
``values`` …, see ``formats``) and the layer entry gets a ``quantization`` record.
Round-to-nearest is run on the same factors in the same pass, so the report shows
the error the rescaling saved.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lyoncompress.artifact import Artifact, companion_files, load_artifact, write_artifact
from lyoncompress.butterfly import Chain
from lyoncompress.capture import CapturedRows
from lyoncompress.checkpoint import Checkpoint, open_checkpoint
from lyoncompress.data import VAL_EVERY, calibration_batches, distill_split
from lyoncompress.errors import FormatError, InputError
from lyoncompress.models import build_model, load_compressed, load_reference
from lyoncompress.output import Output, claim_output, data_paths
from lyoncompress.plan import make_plan
from lyoncompress.quantization.calibration import calibrate
from lyoncompress.quantization.chain import QuantizedChain, quantize_chain
from lyoncompress.quantization.formats import IntFormat, get_format
from lyoncompress.quantization.qad import Quantized, distill_quantized
from lyoncompress.quantization.rescale import resolve
from lyoncompress.recipe import QuantizeConfig, Recipe, compile_pattern, parse_size
from lyoncompress.refine.distill import DistillResult
from lyoncompress.refine.gram import output_error
from lyoncompress.schema import PLAIN_STRUCTURES, DType, LayerRecord, QuantRecord, Structure

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


def _is_artifact(path: Path) -> bool:
    try:
        load_artifact(path)
    except InputError:
        return False
    return True


def _sources(
    path: Path, dense: bool, include: tuple[str, ...] = ()
) -> tuple[Checkpoint, dict[str, LayerRecord], dict[str, Any], list[str]]:
    """The tensors to read, the layer records to quantize, the config to carry, warnings.

    With ``dense``, a plain weight becomes the one-factor chain ``(1, m, n, 1)``: its
    twiddle is the matrix itself, so it is stored and loaded like any other chain.
    ``include`` adds the plain 2-D weights whose module names match (``--include-dense``).
    """
    checkpoint = open_checkpoint(path)
    try:
        artifact: Artifact | None = load_artifact(path)
    except InputError:
        artifact = None
    if artifact is not None:
        already = [name for name, record in artifact.layers.items() if record.quantization is not None]
        if already:
            raise InputError(
                f"{path} is already quantized ({already[0]} …); quantize the factorized artifact"
            )
        config = {k: v for k, v in artifact.config.items() if k != "quantization_config"}
        layers = dict(artifact.layers)
        checkpoint = artifact.tensors  # without the placeholders, which the writer adds anew
    elif not dense:
        raise InputError(
            f"{path} is not a factorized artifact; run `lyoncompress factorize` first, "
            "or pass --dense to quantize its dense weights as they are"
        )
    else:
        config = dict(checkpoint.config or {})
        names = [layer.name for layer in make_plan(checkpoint, Recipe()).layers]
        layers = {name: _plain_record(checkpoint, name, Structure.DENSE) for name in names}
    extra, warnings = select_plain(checkpoint, layers, include)
    kinds = plain_kinds(config, checkpoint.path, extra)
    layers.update({name: _plain_record(checkpoint, name, kinds[name]) for name in extra})
    return checkpoint, layers, config, warnings


def select_plain(
    checkpoint: Checkpoint, layers: dict[str, LayerRecord], include: tuple[str, ...]
) -> tuple[list[str], list[str]]:
    """Module names of the plain 2-D float ``*.weight`` tensors that ``include`` matches
    (``re.fullmatch``), those already in ``layers`` left out; and a warning per pattern
    that matched no such weight."""
    plain = [
        name.removesuffix(".weight")
        for name, info in checkpoint.infos.items()
        if name.endswith(".weight") and len(info.shape) == 2 and info.dtype.is_floating_point
    ]
    plain = [name for name in plain if name not in layers]
    patterns = [(p, compile_pattern(p, "--include-dense")) for p in include]
    chosen = [name for name in plain if any(regex.fullmatch(name) for _, regex in patterns)]
    warnings = [
        f"--include-dense {p!r} matched no plain 2-D weight"
        for p, regex in patterns
        if not any(regex.fullmatch(name) for name in plain)
    ]
    return chosen, warnings


def plain_kinds(config: dict[str, Any], where: Path, names: list[str]) -> dict[str, Structure]:
    """``dense`` for an ``nn.Linear``, ``embedding`` for an ``nn.Embedding``, found on the
    model built on the meta device; a checkpoint without a ``model_type`` (weights only)
    has no modules to tell, so each weight is ``dense``. Any other module is refused."""
    if not names:
        return {}
    if not config.get("model_type"):
        return dict.fromkeys(names, Structure.DENSE)
    with torch.device("meta"):
        model = build_model(config, where)
    modules = dict(model.named_modules())
    kinds = {}
    for name in names:
        module = modules.get(name)
        if isinstance(module, nn.Embedding):
            kinds[name] = Structure.EMBEDDING
        elif isinstance(module, nn.Linear):
            kinds[name] = Structure.DENSE
        else:
            raise InputError(
                f"--include-dense selects {name}.weight, whose module is {type(module).__name__}; "
                "only nn.Linear and nn.Embedding weights can be quantized: narrow the pattern"
            )
    return kinds


def _plain_record(checkpoint: Checkpoint, name: str, structure: Structure) -> LayerRecord:
    info = checkpoint.infos[f"{name}.weight"]
    m, n = info.shape
    embedding = structure is Structure.EMBEDDING
    try:
        return LayerRecord(
            structure=structure,
            in_features=n,
            out_features=m,
            chain=((1, m, n, 1),),
            lowrank_rank=0,
            bias=not embedding and f"{name}.bias" in checkpoint.infos,
            dtype=DType.of(info.dtype),
            quantization=None,
        )
    except FormatError as err:
        raise err.at(str(checkpoint.path), name) from None


def _twiddles(checkpoint: Checkpoint, name: str, record: LayerRecord) -> dict[str, list[torch.Tensor]]:
    """The layer's float twiddles by group: ``factors`` (and ``lowrank``); all finite, since
    a NaN would be rounded into payloads that quietly poison every output."""
    if record.structure in PLAIN_STRUCTURES:
        names = {"factors": [f"{name}.weight"]}
    else:
        names = {"factors": [f"{name}.factors.{i}.twiddle" for i in range(len(record.chain))]}
        if record.lowrank_rank:
            names["lowrank"] = [f"{name}.lowrank.{i}.twiddle" for i in range(2)]
    groups = {group: [checkpoint.load(tensor) for tensor in tensors] for group, tensors in names.items()}
    for group, tensors in names.items():
        for tensor, twiddle in zip(tensors, groups[group]):
            if not bool(torch.isfinite(twiddle).all()):
                where = str(checkpoint.path)
                raise FormatError("holds NaN or infinite values", f"tensor {tensor}", name, where)
    if record.structure in PLAIN_STRUCTURES:
        groups["factors"] = [groups["factors"][0].reshape(1, 1, record.out_features, record.in_features)]
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
    if not isinstance(get_format(config.format), IntFormat) and config.distill_steps:
        raise InputError(
            f"--distill-steps trains the scales of int8 / int4 codes; format {config.format} has none: "
            "pick --format int8 or int4, or drop --distill-steps"
        )
    rescale = config.rescale or default_rescale(config.format, calibrated=config.calib is not None)
    resolve(rescale)
    with claim_output(out, force, [artifact, *data_paths(reference, config.calib)]) as output:
        report = _quantize(Path(artifact), output, config, rescale, reference, progress)
        report["warnings"] = [*output.notes, *report.get("warnings", [])]
        return report


def _quantize(
    artifact: Path,
    output: Output,
    config: QuantizeConfig,
    rescale: str,
    reference: str | Path | None,
    progress: Progress | None,
) -> dict[str, Any]:
    fmt, group_size, calib = config.format, config.group_size, config.calib
    source, records, model_config, warnings = _sources(artifact, config.dense, config.include_dense)
    calibration = None
    if calib is not None:
        # an embedding's inputs are token ids: it is rounded on its weights alone
        linear = [name for name, record in records.items() if not record.is_embedding]
        calibration = calibrate(
            artifact, linear, calib, config.calib_samples, Path(reference) if reference else None
        )
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {"warnings": warnings}
    distilled = None
    if config.distill_steps:
        analytic = {
            name: _analytic(
                record.chains,
                _twiddles(source, name, record),
                fmt,
                rescale,
                group_size,
                None if calibration is None else calibration.get(name),
            )
            for name, record in records.items()
        }
        distilled, result = _distill(artifact, config, records, model_config, analytic, reference, progress)
        report["distill"] = {
            "objective": result.objective,
            "lr": result.lr,
            "steps": result.steps,
            "teacher": str(reference or artifact),
            "val_output_error_before": result.val_before,
            "val_output_error_after": result.val_after,
        }

    def finish_report() -> dict[str, Any]:
        report.update(
            command="quantize",
            include_dense=list(config.include_dense),
            source=str(artifact),
            format=fmt,
            rescale=rescale,
            group_size=group_size,
            calib=calib,
            layers=rows,
            seconds=round(time.perf_counter() - started, 3),
        )
        return report

    # what write_artifact writes: each layer's JSON record, replaced once it is quantized
    table = {name: record.to_json() for name, record in records.items()}
    stream = _stream(source, records, table, fmt, rescale, group_size, rows, progress, calibration, distilled)
    write_artifact(
        output.path,
        stream,
        table,
        model_config,
        finish_report,
        parse_size(config.max_shard_size),
        output.force,
        companion_files(artifact),
    )
    return report


def _distill(
    artifact: Path,
    config: QuantizeConfig,
    records: dict[str, LayerRecord],
    model_config: dict[str, Any],
    analytic: Quantized,
    reference: str | Path | None,
    progress: Progress | None,
) -> tuple[Quantized, DistillResult]:
    """Quantization-aware distillation of the ``analytic`` chains (``qad``): the student is
    the float model of ``artifact``, the teacher the dense model in ``reference`` (else
    that float model itself), on ``config.calib`` split by ``data.distill_split``."""
    student = load_compressed(artifact) if _is_artifact(artifact) else load_reference(artifact)
    teacher = load_reference(reference) if reference is not None else copy.deepcopy(student)
    batches = list(
        calibration_batches(reference or artifact, model_config, config.calib, config.calib_samples)
    )
    train, val = distill_split(batches)
    if not train or not val:
        raise InputError(
            f"--distill-steps needs at least {VAL_EVERY} calibration batches; give more --calib data"
        )
    report_step = None
    if progress is not None:

        def report_step(done: int, total: int, best: float) -> None:
            progress(f"distilling, best held-out error {best:.4f}", done, total)

    return distill_quantized(
        teacher, student, records, analytic, train, val, config.distill_steps, config.distill_lr, report_step
    )


def _stream(
    source: Checkpoint,
    layers: dict[str, LayerRecord],
    table: dict[str, dict[str, Any]],
    fmt: str,
    rescale: str,
    group_size: int | None,
    rows: list[dict[str, Any]],
    progress: Progress | None,
    calibration: dict[str, CapturedRows] | None = None,
    distilled: Quantized | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    # the tensor that starts each layer's group; the rest of the group is skipped
    first = {
        (f"{n}.weight" if r.structure in PLAIN_STRUCTURES else f"{n}.factors.0.twiddle"): n
        for n, r in layers.items()
    }
    replaced = tuple(f"{n}.{group}." for n in layers for group in ("factors", "lowrank")) + tuple(
        f"{n}.weight" for n, r in layers.items() if r.structure in PLAIN_STRUCTURES
    )
    for tensor_name in source.names():
        if tensor_name in first:
            layer = first[tensor_name]
            inputs = None if calibration is None else calibration.get(layer)
            fixed = None if distilled is None else distilled[layer]
            quantized = _quantize_layer(
                source, layer, layers[layer], fmt, rescale, group_size, rows, inputs, fixed
            )
            table[layer] = yield from quantized
            if progress is not None:
                progress(layer, len(rows), len(layers))
        elif not tensor_name.startswith(replaced):
            yield tensor_name, source.load(tensor_name)


def _analytic(
    chains: dict[str, Chain],
    twiddles: dict[str, list[torch.Tensor]],
    fmt: str,
    rescale: str,
    group_size: int | None,
    calibration: CapturedRows | None,
) -> dict[str, QuantizedChain]:
    """Each group's chain rescaled and rounded, on the layer's captured inputs if any."""
    calib = None if calibration is None else calibration.train
    held_out = None if calibration is None else calibration.gram_val
    return {
        group: quantize_chain(chain, twiddles[group], fmt, rescale, group_size, calib, held_out)
        for group, chain in chains.items()
    }


def _quantize_layer(
    source: Checkpoint,
    name: str,
    record: LayerRecord,
    fmt: str,
    rescale: str,
    group_size: int | None,
    rows: list[dict[str, Any]],
    calibration: CapturedRows | None = None,
    fixed: dict[str, QuantizedChain] | None = None,
) -> Generator[tuple[str, torch.Tensor], None, dict[str, Any]]:
    """Yields the layer's payload tensors; returns its JSON record with the ``quantization``.
    ``fixed``: the chains to store (distilled), instead of quantizing the layer here."""
    begin = time.perf_counter()
    chains, twiddles = record.chains, _twiddles(source, name, record)
    reference = _dense(chains, twiddles)
    if fixed is None:
        quantized = _analytic(chains, twiddles, fmt, rescale, group_size, calibration)
    else:
        quantized = fixed
        rescale = f"{rescale}+distilled"  # the stored payloads are the distillation's, not the rescaling's
    baseline = {
        group: quantize_chain(chain, twiddles[group], fmt, "none", group_size).dequantized(torch.float64)
        for group, chain in chains.items()
    }
    approx = _dense(chains, {g: q.dequantized(torch.float64) for g, q in quantized.items()})
    rtn = _dense(chains, baseline)
    norm = reference.norm().clamp_min(1e-30)
    params = sum(chain.params for chain in chains.values())
    bits = sum(q.bits_per_weight * q.chain.params for q in quantized.values()) / params
    quantization = QuantRecord(
        format=fmt, rescale=rescale, group_size=group_size, bits_per_weight=round(bits, 4)
    )
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
    return replace(record, quantization=quantization).to_json()
