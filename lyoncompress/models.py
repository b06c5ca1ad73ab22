"""Build runnable models for a checkpoint or an artifact (registry by ``model_type``).

The built-in demo MLP is ``lyoncompress-demo-mlp``; any other ``model_type`` is
handed to transformers (``AutoModel``), so every architecture it knows works.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lyoncompress.artifact import load_artifact
from lyoncompress.checkpoint import Checkpoint, open_checkpoint
from lyoncompress.errors import InputError
from lyoncompress.layers import apply_artifact

DEMO_MODEL_TYPE = "lyoncompress-demo-mlp"


class DemoMLP(nn.Module):
    """``fc1 -> GELU -> fc2 -> GELU -> head``: the demo's digit classifier."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        n_in, hidden1, hidden2, n_out = sizes
        self.fc1 = nn.Linear(n_in, hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.head = nn.Linear(hidden2, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.fc1(x))
        x = nn.functional.gelu(self.fc2(x))
        return self.head(x)


def _build_demo(config: dict[str, Any]) -> nn.Module:
    return DemoMLP(config["sizes"])


def _transformers_class(config: dict[str, Any]) -> Any:
    """The class named in ``architectures`` (so causal LMs keep their head), else ``AutoModel``."""
    try:
        import transformers
    except ImportError as err:
        raise InputError("this model needs transformers: pip install 'lyoncompress[hf]'") from err
    architecture = (config.get("architectures") or [None])[0]
    found = getattr(transformers, architecture, None) if architecture else None
    return found or transformers.AutoModel


def _build_transformers(config: dict[str, Any]) -> nn.Module:
    import transformers

    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = plain.pop("model_type")
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **plain)
    except ValueError as err:
        raise InputError(f"transformers does not know model_type {model_type!r}: {err}") from err
    cls = _transformers_class(config)
    return cls._from_config(hf_config) if hasattr(cls, "_from_config") else cls.from_config(hf_config)


BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {DEMO_MODEL_TYPE: _build_demo}


def build_model(config: dict[str, Any] | None, where: Path) -> nn.Module:
    """An untrained model of the architecture that ``config`` describes."""
    if not config or "model_type" not in config:
        raise InputError(
            f"{where}: no config.json with a model_type, so no model can be built to run; "
            "use a Hugging Face model folder (or only the 'weights' task)"
        )
    builder = BUILDERS.get(config["model_type"], _build_transformers)
    return builder(config)


def load_reference(path: str | Path | Checkpoint) -> nn.Module:
    """The dense model of a checkpoint folder (or of an opened ``Checkpoint``), in eval mode."""
    checkpoint = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    model = build_model(checkpoint.config, checkpoint.path)
    state = {name: checkpoint.load(name) for name in checkpoint.names()}
    expected = set(model.state_dict()) - tied_aliases(model)
    missing = sorted(expected - set(state))
    if missing:
        raise InputError(f"{path}: checkpoint lacks {missing[:5]} that its config's model needs")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return model.eval()


def tied_aliases(model: nn.Module) -> set[str]:
    """Names of parameters that are the same tensor as an earlier one (tied embeddings):
    checkpoints store such a tensor once."""
    seen: dict[int, str] = {}
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.setdefault(id(param), name)
    return aliases


def load_compressed(path: str | Path) -> nn.Module:
    """The model of an artifact with its ``ButterflyLinear`` layers, in eval mode."""
    artifact = load_artifact(path)
    model = build_model(artifact.config, artifact.path)
    return apply_artifact(model, artifact).eval()
