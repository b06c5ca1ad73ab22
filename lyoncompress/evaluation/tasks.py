"""Evaluation tasks (a registry). Each compares the reference and compressed models.

A task returns ``TaskResult``: named metrics for the reference and the compressed
model, and the one number its gate checks (``recovery`` or ``output_error``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lyoncompress.artifact import Artifact
from lyoncompress.capture import recorded_inputs
from lyoncompress.checkpoint import Checkpoint
from lyoncompress.data import (
    TEXT_MAX_LENGTH,
    Samples,
    builtin_corpus,
    digits_split,
    load_tokenizer,
    tokenized_batches,
)
from lyoncompress.errors import InputError
from lyoncompress.layers import ButterflyLinear, swap_in
from lyoncompress.models import DEMO_MODEL_TYPE, load_compressed, load_reference
from lyoncompress.quantization.payloads import check_finite, dequantize_state
from lyoncompress.schema import LayerRecord

BATCH = 32


def model_kind(config: dict[str, Any] | None) -> str:
    """``mlp`` | ``encoder`` | ``causal-lm`` | ``weights-only`` (no ``model_type``: cannot run)."""
    config = config or {}
    if config.get("model_type") == DEMO_MODEL_TYPE:
        return "mlp"
    if not config.get("model_type"):
        return "weights-only"
    if any(a.endswith("ForCausalLM") for a in config.get("architectures") or []):
        return "causal-lm"
    return "encoder"


@dataclass
class EvalContext:
    """Both sides of the comparison; models are built on first use."""

    reference_path: Path
    reference: Checkpoint
    artifact: Artifact
    samples: Samples | None
    count: int
    seed: int

    @property
    def kind(self) -> str:
        return model_kind(self.reference.config)

    @functools.cached_property
    def reference_model(self) -> nn.Module:
        return load_reference(self.reference_path)

    @functools.cached_property
    def compressed_model(self) -> nn.Module:
        return load_compressed(self.artifact.path)

    @functools.cached_property
    def tokenizer(self) -> Any:
        return load_tokenizer(self.reference_path)

    def texts(self) -> list[str]:
        if self.samples is not None:
            if self.samples.texts is None:
                raise InputError("this task needs text data (a .txt file, one sample a line)")
            return self.samples.texts
        return builtin_corpus(self.count, self.seed, split="eval")

    def _check_fits(self, inputs: torch.Tensor) -> None:
        """One sample through the reference model: data of the wrong width is bad input,
        said before any task runs, not a shape error deep inside one."""
        try:
            with torch.no_grad():
                self.reference_model(inputs[:1])
        except RuntimeError as err:
            raise InputError(
                f"--data: samples of shape {tuple(inputs.shape[1:])} do not fit the model "
                f"({str(err).splitlines()[0]})"
            ) from err

    def tensor_inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.samples is not None:
            if self.samples.inputs is None:
                raise InputError("this task needs tensor data (.npy, .npz or .safetensors)")
            inputs = self.samples.inputs.float()
            self._check_fits(inputs)
            return inputs, self.samples.labels
        if self.kind != "mlp":
            raise InputError("no built-in tensor data for this model; pass --data")
        split = digits_split()
        return split.x_test, split.y_test


@dataclass(frozen=True)
class TaskResult:
    """Metrics of one task; ``gate_value`` is what its gate compares."""

    metrics: dict[str, Any]
    gate: str | None = None  # "recovery" (higher is better) or "output_error" (lower is better)
    gate_value: float | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)


def _dense_weight(ctx: EvalContext, name: str) -> torch.Tensor:
    return ctx.compressed_model.get_submodule(name).to_dense().detach().double()


def weights_task(ctx: EvalContext) -> TaskResult:
    """Relative Frobenius error of every compressed matrix (no data, no model needed)."""
    rows = []
    for name, record in ctx.artifact.layers.items():
        reference = ctx.reference.load(f"{name}.weight").double()
        if record.is_embedding:
            tensors = dequantize_state(_layer_tensors(ctx.artifact, name), {name: record})
            approx, params = tensors[f"{name}.weight"].double(), reference.numel()
        else:
            layer = _standalone_layer(ctx.artifact, name, record)
            approx, params = layer.to_dense().detach().double(), layer.params
        error = float((reference - approx).norm() / reference.norm().clamp_min(1e-30))
        rows.append({"name": name, "rel_error": error, "compression": reference.numel() / params})
    mean = sum(r["rel_error"] for r in rows) / len(rows)
    return TaskResult(
        {"mean_rel_error": mean, "max_rel_error": max(r["rel_error"] for r in rows)}, layers=rows
    )


def _layer_tensors(artifact: Artifact, name: str) -> dict[str, torch.Tensor]:
    prefix = f"{name}."
    return {k: artifact.load(k) for k in artifact.tensors.names() if k.startswith(prefix)}


def _standalone_layer(artifact: Artifact, name: str, record: LayerRecord) -> ButterflyLinear:
    """A compressed layer rebuilt on its own, without building the model around it."""
    holder = nn.Module()
    holder.add_module(
        "layer", nn.Linear(record.in_features, record.out_features, bias=record.bias, device="meta")
    )
    layer = swap_in(holder, "layer", record)
    tensors = _layer_tensors(artifact, name)  # a quantized layer keeps its payloads
    check_finite(dequantize_state(tensors, {name: record}), {name: record}, str(artifact.path))
    state = {k.removeprefix(f"{name}."): v for k, v in tensors.items()}
    layer.load_state_dict(state, strict=True, assign=True)
    return layer


def _run(model: nn.Module, ctx: EvalContext) -> torch.Tensor:
    """Final outputs of ``model`` on the task data: logits, or mean-pooled hidden states."""
    if ctx.kind == "mlp" or (ctx.samples is not None and ctx.samples.inputs is not None):
        inputs, _ = ctx.tensor_inputs()
        with torch.no_grad():
            return torch.cat([model(batch) for batch in inputs.split(256)])
    return _embed(model, ctx)


def _embed(model: nn.Module, ctx: EvalContext) -> torch.Tensor:
    texts = ctx.texts()
    pooled = []
    with torch.no_grad():
        for batch in tokenized_batches(ctx.tokenizer, texts, BATCH):
            # the last hidden states, for encoders and causal LMs alike
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1]  # (B, T, H)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
    return torch.cat(pooled)


def outputs_task(ctx: EvalContext) -> TaskResult:
    """Per-layer ``‖(W - Ŵ) X‖ / ‖W X‖`` on the reference model's activations, and the
    relative error and cosine of the final outputs."""
    # an embedding's inputs are token ids: its error shows in the final outputs only
    linear = [name for name, record in ctx.artifact.layers.items() if not record.is_embedding]
    with recorded_inputs(ctx.reference_model, linear) as captured:
        reference_out = _run(ctx.reference_model, ctx).double()
    compressed_out = _run(ctx.compressed_model, ctx).double()
    rows = []
    for name, chunks in captured.items():
        x = torch.cat(chunks).double()  # (samples, in)
        weight = ctx.reference_model.get_submodule(name).weight.detach().double()
        error = float(
            ((weight - _dense_weight(ctx, name)) @ x.T).norm() / (weight @ x.T).norm().clamp_min(1e-30)
        )
        rows.append({"name": name, "output_error": error})
    rel = float((reference_out - compressed_out).norm() / reference_out.norm().clamp_min(1e-30))
    cosine = float(torch.nn.functional.cosine_similarity(reference_out, compressed_out, dim=-1).mean())
    metrics = {"final_rel_error": rel, "final_cosine": cosine, "samples": len(reference_out)}
    return TaskResult(metrics, gate="output_error", gate_value=rel, layers=rows)


def classification_task(ctx: EvalContext) -> TaskResult:
    """Accuracy of both models on a labelled set; recovery = compressed / reference."""
    inputs, labels = ctx.tensor_inputs()
    if labels is None:
        raise InputError("classification needs labels: a .npz with arrays x and y")
    accuracies = []
    for model in (ctx.reference_model, ctx.compressed_model):
        with torch.no_grad():
            logits = torch.cat([model(batch.float()) for batch in inputs.split(256)])
        # a NaN logit still has an argmax: without this a broken model would be "accurate"
        finite = bool(torch.isfinite(logits).all())
        accuracies.append(float((logits.argmax(-1) == labels).float().mean()) if finite else float("nan"))
    reference, compressed = accuracies
    recovery = compressed / reference if reference else 0.0
    metrics = {"reference_accuracy": reference, "compressed_accuracy": compressed, "samples": len(labels)}
    return TaskResult(metrics, gate="recovery", gate_value=recovery)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty_like(values)
    ranks[values.argsort()] = torch.arange(len(values), dtype=values.dtype)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ties broken by position)."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()).clamp_min(1e-30))


def embeddings_task(ctx: EvalContext) -> TaskResult:
    """Sentence embeddings: mean cosine to the reference (the recovery) and Spearman
    correlation of the two models' pairwise similarity matrices."""
    reference = torch.nn.functional.normalize(_embed(ctx.reference_model, ctx).double(), dim=-1)
    compressed = torch.nn.functional.normalize(_embed(ctx.compressed_model, ctx).double(), dim=-1)
    cosine = float((reference * compressed).sum(-1).mean())
    upper = torch.triu_indices(len(reference), len(reference), offset=1)
    sims_ref = (reference @ reference.T)[upper[0], upper[1]]
    sims_cmp = (compressed @ compressed.T)[upper[0], upper[1]]
    metrics = {
        "mean_cosine": cosine,
        "similarity_spearman": spearman(sims_ref, sims_cmp),
        "samples": len(reference),
    }
    return TaskResult(metrics, gate="recovery", gate_value=cosine)


def text_perplexity(model: nn.Module, tokenizer: Any, texts: Sequence[str]) -> float:
    """Token-weighted perplexity of a causal LM over ``texts``, one text at a time
    (each truncated to ``TEXT_MAX_LENGTH`` tokens; texts under two tokens are skipped)."""
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=TEXT_MAX_LENGTH)[
                "input_ids"
            ]
            if ids.shape[1] < 2:
                continue
            loss = model(input_ids=ids, labels=ids).loss
            nll += float(loss) * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    if tokens == 0:
        raise InputError("perplexity needs texts of at least two tokens")
    return float(torch.tensor(nll / tokens).exp())


def perplexity_task(ctx: EvalContext) -> TaskResult:
    """Perplexity of both causal LMs on the texts; recovery = ppl_reference / ppl_compressed."""
    texts = ctx.texts()
    reference, compressed = (
        text_perplexity(m, ctx.tokenizer, texts) for m in (ctx.reference_model, ctx.compressed_model)
    )
    metrics = {
        "reference_perplexity": reference,
        "compressed_perplexity": compressed,
        "perplexity_ratio": compressed / reference,  # the ratio to dense, as issue 6 reports it
        "samples": len(texts),
    }
    return TaskResult(metrics, gate="recovery", gate_value=reference / compressed)


Task = Callable[[EvalContext], TaskResult]
TASKS: dict[str, Task] = {
    "weights": weights_task,
    "outputs": outputs_task,
    "classification": classification_task,
    "embeddings": embeddings_task,
    "perplexity": perplexity_task,
}
# The gate kind each task measures (TaskResult.gate), known before it runs, so that a
# gate no selected task can measure is refused instead of silently passing.
GATED_BY: dict[str, str | None] = {
    "weights": None,
    "outputs": "output_error",
    "classification": "recovery",
    "embeddings": "recovery",
    "perplexity": "recovery",
}
# Which tasks fit which kind of model; the first ones run by default.
FITTING: dict[str, tuple[str, ...]] = {
    "weights-only": ("weights",),
    "mlp": ("weights", "outputs", "classification"),
    "encoder": ("weights", "outputs", "embeddings"),
    "causal-lm": ("weights", "outputs", "perplexity"),
}
