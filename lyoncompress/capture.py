"""Calibration capture: forward pre-hooks that record the inputs of chosen layers.

Owns the one hook loop over calibration batches and what it keeps of each layer's
input rows (one per token or sample): float64 second moments ``X^T X`` of the
fitting and the held-out rows (``capture_inputs``, factorize), or the fitting rows
themselves and the held-out moment (``capture_rows``, quantize); the paired capture
of one layer in a reference and a partly compressed model (``capture_paired``,
sequential factorize); every input row of a plain pass (``recorded_inputs``, eval);
and the order the forward pass reaches the layers (``forward_order``).

Moments are accumulated in float64 on the device of the model's parameters (the
batches must be there too); kept rows as well.

A moment costs ``n × n`` per layer however much data flows through. Whole batches are
held out, by ``data.held_out``; positions a tokenizer's attention mask marks as
padding are left out (``input_rows``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lyoncompress.data import VAL_EVERY, held_out
from lyoncompress.errors import InputError

Batch = torch.Tensor | Mapping[str, Any]  # model(batch), or model(**batch) for tokenizer outputs


@dataclass(frozen=True)
class LayerCalibration:
    """Second moments of one layer's inputs: ``gram_train`` to fit, ``gram_val`` to judge.

    All are float64 ``(n, n)``; ``rows_train`` / ``rows_val`` count the input rows.
    Sequential calibration (``capture_paired``) sees the layer's inputs ``X~`` in a
    partly compressed model while its targets stay ``X W^T`` of the reference
    inputs ``X``: the grams are then ``X~^T X~``, ``cross_*`` hold ``X^T X~``, and
    ``reference_gram_val`` is ``X^T X`` of the held-out rows (None otherwise).
    """

    gram_train: torch.Tensor
    gram_val: torch.Tensor
    rows_train: int
    rows_val: int
    cross_train: torch.Tensor | None = None
    cross_val: torch.Tensor | None = None
    reference_gram_val: torch.Tensor | None = None

    @property
    def sequential(self) -> bool:
        return self.cross_train is not None


@dataclass(frozen=True)
class CapturedRows:
    """One layer's fitting input rows ``train`` ``(rows, n)`` and the held-out ``X^T X``
    ``gram_val`` ``(n, n)`` of ``rows_val`` rows, all float64."""

    train: torch.Tensor
    gram_val: torch.Tensor
    rows_val: int


def input_rows(x: torch.Tensor, mask: torch.Tensor | None, limit: int | None = None) -> torch.Tensor:
    """A layer input ``x`` as one float64 row per real token or sample, ``(rows, n)``:
    positions that ``mask`` (a tokenizer's attention mask) marks as padding are left out.
    With ``limit`` only the first ``limit`` of those rows are gathered and converted (the
    same rows as ``input_rows(x, mask)[:limit]``, without a float64 copy of the whole
    batch: 740 MiB for 16k tokens of a 5632-wide ``down_proj`` input)."""
    if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        if limit is None:
            return x[mask.to(torch.bool)].to(torch.float64)
        # boolean indexing takes the positions in row-major order, as nonzero() lists them
        kept = mask.to(torch.bool).reshape(-1).nonzero().squeeze(1)[:limit]
        return x.reshape(-1, x.shape[-1])[kept].to(torch.float64)
    rows = x.reshape(-1, x.shape[-1])
    return (rows if limit is None else rows[:limit]).to(torch.float64)


@contextlib.contextmanager
def _hooks(modules: Mapping[str, nn.Module], record: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Inside the block, every call of a module first runs ``record(key, its input)``."""
    handles = [
        module.register_forward_pre_hook(lambda _, inputs, key=key: record(key, inputs[0].detach()))
        for key, module in modules.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Unshared(Exception):
    """Raised when layers that shared an input in the first batch do not in a later one."""


class _Reached(Exception):
    """Raised by a hook once the watched layer has seen its input: nothing after it
    is needed, so the rest of the forward pass is skipped."""


def _run(model: nn.Module, batch: Batch) -> None:
    with contextlib.suppress(_Reached):
        model(**batch) if isinstance(batch, Mapping) else model(batch)


def _mask(batch: Batch) -> torch.Tensor | None:
    return batch.get("attention_mask") if isinstance(batch, Mapping) else None


def _device(model: nn.Module) -> torch.device:
    """Where ``model`` computes (its first parameter's device; cpu without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _check_period(val_every: int) -> None:
    if val_every < 2:
        raise InputError(f"val_every={val_every} leaves no batch for training; use 2 or more")


class _Inputs:
    """One layer's rows so far: up to ``max_rows`` per split (0 fits, 1 is held out).
    Held-out rows are summed into their moment; fitting rows too, or kept as they
    are when ``keep_rows``."""

    def __init__(self, n: int, max_rows: int, keep_rows: bool, device: torch.device) -> None:
        self.n, self.device = n, device
        # each split's moment is made by its first rows (a shared layer's never are)
        self._grams: list[torch.Tensor | None] = [None, None]
        self.rows = [0, 0]
        self.kept: list[torch.Tensor] = []
        self.max_rows = max_rows
        self.keep_rows = keep_rows

    @property
    def grams(self) -> list[torch.Tensor]:
        """Both moments; zeros for a split that got no rows."""
        zeros = functools.partial(torch.zeros, self.n, self.n, dtype=torch.float64, device=self.device)
        self._grams = [zeros() if g is None else g for g in self._grams]
        return self._grams  # type: ignore[return-value]

    def add(self, split: int, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        """The rows of input ``x`` (see ``input_rows``) that the split still takes."""
        room = self.max_rows - self.rows[split]
        if room <= 0:  # full: a later batch adds nothing (no zero (n, n) product either)
            return
        rows = input_rows(x, mask, room)  # (k, n) float64, on the model's device
        if split == 0 and self.keep_rows:
            self.kept.append(rows)
        elif self._grams[split] is None:
            # the first product is the moment itself: no zeros beside it. Adding +0.0 is
            # what accumulating into zeros did (0 + x == x, and -0.0 becomes +0.0)
            self._grams[split] = (rows.T @ rows).add_(0.0)
        else:
            self._grams[split] += rows.T @ rows  # type: ignore[operator]
        self.rows[split] += rows.shape[0]

    @property
    def full(self) -> bool:
        return min(self.rows) >= self.max_rows


def _stream(
    model: nn.Module,
    names: list[str],
    batches: Iterable[Batch],
    max_rows: int,
    val_every: int,
    keep_rows: bool,
    share: bool = False,
) -> dict[str, _Inputs]:
    """The one capture loop: run ``model`` on ``batches`` until every layer in ``names``
    has ``max_rows`` rows in both splits (or the batches run out). With ``share``,
    layers whose input is the same tensor in every batch get one ``_Inputs`` (see
    ``record``); a batch where that stops holding restarts the capture unshared."""
    _check_period(val_every)
    if share:  # read twice if need be: a sequence is kept as it is (it may load batches lazily)
        batches = batches if isinstance(batches, Sequence) else list(batches)
        with contextlib.suppress(_Unshared):
            return _loop(model, names, batches, max_rows, val_every, keep_rows, share=True)
    return _loop(model, names, batches, max_rows, val_every, keep_rows, share=False)


def _loop(
    model: nn.Module,
    names: list[str],
    batches: Iterable[Batch],
    max_rows: int,
    val_every: int,
    keep_rows: bool,
    share: bool,
) -> dict[str, _Inputs]:
    modules = dict(model.named_modules())
    layers = {name: modules[name] for name in names}
    device = _device(model)
    inputs = {name: _Inputs(layer.in_features, max_rows, keep_rows, device) for name, layer in layers.items()}
    current: dict[str, Any] = {"split": 0, "mask": None}
    # a layer fed the very tensor the layer recorded just before it was fed (a Llama's
    # k/v_proj after q_proj, up_proj after gate_proj) shares that layer's moments: the
    # same sums of the same rows, computed and held once. Who shares with whom is seen in
    # the first batch and checked in every other one; the previous input is held until
    # the next is recorded, so an equal address, shape and stride is the same data
    alias: dict[str, str] = {}  # layer -> the layer whose moments it shares
    last: dict[str, Any] = {}  # the input recorded last: its layer, identity and tensor
    first = [True]

    def record(name: str, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)
        previous = alias.get(last.get("name", ""), last.get("name"))
        same = last.get("key") == key
        last.update(name=name, key=key, x=x)
        if share and first[0] and same and previous != name:  # (a layer run twice on one input: no)
            alias[name] = previous
        elif share and name in alias and not (same and previous == alias[name]):
            raise _Unshared
        if name not in alias:
            inputs[name].add(current["split"], x, current["mask"])

    with _hooks(layers, record), torch.inference_mode():
        for index, batch in enumerate(batches):
            current["split"] = 1 if held_out(index, val_every) else 0
            current["mask"] = _mask(batch)
            last.clear()
            _run(model, batch)
            first[0] = False
            if all(i.full for name, i in inputs.items() if name not in alias):
                break
    return {name: inputs[alias.get(name, name)] for name in names}


def capture_inputs(
    model: nn.Module,
    layer_names: Iterable[str],
    batches: Iterable[Batch],
    max_samples: int = 8192,
    val_every: int = VAL_EVERY,
) -> dict[str, LayerCalibration]:
    """Run ``model`` on ``batches`` and return the input second moments of ``layer_names``.

    Args:
        model: any module; it is called as ``model(batch)`` or ``model(**batch)``
            for a mapping (e.g. a tokenizer's output). Its train/eval mode is left as is.
        layer_names: names of ``nn.Linear`` submodules (as in ``model.named_modules()``).
        batches: the calibration data. When a batch is a mapping with an
            ``attention_mask`` and a layer's input is ``(batch, seq, n)``, padded
            positions are skipped.
        max_samples: at most this many input rows per layer go into each moment;
            iteration stops once both moments of every layer are full.
        val_every: every ``val_every``-th batch is held out (>= 2, see ``data.held_out``).

    Returns:
        ``{name: LayerCalibration}``.

    Example:
        >>> calib = capture_inputs(model, ["encoder.layer.0.intermediate.dense"], batches)
        >>> calib["encoder.layer.0.intermediate.dense"].gram_train.shape
        torch.Size([384, 384])
    """
    names = list(layer_names)
    modules = dict(model.named_modules())
    for name in names:
        if not isinstance(modules.get(name), nn.Linear):
            raise InputError(f"{name!r} is not an nn.Linear submodule of the model; check the layer name")
    inputs = _stream(model, names, batches, max_samples, val_every, keep_rows=False, share=True)
    return {name: LayerCalibration(*i.grams, *i.rows) for name, i in inputs.items()}


def capture_rows(
    model: nn.Module,
    layer_names: Iterable[str],
    batches: Iterable[Batch],
    max_rows: int,
    val_every: int = VAL_EVERY,
) -> dict[str, CapturedRows]:
    """As ``capture_inputs``, but the fitting rows come back as rows (up to ``max_rows``
    per layer), for fits that need more than their second moment; the held-out rows
    are still a moment. ``layer_names`` may name any module with ``in_features``
    (``nn.Linear``, ``ButterflyLinear``). A layer the data never reached gets no rows."""
    names = list(layer_names)
    modules = dict(model.named_modules())
    for name in names:
        if not isinstance(getattr(modules.get(name), "in_features", None), int):
            raise InputError(f"{name!r} is not a linear layer of the model; check the layer name")
    inputs = _stream(model, names, batches, max_rows, val_every, keep_rows=True)
    return {
        name: CapturedRows(
            torch.cat(i.kept) if i.kept else torch.zeros(0, i.n, dtype=torch.float64, device=i.device),
            i.grams[1],
            i.rows[1],
        )
        for name, i in inputs.items()
    }


def capture_paired(
    reference: nn.Module,
    working: nn.Module,
    layer_name: str,
    batches: Sequence[Batch],
    max_samples: int = 8192,
    val_every: int = VAL_EVERY,
) -> LayerCalibration:
    """Second and cross moments of one layer's inputs in ``reference`` (``X``) and in
    ``working`` (``X~``, the same model with earlier layers already compressed).

    Both models see the same batches, so their rows pair up token by token. Each
    forward pass stops at the layer. Batches are split as in ``capture_inputs``.

    Returns:
        ``LayerCalibration`` with ``gram_* = X~^T X~``, ``cross_* = X^T X~`` and
        ``reference_gram_val = X^T X`` (held-out rows).
    """
    _check_period(val_every)
    modules = [dict(model.named_modules()).get(layer_name) for model in (reference, working)]
    if not all(isinstance(m, nn.Module) for m in modules):
        raise InputError(f"{layer_name!r} is not a submodule of both models; check the layer name")
    captured: list[torch.Tensor] = []

    def record(key: str, x: torch.Tensor) -> None:
        captured.append(x)
        raise _Reached

    n = modules[0].in_features

    device = _device(working)

    def zeros() -> torch.Tensor:
        return torch.zeros(n, n, dtype=torch.float64, device=device)

    grams, crosses, rows = [zeros(), zeros()], [zeros(), zeros()], [0, 0]
    reference_val = zeros()
    with _hooks(dict(zip(("reference", "working"), modules)), record), torch.inference_mode():
        for index, batch in enumerate(batches):
            split = 1 if held_out(index, val_every) else 0
            if rows[split] >= max_samples:
                if min(rows) >= max_samples:
                    break
                continue
            captured.clear()
            _run(reference, batch)
            _run(working, batch)
            if len(captured) != 2:
                raise InputError(f"the calibration data never reached {layer_name!r}; check --calib")
            x, x_work = (input_rows(t, _mask(batch), max_samples - rows[split]) for t in captured)
            grams[split] += x_work.T @ x_work
            crosses[split] += x.T @ x_work
            if split == 1:
                reference_val += x.T @ x
            rows[split] += x.shape[0]
    return LayerCalibration(grams[0], grams[1], rows[0], rows[1], crosses[0], crosses[1], reference_val)


@contextlib.contextmanager
def recorded_inputs(model: nn.Module, layer_names: Iterable[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Inside the block, every input of the layers ``layer_names`` is appended to the
    yielded ``{name: [rows (k, n), ...]}``, every row, in the input's dtype (the caller
    casts; float64 copies of every layer at once could double the memory)."""
    names = list(layer_names)
    modules = dict(model.named_modules())
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def record(name: str, x: torch.Tensor) -> None:
        captured[name].append(x.reshape(-1, x.shape[-1]))

    with _hooks({name: modules[name] for name in names}, record):
        yield captured


def forward_order(model: nn.Module, layer_names: Iterable[str], batch: Batch) -> list[str]:
    """``layer_names`` in the order the forward pass first reaches them (layers it never
    reaches keep their given order, at the end)."""
    names = list(layer_names)
    modules = dict(model.named_modules())
    seen: list[str] = []

    def record(name: str, x: torch.Tensor) -> None:
        if name not in seen:
            seen.append(name)

    with _hooks({name: modules[name] for name in names}, record), torch.inference_mode():
        _run(model, batch)
    return seen + [name for name in names if name not in seen]
