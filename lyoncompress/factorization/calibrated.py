"""Data-aware factorization: capture calibration activations, then pick and refine each
layer's structure by held-out *output* error instead of weight error.

``--calib builtin`` uses the offline defaults (the digits training split for the demo
MLP; standard-library docstring sentences, the ``calib`` half, for text models);
any other value is a data file in the formats ``eval --data`` takes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lyoncompress.errors import InputError
from lyoncompress.evaluation.data import Samples, builtin_corpus, load_samples, tokenized_batches
from lyoncompress.factorization.methods import Candidate, LayerFactors
from lyoncompress.models import DEMO_MODEL_TYPE, load_compressed, load_reference
from lyoncompress.plan import LayerPlan
from lyoncompress.refine import LayerCalibration, capture_inputs, choose_structure
from lyoncompress.refine.distill import DistillResult, distill

BUILTIN = "builtin"
TEXT_BATCH = 16
TENSOR_BATCH = 64
# which refine candidates each factorize method may choose from
CANDIDATES_FOR: dict[str, tuple[str, ...]] = {
    "auto": ("lowrank", "lowrank-aware", "monarch-projection", "monarch", "hybrid"),
    "lowrank": ("lowrank-aware",),
    "monarch": ("monarch",),
    "hybrid": ("hybrid",),
}


def calibrate(
    checkpoint: str | Path, config: dict[str, Any] | None, layers: list[LayerPlan], calib: str, samples: int
) -> dict[str, LayerCalibration]:
    """Run the reference model on calibration data; second moments of each layer's inputs."""
    model = load_reference(checkpoint)
    batches = calibration_batches(checkpoint, config or {}, calib, samples)
    return capture_inputs(model, [layer.name for layer in layers], batches, max_samples=samples)


def calibration_batches(
    checkpoint: str | Path, config: dict[str, Any], calib: str, samples: int
) -> Iterator[Any]:
    """The calibration data as model inputs: tensors, or tokenizer outputs for text."""
    is_mlp = config.get("model_type") == DEMO_MODEL_TYPE
    if calib == BUILTIN:
        if is_mlp:
            from lyoncompress.demo import digits_split

            data = Samples(inputs=digits_split().x_train)
        else:
            # every calib sentence: ~20 tokens each, capture stops once `samples` rows are in
            data = Samples(texts=builtin_corpus(None, split="calib"))
    else:
        data = load_samples(calib)
    if data.texts is not None:
        from transformers import AutoTokenizer

        yield from tokenized_batches(AutoTokenizer.from_pretrained(checkpoint), data.texts, TEXT_BATCH)
    else:
        yield from data.inputs.float().split(TENSOR_BATCH)


def calibrated_layer(
    weight: torch.Tensor, layer: LayerPlan, calibration: LayerCalibration, steps: int
) -> LayerFactors:
    """The structure with the lowest held-out output error within the layer's budget."""
    if calibration.rows_train == 0 or calibration.rows_val == 0:
        raise InputError(f"layer {layer.name}: the calibration data never reached it; check --calib")
    choice = choose_structure(
        weight,
        calibration.gram_train,
        calibration.gram_val,
        layer.budget,
        candidates=CANDIDATES_FOR[layer.method],
        steps=steps,
    )
    best = choice.chosen
    approx = best.chain.to_dense(best.twiddles)
    if best.lowrank_twiddles:
        approx = approx + best.lowrank_twiddles[0][0, 0] @ best.lowrank_twiddles[1][0, 0]
    weight_error = float((weight - approx).norm() / weight.norm().clamp_min(1e-30))
    candidates = [Candidate(s.name, str(s.chain), s.params, s.val_error) for s in choice.candidates]
    return LayerFactors(
        structure=best.name,
        chain=best.chain,
        twiddles=best.twiddles,
        rel_error=weight_error,
        candidates=candidates,
        lowrank_twiddles=best.lowrank_twiddles,
        output_error=best.val_error,
    )


def distill_artifact(
    checkpoint: str | Path,
    artifact: Path,
    config: dict[str, Any] | None,
    calib: str,
    samples: int,
    steps: int,
    lr: float,
) -> tuple[dict[str, torch.Tensor], DistillResult]:
    """Distil the factors of a staged ``artifact`` against the reference model.

    Returns the distilled twiddles by artifact tensor name, and the held-out errors.
    Every 4th calibration batch is held out, as in layer-wise calibration.
    """
    batches = list(calibration_batches(checkpoint, config or {}, calib, samples))
    train = [b for i, b in enumerate(batches) if i % 4 != 3]
    val = [b for i, b in enumerate(batches) if i % 4 == 3]
    if not train or not val:
        raise InputError("--distill-steps needs at least 4 calibration batches; give more --calib data")
    compressed = load_compressed(artifact)
    result = distill(load_reference(checkpoint), compressed, train, val, steps, lr)
    twiddles = {name: t.detach() for name, t in compressed.state_dict().items() if name.endswith(".twiddle")}
    return twiddles, result
