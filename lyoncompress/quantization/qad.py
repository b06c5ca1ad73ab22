"""Quantization-aware distillation (``quantize --distill-steps``): train the quantized
layers end to end through the quantizer, then re-quantize them to codes.

It starts from the analytic quantization (each layer's rescaling and scales, fitted on
its own output error). Every factor of every quantized layer becomes a latent float
twiddle equal to its dequantized codes, behind a ``fakequant.FakeQuantized``
parametrization that holds its scales; ``refine.distill.distill`` then trains latents
and scales together against the teacher's outputs (straight-through rounding, LSQ
scale gradients), keeping the best held-out state. That state is re-quantized with
its learned scales, so the stored codes are exactly what the best state computed
with. The start is one of the states judged, so the result is never worse on the
held-out batches than the analytic quantization.

Embedding tables are rounded on their weights alone (their inputs are token ids):
they keep their analytic codes, and the student computes with them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn
from torch.nn.utils import parametrize

from lyoncompress.errors import InputError
from lyoncompress.layers import ButterflyLinear
from lyoncompress.quantization.chain import QuantizedChain
from lyoncompress.quantization.fakequant import FakeQuantized
from lyoncompress.quantization.formats import get_format
from lyoncompress.refine.distill import Batch, DistillResult, distill
from lyoncompress.schema import PLAIN_STRUCTURES, LayerRecord

Quantized = dict[str, dict[str, QuantizedChain]]  # layer -> group (factors, lowrank) -> chain


def _holders(model: nn.Module, name: str, record: LayerRecord) -> dict[str, list[tuple[nn.Module, str]]]:
    """Where each twiddle of layer ``name`` lives in ``model``: (module, attribute) by group."""
    module = dict(model.named_modules()).get(name)
    if record.structure in PLAIN_STRUCTURES:
        if not isinstance(module, nn.Linear | nn.Embedding):
            raise InputError(f"layer {name}: the model has no nn.Linear / nn.Embedding there to distil")
        return {"factors": [(module, "weight")]}
    if not isinstance(module, ButterflyLinear):
        raise InputError(f"layer {name}: the model has no ButterflyLinear there; is the artifact intact?")
    groups = {"factors": [(factor, "twiddle") for factor in module.factors]}
    if module.lowrank is not None:
        groups["lowrank"] = [(factor, "twiddle") for factor in module.lowrank]
    return groups


def distill_quantized(
    teacher: nn.Module,
    student: nn.Module,
    records: dict[str, LayerRecord],
    quantized: Quantized,
    train: Sequence[Batch],
    val: Sequence[Batch],
    steps: int,
    lr: float | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[Quantized, DistillResult]:
    """Quantization-aware distillation of the layers ``quantized`` of ``student``.

    Args:
        teacher: the model whose outputs are matched (the dense reference).
        student: the float model the layers were quantized from (their twiddles, or
            plain weights, are overwritten with the dequantized codes); modified in place.
        records: the layer records of ``quantized`` (their structure says where the
            twiddles live).
        quantized: the analytic quantization, by layer and group; integer formats only.
        train, val: calibration batches to fit and to judge.
        steps, lr: Adam steps and learning rate (None: the objective's default).
        progress: as ``distill``'s.

    Returns:
        The re-quantized chains (same formats, group sizes and layouts), and the held-out
        objective before (the analytic quantization) and after.

    Example:
        >>> chains, result = distill_quantized(dense, factorized, records, analytic, train, val, 300)
        >>> result.val_after <= result.val_before
        True
    """
    trained: list[tuple[str, str, int, nn.Module, str, FakeQuantized]] = []
    params: list[nn.Parameter] = []
    for name, groups in quantized.items():
        holders = _holders(student, name, records[name])
        for group, chain in groups.items():
            fmt = get_format(chain.format)
            for index, (payload, pattern) in enumerate(zip(chain.payloads, chain.chain.patterns)):
                module, attr = holders[group][index]
                weight = getattr(module, attr)
                start = fmt.dequantize(payload, pattern.twiddle_shape, torch.float64)
                with torch.no_grad():
                    weight.copy_(start.reshape(weight.shape).to(weight.dtype))
                if isinstance(module, nn.Embedding):
                    continue
                fake = FakeQuantized(chain.format, payload["scale"], chain.group_size, pattern.twiddle_shape)
                parametrize.register_parametrization(module, attr, fake.to(weight.device))
                trained.append((name, group, index, module, attr, fake))
                params += [module.parametrizations[attr].original, fake.scale]
    if not trained:
        raise InputError("--distill-steps found no int8 / int4 layer to train besides embedding tables")
    result = distill(teacher, student, train, val, steps, lr, progress=progress, params=params)
    payloads = {
        (name, group): list(chain.payloads)
        for name, groups in quantized.items()
        for group, chain in groups.items()
    }
    for name, group, index, module, attr, fake in trained:
        chain = quantized[name][group]
        latent = module.parametrizations[attr].original.detach().double().cpu()
        shape = chain.chain.patterns[index].twiddle_shape
        payloads[name, group][index] = get_format(chain.format).quantize(
            latent.reshape(shape), chain.group_size, fake.stored_scale().cpu()
        )
    chains = {
        name: {
            group: replace(chain, payloads=tuple(payloads[name, group])) for group, chain in groups.items()
        }
        for name, groups in quantized.items()
    }
    return chains, result
