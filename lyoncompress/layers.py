"""``ButterflyLinear``: an ``nn.Linear`` whose weight is a chain of KS factors.

State dict layout (the artifact uses the same names): ``factors.{ℓ}.twiddle`` of
shape ``(a, d, b, c)`` for ``ℓ = 0 … L-1``, optionally ``lowrank.0.twiddle``
``(1, 1, m, r)`` and ``lowrank.1.twiddle`` ``(1, 1, r, n)`` for a rank-``r`` term
``U V`` added to the chain (the butterfly + low-rank hybrid), and ``bias``. The
forward pass is ``y = x @ (X_1 … X_L + U V).T + bias`` through the reference
einsum product in ``butterfly.py``; the CUDA kernels plug in there when available.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lyoncompress.artifact import Artifact, load_artifact
from lyoncompress.butterfly import Chain, lowrank
from lyoncompress.errors import InputError, PatternError
from lyoncompress.factorization import project
from lyoncompress.kernels import ks_chain_apply, use_cuda_kernels
from lyoncompress.quantization.payloads import check_finite, dequantize_state
from lyoncompress.schema import LayerRecord


class _Factor(nn.Module):
    """Holds one twiddle so that its state-dict name is ``factors.{ℓ}.twiddle``."""

    def __init__(self, twiddle: torch.Tensor) -> None:
        super().__init__()
        self.twiddle = nn.Parameter(twiddle)


class ButterflyLinear(nn.Module):
    """Linear layer ``y = x W^T + bias`` with ``W = X_1 … X_L (+ U V)`` Kronecker-sparse.

    Args:
        in_features, out_features: as in ``nn.Linear``; must equal ``chain.shape[::-1]``.
        chain: the factor patterns.
        bias: whether to learn an additive bias.
        lowrank_rank: rank ``r`` of an extra low-rank term ``U V`` (0: none).
        dtype, device: of the parameters (twiddles start at zero).

    Example:
        >>> layer = ButterflyLinear.from_linear(nn.Linear(16, 16), square_butterfly(16))
        >>> layer(torch.randn(3, 16)).shape
        torch.Size([3, 16])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        chain: Chain,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        lowrank_rank: int = 0,
    ) -> None:
        super().__init__()
        if chain.shape != (out_features, in_features):
            raise PatternError(
                f"chain {chain} has shape {chain.shape}, but the layer maps "
                f"{in_features} -> {out_features} features (needs ({out_features}, {in_features}))"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.chain = chain
        self.factors = _factor_list(chain, dtype, device)
        self.lowrank_chain = lowrank(out_features, in_features, lowrank_rank) if lowrank_rank else None
        self.lowrank = _factor_list(self.lowrank_chain, dtype, device) if lowrank_rank else None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_twiddles(
        cls,
        chain: Chain,
        twiddles: list[torch.Tensor],
        bias: torch.Tensor | None = None,
        lowrank_twiddles: list[torch.Tensor] | None = None,
    ) -> ButterflyLinear:
        """Layer holding copies of the given twiddles, optional bias and optional
        low-rank term (twiddles ``(1, 1, m, r)`` and ``(1, 1, r, n)``)."""
        chain.check_twiddles(twiddles)
        m, n = chain.shape
        rank = lowrank_twiddles[0].shape[-1] if lowrank_twiddles else 0
        layer = cls(
            n,
            m,
            chain,
            bias=bias is not None,
            dtype=twiddles[0].dtype,
            device=twiddles[0].device,
            lowrank_rank=rank,
        )
        with torch.no_grad():
            for factor, twiddle in zip(layer.factors, twiddles):
                factor.twiddle.copy_(twiddle)
            if lowrank_twiddles:
                layer.lowrank_chain.check_twiddles(lowrank_twiddles)
                for factor, twiddle in zip(layer.lowrank, lowrank_twiddles):
                    factor.twiddle.copy_(twiddle)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, chain: Chain, order: str = "left-to-right") -> ButterflyLinear:
        """Project ``linear.weight`` onto ``chain`` (error-guaranteed projection) and keep its bias."""
        with torch.no_grad():
            projection = project(linear.weight.detach(), chain, order)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_twiddles(chain, projection.twiddles, bias)

    @property
    def twiddles(self) -> list[torch.Tensor]:
        return [factor.twiddle for factor in self.factors]

    @property
    def lowrank_twiddles(self) -> list[torch.Tensor]:
        return [factor.twiddle for factor in self.lowrank] if self.lowrank is not None else []

    @property
    def params(self) -> int:
        """Stored weight parameters (twiddles and low-rank term, bias excluded)."""
        return self.chain.params + (self.lowrank_chain.params if self.lowrank_chain else 0)

    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight ``X_1 … X_L (+ U V)``."""
        dense = self.chain.to_dense(self.twiddles)
        if self.lowrank_chain is not None:
            dense = dense + self.lowrank_chain.to_dense(self.lowrank_twiddles)
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_cuda_kernels(x):
            y = ks_chain_apply(self.chain.patterns, self.twiddles, x)
        else:
            y = self.chain.apply(self.twiddles, x)
        if self.lowrank_chain is not None:
            y = y + self.lowrank_chain.apply(self.lowrank_twiddles, x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"chain={self.chain}, lowrank={self.lowrank_chain.patterns[0].c if self.lowrank_chain else 0}, "
            f"params={self.params}, bias={self.bias is not None}"
        )


def _factor_list(chain: Chain, dtype: torch.dtype | None, device: torch.device | str | None) -> nn.ModuleList:
    return nn.ModuleList(
        _Factor(torch.zeros(shape, dtype=dtype, device=device)) for shape in chain.twiddle_shapes
    )


def apply_artifact(model: nn.Module, artifact: Artifact | str | Path) -> nn.Module:
    """Swap the artifact's compressed layers into ``model`` and load every tensor, strictly.

    Each compressed layer must be an ``nn.Linear`` of the recorded shape in ``model``;
    it becomes a ``ButterflyLinear`` (quantized payloads are dequantized). Then the
    whole state dict is loaded: a missing or an extra tensor is an ``InputError``, a
    non-finite twiddle (after dequantization) a ``FormatError``.

    Args:
        model: the architecture the artifact was made from (weights may be on ``meta``).
        artifact: an ``Artifact`` or the path of one.

    Returns:
        ``model``, modified in place.
    """
    art = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
    for name, record in art.layers.items():
        if not record.is_embedding:  # an embedding stays nn.Embedding; its table is dequantized
            swap_in(model, name, record)
    state = dequantize_state({name: art.load(name) for name in art.tensors.names()}, art.layers)
    check_finite(state, art.layers, str(art.path))
    # a tied parameter (lm_head = embeddings) is stored once, under its first name
    tied = _tied_aliases(model)
    expected = set(model.state_dict()) - tied
    # non-persistent buffers (e.g. BERT's position_ids) are saved by some exporters
    buffers = {n for n, _ in model.named_buffers()} - expected
    missing = sorted(expected - set(state))
    extra = sorted(set(state) - expected - buffers)
    if missing or extra:
        raise InputError(
            f"{art.path} does not match the model: "
            + (f"missing {missing[:5]}{' …' if len(missing) > 5 else ''}; " if missing else "")
            + (f"unexpected {extra[:5]}{' …' if len(extra) > 5 else ''}" if extra else "")
        )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=not tied, assign=True)
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()  # assign=True replaced the shared tensor on one side only
    return model


def _tied_aliases(model: nn.Module) -> set[str]:
    seen: set[int] = set()
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases


def swap_in(model: nn.Module, name: str, record: LayerRecord) -> ButterflyLinear:
    """Replace the ``nn.Linear`` at ``name`` by an empty (meta) ``ButterflyLinear`` shaped
    as the artifact's layer ``record`` says; returns the new layer."""
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise InputError(f"the artifact compresses layer {name!r}, which the model does not have") from err
    shape = (record.out_features, record.in_features)
    if not isinstance(module, nn.Linear) or (module.out_features, module.in_features) != shape:
        raise InputError(
            f"layer {name!r} is {module!r} in the model, the artifact expects Linear{shape[::-1]}"
        )
    layer = ButterflyLinear(
        record.in_features,
        record.out_features,
        record.chains["factors"],
        bias=record.bias,
        dtype=record.dtype.torch,
        device="meta",
        lowrank_rank=record.lowrank_rank,
    )
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)
    return layer
