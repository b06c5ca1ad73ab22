"""A model as embeddings plus a list of repeated blocks, materialised one block at a time.

Block-by-block (streaming) calibration needs three things from the model, all here:

- ``find_blocks``: where its block list is (``model.layers`` for Llama, Mistral and
  Qwen-type models, ``encoder.layer`` for BERT-type ones, see ``BLOCK_LISTS``), or
  one line saying why it has none that streaming can use;
- ``empty_model``: the model built from ``config.json`` with every parameter on the
  ``meta`` device (no memory) and its buffers real, since buffers such as rotary
  frequencies are computed at construction and never stored in a checkpoint;
- ``BlockStream``: the inputs of every block for each calibration batch, recorded by
  running the model's own forward with only the embeddings materialised, and each
  block's weights loaded from the checkpoint when it is its turn and freed after.

Recording runs the real forward, so attention masks, position ids and rotary
embeddings are the ones the full model computes; each block's ``forward`` is swapped
for a recorder that keeps its arguments (besides the hidden states) and hands the
hidden states on unchanged, and the pass stops after the last block.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lyoncompress.checkpoint import Checkpoint
from lyoncompress.models import build_model

# where transformers keeps the repeated blocks, by what the model's attributes are called
BLOCK_LISTS = ("model.layers", "layers", "encoder.layer", "bert.encoder.layer", "roberta.encoder.layer")


@dataclass(frozen=True)
class BlockInputs:
    """One calibration batch as a block sees it: ``hidden`` ``(B, T, H)`` float32 (None
    once the streaming loop holds the hidden states itself),
    ``mask`` the tokenizer's ``(B, T)`` attention mask (None: every position is real),
    and ``args`` / ``kwargs`` the block's other arguments, one tuple and dict per block."""

    hidden: torch.Tensor | None
    mask: torch.Tensor | None
    args: list[tuple[Any, ...]]
    kwargs: list[dict[str, Any]]


def find_blocks(model: nn.Module, layer_names: Sequence[str]) -> tuple[str | None, str]:
    """``(path of the block list, '')`` when every layer of ``layer_names`` lies in one of
    ``model``'s ``BLOCK_LISTS``; else ``(None, why not)``."""
    modules = dict(model.named_modules())
    path = next((p for p in BLOCK_LISTS if isinstance(modules.get(p), nn.ModuleList)), None)
    if path is None:
        return None, f"{type(model).__name__} has no block list ({', '.join(BLOCK_LISTS)})"
    outside = [name for name in layer_names if block_index(path, name) is None]
    if outside:
        return None, f"layer {outside[0]} lies outside the block list {path}"
    return path, ""


def block_index(path: str, layer_name: str) -> int | None:
    """The block a layer name lies in (``model.layers.3.mlp.up_proj`` → 3), or None."""
    head, dot, rest = layer_name.partition(path + ".")
    index = rest.split(".", 1)[0]
    return int(index) if dot and not head and index.isdigit() else None


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Inside the block every new ``nn.Parameter`` goes to the ``meta`` device (buffers
    stay where they are made): building even a 70B model then costs no memory."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_model(config: dict[str, Any] | None, where: Path) -> nn.Module:
    """The model of ``config`` (see ``models.build_model``) with parameters on ``meta``,
    buffers real, in eval mode."""
    with _parameters_on_meta():
        return build_model(config, where).eval()


def materialize(model: nn.Module, source: Checkpoint, names: Sequence[str]) -> int:
    """Load the checkpoint tensors ``names`` into ``model`` in place of its meta
    parameters, each in the dtype the model was built with (as ``load_state_dict``
    without ``assign`` would copy it); returns how many elements were loaded."""
    slots = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    state = {name: source.load(name).to(slots[name].dtype) for name in names if name in slots}
    model.load_state_dict(state, strict=False, assign=True)
    return sum(t.numel() for t in state.values())


def release(module: nn.Module) -> None:
    """Free ``module``'s parameters (back to ``meta``)."""
    module.to("meta")


class _Recorded(Exception):
    """Raised by the last block's recorder: nothing after the blocks is needed."""


class BlockStream:
    """The blocks of ``model`` (built by ``empty_model``) at ``path``, fed from ``source``.

    ``record(batches)`` materialises what runs before the blocks (every tensor outside
    the block list except the output embeddings), records each batch's block inputs
    and frees it again; ``load(i)`` materialises block ``i`` and returns it, ``free(i)``
    frees it. ``loaded`` counts the elements currently materialised by this stream.
    """

    def __init__(self, model: nn.Module, path: str, source: Checkpoint) -> None:
        self.model, self.path, self.source = model, path, source
        self.blocks: nn.ModuleList = model.get_submodule(path)
        self.loaded = 0
        self.peak_loaded = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def _tensors_of(self, index: int) -> list[str]:
        prefix = f"{self.path}.{index}."
        return [name for name in self.source.names() if name.startswith(prefix)]

    def _outside(self) -> list[str]:
        # the output embeddings (an LM head) run after the blocks: never needed here
        output = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        skipped = tuple(f"{name}." for name, module in self.model.named_modules() if module is output)
        prefix = self.path + "."
        return [
            name
            for name in self.source.names()
            if not name.startswith(prefix) and not (skipped and name.startswith(skipped))
        ]

    def _count(self, elements: int) -> None:
        self.loaded += elements
        self.peak_loaded = max(self.peak_loaded, self.loaded)

    def record(self, batches: Sequence[Mapping[str, Any]]) -> list[BlockInputs]:
        """Each batch's inputs to the blocks (tokenizer outputs in, see ``BlockInputs``)."""
        outside = self._outside()
        elements = materialize(self.model, self.source, outside)
        self._count(elements)
        seen: dict[str, Any] = {}
        last = len(self.blocks) - 1

        def recorder(index: int):
            def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
                hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
                if index == 0:
                    seen["hidden"] = hidden
                seen["args"].append(rest)
                seen["kwargs"].append(kwargs)
                if index == last:
                    raise _Recorded
                return hidden

            return forward

        for index, block in enumerate(self.blocks):
            block.forward = recorder(index)
        extra = (
            {"use_cache": False} if "use_cache" in inspect.signature(self.model.forward).parameters else {}
        )
        recorded = []
        try:
            # no_grad, not inference_mode: block-wise distillation backpropagates
            # through blocks that take these tensors (rotary embeddings, masks) as inputs
            with torch.no_grad():
                for batch in batches:
                    seen.update(args=[], kwargs=[])
                    with contextlib.suppress(_Recorded):
                        self.model(**batch, **extra)
                    recorded.append(
                        BlockInputs(
                            seen["hidden"].float(),
                            batch.get("attention_mask"),
                            seen["args"],
                            seen["kwargs"],
                        )
                    )
        finally:
            for block in self.blocks:
                del block.forward
            self._release(outside, elements)
        return recorded

    def _release(self, names: Sequence[str], elements: int) -> None:
        owners = {name.rpartition(".")[0] for name in names}
        for owner in owners:
            module = self.model.get_submodule(owner)
            for name, param in list(module.named_parameters(recurse=False)):
                module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        self.loaded -= elements

    def load(self, index: int) -> nn.Module:
        """Block ``index`` with its checkpoint weights."""
        self._count(materialize(self.model, self.source, self._tensors_of(index)))
        return self.blocks[index]

    def free(self, index: int) -> None:
        block = self.blocks[index]
        self.loaded -= sum(p.numel() for p in block.parameters() if p.device.type != "meta")
        release(block)
        return_freed_memory()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 256 << 10  # bytes: every larger allocation is its own mapping


def map_large_allocations() -> bool:
    """Make glibc give each allocation of ``MMAP_THRESHOLD`` bytes or more its own
    memory mapping, returned to the system as soon as it is freed (for the rest of the
    process). glibc's default raises that threshold up to 32 MiB as large blocks are
    freed, so a block's activations and the next block's inputs then share the heap,
    and the heap keeps what the forward passes freed between them: on SmolLM2-135M each
    pass through a block left ~200 MiB resident until ``malloc_trim``. False where the
    C library has no ``mallopt`` (not glibc)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def return_freed_memory() -> None:
    """Hand freed heap pages back to the system: glibc keeps the blocks' freed tensors
    and the fits' work arrays in its arenas, so without this the resident size grows
    block after block (SmolLM2: +100 MB a block) although nothing is held. Called after
    each block, and inside a block after the capture and after each fit: a 5632-wide
    Llama block's capture left ~180 MiB of freed heap resident under the fits' peak."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
