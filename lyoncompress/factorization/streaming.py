"""Block-by-block (streaming) calibrated factorization: the reference model is never
whole in memory.

The model is built with its parameters on ``meta`` (``blocks.empty_model``); the
calibration batches go through the embeddings once (``blocks.BlockStream.record``),
then, for each block in turn: its weights are read from the checkpoint, its target
layers' inputs captured with ``capture`` as the whole-model path does (inside the
block sequentially with ``--sequential``), the layers fitted by
``calibrated.calibrated_layer``, the compressed block distilled against the dense
one (``--distill-steps``, objective ``block-mse``), the activations pushed through
it, and the block freed. Peak memory is one block's weights (twice, dense and a
compressed copy, only with ``--sequential`` or block-wise distillation) plus the
calibration activations (float32, one ``(B, T, H)`` tensor a batch, twice when
sequential, and one batch more while a block's outputs replace its inputs) plus the
fit's working set, whatever the depth. A fitted layer's factors go to the resume journal
and are read back from it when the artifact is written (``journal.Entries``), and large
allocations are mapped on their own (``blocks.map_large_allocations``), so neither the
finished layers nor the heap's leftovers of earlier blocks add up.

Two activation streams run through the blocks: the dense model's, whose block inputs
``X`` non-sequential fits and every sequential target ``X W^T`` use, and (sequential
only) the compressed model's ``X~``. The fitted factors are then those of the
whole-model path (``calibrated.calibrated_factors``): the same moments of the same
rows; only the order of float32 sums inside a block call may differ.

Only the calibration batches that layer-wise capture reads are streamed: those that
fill ``calib_samples`` real tokens in both splits (``data.held_out``); block-wise
distillation trains and judges on them too, held-out batches judging.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from lyoncompress.blocks import (
    BlockInputs,
    BlockStream,
    block_index,
    empty_model,
    find_blocks,
    map_large_allocations,
    return_freed_memory,
)
from lyoncompress.capture import capture_inputs, capture_paired, forward_order
from lyoncompress.checkpoint import Checkpoint
from lyoncompress.data import held_out
from lyoncompress.errors import InputError
from lyoncompress.factorization.calibrated import (
    CalibratedFactors,
    capture_batches,
    fit_or_resume,
    resolve_device,
    swap_factors,
)
from lyoncompress.factorization.journal import FinishedLayer
from lyoncompress.factorization.methods import LayerFactors
from lyoncompress.models import DEMO_MODEL_TYPE
from lyoncompress.output import file_system_error
from lyoncompress.plan import LayerPlan
from lyoncompress.processes import owned_scratch_folder
from lyoncompress.recipe import Recipe
from lyoncompress.refine.distill import distill

BLOCK = (
    "block"  # the runner's name for its block: layer ``model.layers.3.mlp.up_proj`` is ``block.mlp.up_proj``
)


@dataclass(frozen=True)
class StreamChoice:
    """Whether a run streams: the empty model and its block list path, or None and why not."""

    model: nn.Module | None
    path: str | None
    why: str


def stream_choice(source: Checkpoint, layers: Sequence[LayerPlan], recipe: Recipe) -> StreamChoice:
    """How ``recipe.stream`` applies to ``source`` (see ``Recipe``): ``on`` with a model
    that cannot stream is an ``InputError`` saying why."""
    if recipe.stream == "off":
        return StreamChoice(None, None, "stream: off")
    why = ""
    if recipe.allocate == "sensitivity":
        why = "sensitivity allocation measures the whole model"
    elif recipe.stream == "auto" and recipe.distill_steps:
        why = "distillation is end-to-end (--stream on distils block by block)"
    elif (source.config or {}).get("model_type") in (None, DEMO_MODEL_TYPE):
        why = "the model is not a transformers model with a block list"
    model = path = None
    if not why:
        model = empty_model(source.config, source.path)
        path, why = find_blocks(model, [layer.name for layer in layers])
    if path is None:
        if recipe.stream == "on":
            raise InputError(f"--stream on: cannot stream this model: {why}; use --stream auto or off")
        return StreamChoice(None, None, why)
    return StreamChoice(model, path, f"{len(model.get_submodule(path))} blocks of {path}")


class _BlockRunner(nn.Module):
    """Runs ``block`` on the stream ``key`` of a block batch (``_block_batches``), so that
    ``capture`` and ``distill`` treat one block as a model."""

    def __init__(self, block: nn.Module, key: str) -> None:
        super().__init__()
        self.block = block
        self.key = key

    def forward(
        self, attention_mask: torch.Tensor | None, rest: tuple, **streams: torch.Tensor
    ) -> torch.Tensor:
        args, kwargs = rest
        out = self.block(streams[self.key], *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out  # (B, T, H)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    return value


SCRATCH_PREFIX = "lyoncompress-stream-"


def _scratch_folder() -> Path:
    """A new folder for the spilled activations, in the system's temporary folder and
    named by this process's id; the folders of processes that are gone (a ``kill -9``)
    are removed first."""
    return owned_scratch_folder(Path(tempfile.gettempdir()), SCRATCH_PREFIX)


class _Spilled:
    """One activation stream, a ``(B, T, H)`` float32 tensor per calibration batch, kept
    in files under ``folder`` rather than in memory: ``stream[i]`` reads batch ``i`` back
    (exactly: safetensors holds the bytes), ``stream[i] = t`` replaces it."""

    def __init__(self, folder: Path, key: str, count: int) -> None:
        self.folder, self.key, self.count = folder, key, count

    def _path(self, index: int) -> Path:
        return self.folder / f"{self.key}-{index}.safetensors"

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        return safetensors.torch.load(self._path(index).read_bytes())["hidden"]

    def __setitem__(self, index: int, hidden: torch.Tensor) -> None:
        try:
            self._path(index).write_bytes(safetensors.torch.save({"hidden": hidden.contiguous()}))
        except OSError as err:
            raise file_system_error(err, self.folder) from err


class _BlockBatches(Sequence[dict[str, Any]]):
    """Block ``index``'s batches, each built when read: each stream's hidden states,
    the tokenizer's mask (which ``capture`` reads to skip padding) and the block's other
    arguments; only the batches being used are in memory."""

    def __init__(
        self,
        inputs: Sequence[BlockInputs],
        index: int,
        streams: Mapping[str, _Spilled],
        device: torch.device,
    ) -> None:
        self.inputs, self.index, self.streams, self.device = inputs, index, streams, device

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        if not 0 <= i < len(self.inputs):
            raise IndexError(i)
        item = self.inputs[i]
        batch = _to(
            {"attention_mask": item.mask, "rest": (item.args[self.index], item.kwargs[self.index])},
            self.device,
        )
        return batch | {key: hidden[i].to(self.device) for key, hidden in self.streams.items()}


def batches_to_fill(batches: Sequence[Mapping[str, Any]], rows: int) -> int:
    """How many leading batches a capture of ``rows`` real tokens per split reads."""
    seen = [0, 0]
    for index, batch in enumerate(batches):
        mask = batch.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        seen[1 if held_out(index) else 0] += tokens
        if min(seen) >= rows:
            return index + 1
    return len(batches)


@dataclass(frozen=True)
class StreamedFactors:
    """What a streamed run gives the pipeline: the layer-wise factors, the distilled
    twiddles by artifact tensor name (empty without distillation), the distillation's
    report section (None without), and the stream's own report section."""

    calibrated: CalibratedFactors
    distilled: dict[str, torch.Tensor]
    distill: dict[str, Any] | None
    report: dict[str, Any]


def streamed_factors(
    checkpoint: str | Path,
    source: Checkpoint,
    layers: list[LayerPlan],
    recipe: Recipe,
    choice: StreamChoice,
    progress: Callable[[str, int, int], None] | None = None,
    done: Mapping[str, FinishedLayer] | None = None,
    finished: Callable[[FinishedLayer], None] | None = None,
) -> StreamedFactors:
    """Every planned layer's factors, fitted block by block (see the module docstring).

    ``done`` and ``finished`` are as in ``calibrated.calibrated_factors``: journaled
    layers are not fitted again (their block still runs, and is distilled again,
    to feed the next). ``progress`` gets ("block i/N layer", layers done, layers).
    """
    done = {} if done is None else done  # the journal's entries: empty is still the journal
    map_large_allocations()  # what a block's passes free goes back to the system at once
    device = resolve_device(recipe.device)
    batches = capture_batches(checkpoint, source.config or {}, recipe.calib, recipe.calib_samples)
    if not batches or not isinstance(batches[0], Mapping):
        raise InputError("streaming needs tokenized text calibration data; use --stream off")
    batches = batches[: batches_to_fill(batches, recipe.calib_samples)]
    stream = BlockStream(choice.model, choice.path, source)
    inputs = stream.record(batches)
    scratch = _scratch_folder()
    try:
        return _streamed(
            source, layers, recipe, choice, progress, done, finished, device, batches, stream, inputs, scratch
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _streamed(
    source: Checkpoint,
    layers: list[LayerPlan],
    recipe: Recipe,
    choice: StreamChoice,
    progress: Callable[[str, int, int], None] | None,
    done: Mapping[str, FinishedLayer],
    finished: Callable[[FinishedLayer], None] | None,
    device: torch.device,
    batches: Sequence[Mapping[str, Any]],
    stream: BlockStream,
    inputs: list[BlockInputs],
    scratch: Path,
) -> StreamedFactors:
    """The block loop of ``streamed_factors``; the activation streams live in ``scratch``."""
    # the hidden states go to files between passes (``_Spilled``): only the batch a pass
    # is on is in memory, not the whole calibration set
    keys = ["hidden", "compressed"] if recipe.sequential else ["hidden"]
    streams = {key: _Spilled(scratch, key, len(inputs)) for key in keys}
    for i, item in enumerate(inputs):
        for key in keys:
            streams[key][i] = item.hidden
        inputs[i] = dataclasses.replace(item, hidden=None)
    by_block: dict[int, list[LayerPlan]] = {}
    for layer in layers:
        by_block.setdefault(block_index(choice.path, layer.name), []).append(layer)
    factors: dict[str, LayerFactors] = {}
    seconds: dict[str, float] = {}
    distilled: dict[str, torch.Tensor] = {}
    distill_rows: list[dict[str, Any]] = []
    for index in range(len(stream)):
        block = stream.load(index).to(device)
        planned = by_block.get(index, [])
        local = {
            layer.name: f"{BLOCK}.{layer.name.removeprefix(f'{choice.path}.{index}.')}" for layer in planned
        }
        reference = _BlockRunner(block, "hidden")
        # the compressed block is a copy only where it runs: sequential fits read its
        # inputs and block-wise distillation trains it; else the factors go straight to
        # the journal and the dense block alone feeds the next
        copied = bool(planned) and (recipe.sequential or bool(recipe.distill_steps))
        working = _BlockRunner(
            copy.deepcopy(block) if copied else block, "compressed" if recipe.sequential else "hidden"
        )
        block_batches = _BlockBatches(inputs, index, streams, device)
        calibration = {}
        todo = [layer.name for layer in planned if layer.name not in done]
        if todo and not recipe.sequential:
            captured = capture_inputs(
                reference, [local[n] for n in todo], block_batches, recipe.calib_samples
            )
            calibration = {name: captured[local[name]] for name in todo}
            del captured  # the moments are freed as the fits pop them, not at the next block
            return_freed_memory()  # what the capture's passes left in the heap, before the fits
        # independent fits go narrowest input first: a layer's fit then has beside it only
        # the moments of layers at least as wide (a Llama down_proj's, 5632 wide: not the
        # three 2048-wide pairs of the attention and the MLP's gate/up, 192 MiB)
        order = [layer.name for layer in sorted(planned, key=lambda layer: layer.shape[1])]
        if recipe.sequential and planned:
            back = {v: k for k, v in local.items()}
            order = [back[n] for n in forward_order(reference, list(back), block_batches[0])]
        by_name = {layer.name: layer for layer in planned}
        for name in order:
            begin = time.perf_counter()
            layer = by_name[name]
            if recipe.sequential:
                calibration_of = functools.partial(
                    capture_paired, reference, working, local[name], block_batches, recipe.calib_samples
                )
            else:  # each layer's moments are freed once it is fitted
                calibration_of = functools.partial(calibration.pop, name)
            fitted = fit_or_resume(layer, source, device, recipe, done, calibration_of)
            if name in done:
                seconds[name] = done[name].seconds
            else:
                seconds[name] = time.perf_counter() - begin
                if finished is not None:
                    finished(FinishedLayer(name, fitted, seconds[name], layer.budget))
            if name not in done:  # journaled layers are read back from the journal when written
                factors[name] = fitted
            if copied:
                swap_factors(working, local[name], fitted)
            del fitted
            return_freed_memory()  # the fit's work arrays, before the next fit
            if progress is not None:
                progress(f"block {index + 1}/{len(stream)} {name}", len(seconds), len(layers))
        if recipe.distill_steps and planned:
            distill_rows.append(_distill_block(index, reference, working, block_batches, recipe, progress))
            for name in local:
                state = working.get_submodule(local[name]).state_dict()
                distilled |= {
                    f"{name}.{k}": t.detach().cpu() for k, t in state.items() if k.endswith(".twiddle")
                }
        with torch.no_grad():  # the next block's distillation trains on these
            for i, batch in enumerate(block_batches):
                streams["hidden"][i] = reference(**batch).float().cpu()
                if recipe.sequential:
                    streams["compressed"][i] = working(**batch).float().cpu()
                del batch
        del reference, working, block_batches
        stream.free(index)
    kept = _Kept(factors, done, [layer.name for layer in layers])
    calibrated = CalibratedFactors(kept, {layer.name: layer.budget for layer in layers}, None, seconds)
    report = {
        "blocks": len(stream),
        "path": choice.path,
        "batches": len(batches),
        "peak_parameters": stream.peak_loaded,
    }
    section = _distill_section(distill_rows, recipe.distill_steps) if distill_rows else None
    return StreamedFactors(calibrated, distilled, section, report)


class _Kept(Mapping[str, LayerFactors]):
    """Every fitted layer's factors: those held in memory, else the journal's (read
    from disk at each access, see ``journal.Entries``)."""

    def __init__(
        self, held: Mapping[str, LayerFactors], done: Mapping[str, FinishedLayer], names: Sequence[str]
    ) -> None:
        self.held, self.done = held, done
        self.names = [name for name in names if name in held or name in done]

    def __getitem__(self, name: str) -> LayerFactors:
        return self.held[name] if name in self.held else self.done[name].factors

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _distill_block(
    index: int,
    reference: nn.Module,
    working: nn.Module,
    batches: Sequence[Mapping[str, Any]],
    recipe: Recipe,
    progress: Callable[[str, int, int], None] | None,
) -> dict[str, Any]:
    """Train the compressed block's twiddles to give the dense block's outputs
    (``block-mse``); the best held-out state is kept (``refine.distill``)."""
    val = [b for i, b in enumerate(batches) if held_out(i)]
    train = [b for i, b in enumerate(batches) if not held_out(i)]
    if not train or not val:
        raise InputError("block-wise distillation needs calibration batches to train and to judge; give more")

    def report_step(step: int, total: int, best: float) -> None:
        if progress is not None:
            progress(f"distilling block {index + 1}, best held-out error {best:.4f}", step, total)

    result = distill(
        reference,
        working,
        train,
        val,
        recipe.distill_steps,
        recipe.distill_lr,
        objective="block-mse",
        progress=report_step,
    )
    return {"block": index, "val_before": result.val_before, "val_after": result.val_after, "lr": result.lr}


def _distill_section(rows: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """The report's ``distill`` section of a block-wise run: per block, and the worst block."""
    return {
        "objective": "block-mse",
        "scope": "block",
        "lr": rows[0]["lr"],
        "steps": steps,
        "val_output_error_before": max(r["val_before"] for r in rows),
        "val_output_error_after": max(r["val_after"] for r in rows),
        "blocks": rows,
    }
