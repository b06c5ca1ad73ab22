"""``ButterflyLinear``: an ``nn.Linear`` whose weight is a chain of KS factors.

State dict layout (the artifact uses the same names): ``factors.{ℓ}.twiddle`` of
shape ``(a, d, b, c)`` for ``ℓ = 0 … L-1``, optionally ``lowrank.0.twiddle``
``(1, 1, m, r)`` and ``lowrank.1.twiddle`` ``(1, 1, r, n)`` for a rank-``r`` term
``U V`` added to the chain (the butterfly + low-rank hybrid), and ``bias``. The
forward pass is ``y = x @ (X_1 … X_L + U V).T + bias``: on CPU through the measured
fastest route of ``cpu_routes`` (GEMMs and batched matmuls), on CUDA through the
kernels when available, else the reference einsum product of ``butterfly.py``
(``LYONCOMPRESS_KERNELS=torch`` forces the einsum everywhere).

``QuantizedButterflyLinear`` is the same layer with its factors kept quantized: each
factor holds its payload (``factors.{ℓ}.qdata`` and ``.scale``, or ``.values``) as
buffers under the artifact's own names, and is dequantized on the fly in each forward
pass, one layer's float factors at a time, so a quantized artifact stays small in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lyoncompress.artifact import Artifact, load_artifact
from lyoncompress.butterfly import Chain, lowrank
from lyoncompress.cpu_routes import chain_apply, lowrank_accumulate
from lyoncompress.errors import InputError, PatternError
from lyoncompress.factorization import project
from lyoncompress.kernels import backend, ks_chain_apply, use_cuda_kernels
from lyoncompress.quantization.formats import get_format
from lyoncompress.quantization.payloads import (
    check_finite,
    codes_and_row_scale,
    dequantize_payload,
    dequantize_state,
    int4_pairs,
    int4_rows,
)
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
        self._two_gemms = _plain_lowrank(chain, lowrank_rank)
        self._gemm_views: tuple = ()  # (parameters' storage key, V (r, n), U (m, r)), see _gemm_weights

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
        if self._two_gemms and not torch.is_grad_enabled() and x.device.type == "cpu" and backend() is None:
            # inference on a plain U V: the two GEMMs and nothing else (at one row, as in
            # decoding, the per-call Python work of the general path cost ~20 us a layer)
            if x.shape[-1] != self.in_features:
                raise PatternError(
                    f"{type(self).__name__} takes inputs with {self.in_features} features, got {x.shape[-1]}"
                )
            v, u = self._gemm_weights()
            return F.linear(F.linear(x, v), u, self.bias)
        return self._product(x, self.twiddles, self.lowrank_twiddles)

    def _gemm_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The 2-D views ``V (r, n)`` and ``U (m, r)`` of a plain low rank's twiddles,
        kept between calls while both parameters keep their storage (``load_state_dict``
        with ``assign``, ``.to()`` or ``.data =`` give them new storage: the views follow)."""
        u_twiddle, v_twiddle = (factor.twiddle for factor in self.factors)
        if torch.compiler.is_compiling():
            return v_twiddle[0, 0], u_twiddle[0, 0]
        key = (id(u_twiddle), u_twiddle.data_ptr(), id(v_twiddle), v_twiddle.data_ptr())
        if not self._gemm_views or self._gemm_views[0] != key:
            self._gemm_views = (key, v_twiddle[0, 0], u_twiddle[0, 0])
        return self._gemm_views[1], self._gemm_views[2]

    def _product(self, x: torch.Tensor, twiddles: list[torch.Tensor], lowrank_twiddles: list[torch.Tensor]):
        """``x @ (X_1 … X_L + U V).T + bias`` for the given (float) twiddles."""
        if x.device.type == "cpu" and backend() is None:
            if x.shape[-1] != self.in_features:
                raise PatternError(
                    f"{type(self).__name__} takes inputs with {self.in_features} features, got {x.shape[-1]}"
                )
            self.chain.check_twiddles(twiddles)
            if self._two_gemms:
                return F.linear(F.linear(x, twiddles[1][0, 0]), twiddles[0][0, 0], self.bias)
            bias = self.bias if self.lowrank_chain is None else None
            y = chain_apply(self.chain.patterns, twiddles, x, bias)
            if self.lowrank_chain is not None:
                u, v = (t[0, 0] for t in lowrank_twiddles)  # (m, r), (r, n)
                y = lowrank_accumulate(y, u, v, x)
                y = y if self.bias is None else y + self.bias
            return y
        if use_cuda_kernels(x):
            y = ks_chain_apply(self.chain.patterns, twiddles, x)
        else:
            y = self.chain.apply(twiddles, x)
        if self.lowrank_chain is not None:
            y = y + self.lowrank_chain.apply(lowrank_twiddles, x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"chain={self.chain}, lowrank={self.lowrank_chain.patterns[0].c if self.lowrank_chain else 0}, "
            f"params={self.params}, bias={self.bias is not None}"
        )


class _QuantFactor(nn.Module):
    """Holds one factor's payload as buffers (``factors.{ℓ}.qdata``, ``.scale`` …) of the
    dtypes and shapes of the format's layout, for a twiddle of ``shape``.

    int4 codes are held in the ``rows`` nibble order (``quantization.payloads``), which
    unpacks faster than the artifact's ``pairs``: ``load_state_dict`` repacks them as it
    loads, ``state_dict`` and ``payload`` give the artifact's bytes back, and codes set
    some other way stay in ``pairs`` until ``repack`` is called (``nibbles`` says which).
    """

    def __init__(self, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], shape, device) -> None:
        super().__init__()
        for field, (dtype, field_shape) in layout.items():
            self.register_buffer(field, torch.zeros(field_shape, dtype=dtype, device=device))
        self.shape = tuple(shape)
        self.nibbles = "pairs"

    def held(self) -> dict[str, torch.Tensor]:
        """The payload as held in memory (int4 codes in the order ``nibbles``)."""
        return {key: buffer for key, buffer in self._buffers.items() if buffer is not None}

    def payload(self) -> dict[str, torch.Tensor]:
        """The payload as the artifact stores it."""
        held = self.held()
        if self.nibbles == "rows":
            held["qdata"] = int4_pairs(held["qdata"], self.shape[-2])
        return held

    def repack(self) -> None:
        """Hold int4 codes in the ``rows`` order (a no-op for other formats, or done)."""
        codes = self._buffers.get("qdata")
        if self.nibbles == "pairs" and codes is not None and codes.dtype == torch.uint8 and not codes.is_meta:
            with torch.no_grad():
                self._buffers["qdata"] = int4_rows(codes, self.shape[-1])
            self.nibbles = "rows"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.nibbles == "rows":
            destination[f"{prefix}qdata"] = int4_pairs(destination[f"{prefix}qdata"], self.shape[-2])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = f"{prefix}qdata"
        if key in state_dict and self.nibbles == "rows":  # back to the artifact's shape first
            self._buffers["qdata"] = torch.empty(
                (*self.shape[:-1], (self.shape[-1] + 1) // 2), dtype=torch.uint8, device=self.qdata.device
            )
            self.nibbles = "pairs"
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if key in state_dict:  # the artifact's order, copied or assigned
            self.nibbles = "pairs"
            self.repack()

    def _apply(self, fn, recurse=True):
        # codes and scales keep their storage dtype through model.to(dtype) / .half():
        # only the device may change
        for key, buffer in self._buffers.items():
            if buffer is not None:
                moved = fn(buffer)
                self._buffers[key] = moved if moved.dtype == buffer.dtype else buffer.to(moved.device)
        return self


class QuantizedButterflyLinear(ButterflyLinear):
    """A ``ButterflyLinear`` whose twiddles stay quantized in memory.

    Every factor keeps its payload (codes and scales, see ``quantization.formats``) as
    buffers named as in the artifact; ``forward`` dequantizes the factors to the input's
    dtype (``quantization.payloads.dequantize_payload``), runs the float product, and
    drops them (a plain low rank ``U V`` with a scale per row on the CPU: the GEMMs run
    on the codes, see ``_scaled_gemms``). ``twiddles`` returns the dequantized float
    twiddles (no parameters: the layer is for inference).

    Args:
        in_features, out_features, chain, bias, lowrank_rank: as in ``ButterflyLinear``.
        format: a storage format name (``int8``, ``int4``, ``fp8-e4m3`` …).
        group_size: entries per scale along ``c``, or None.
        dtype: of the bias and of ``twiddles``; device: of every tensor.

    Example:
        >>> layer = QuantizedButterflyLinear(384, 1536, chain, "int8", None)
        >>> layer.load_state_dict(payload_tensors)  # factors.0.qdata, factors.0.scale, …
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        chain: Chain,
        format: str,
        group_size: int | None,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        lowrank_rank: int = 0,
    ) -> None:
        nn.Module.__init__(self)
        if chain.shape != (out_features, in_features):
            raise PatternError(
                f"chain {chain} has shape {chain.shape}, but the layer maps "
                f"{in_features} -> {out_features} features (needs ({out_features}, {in_features}))"
            )
        fmt = get_format(format)
        self.in_features = in_features
        self.out_features = out_features
        self.chain = chain
        self.format = fmt.name
        self.group_size = group_size
        self.dtype = dtype or torch.get_default_dtype()
        self.factors = _payload_list(chain, fmt, group_size, device)
        self.lowrank_chain = lowrank(out_features, in_features, lowrank_rank) if lowrank_rank else None
        self.lowrank = _payload_list(self.lowrank_chain, fmt, group_size, device) if lowrank_rank else None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._two_gemms = _plain_lowrank(chain, lowrank_rank)
        # one scale per row (or tensor) of every factor: the GEMMs can run on the codes
        self._row_scaled = group_size is None or all(p.c == group_size for p in chain.patterns)

    def _float(self, factors: nn.ModuleList | None, chain: Chain | None, dtype: torch.dtype):
        if factors is None:
            return []
        return [
            dequantize_payload(factor.held(), pattern.twiddle_shape, dtype, factor.nibbles)
            for factor, pattern in zip(factors, chain.patterns)
        ]

    @property
    def twiddles(self) -> list[torch.Tensor]:
        return self._float(self.factors, self.chain, self._float_dtype())

    @property
    def lowrank_twiddles(self) -> list[torch.Tensor]:
        return self._float(self.lowrank, self.lowrank_chain, self._float_dtype())

    def repack(self) -> None:
        """Hold int4 codes in the nibble order that unpacks fastest (``_QuantFactor``);
        ``load_state_dict`` does it already, a loader that sets buffers directly calls this."""
        for factor in [*self.factors, *(self.lowrank or [])]:
            factor.repack()

    def _float_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else self.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._two_gemms and x.device.type == "cpu" and backend() is None:
            y = self._scaled_gemms(x)
            if y is not None:
                return y
        twiddles = self._float(self.factors, self.chain, x.dtype)
        return self._product(x, twiddles, self._float(self.lowrank, self.lowrank_chain, x.dtype))

    def _scaled_gemms(self, x: torch.Tensor) -> torch.Tensor | None:
        """``U V`` with a scale per row (or per tensor) of each, as two GEMMs on the codes.
        A factor ``(b, c)`` applied to fewer than ``c`` rows has its scale multiply the
        ``rows * b`` outputs rather than the ``b * c`` codes (at one row a pass over ``b``
        numbers instead of ``b * c``); on more rows the codes are scaled. The codes' unit
        (``1/16`` for int4 held as ``rows``) is carried along and applied with the last
        scale. None for grouped scales. Without autograd, int4 codes are unpacked into a
        reusable scratch buffer, one factor at a time."""
        if x.shape[-1] != self.in_features:
            raise PatternError(
                f"{type(self).__name__} takes inputs with {self.in_features} features, got {x.shape[-1]}"
            )
        if not self._row_scaled:
            return None
        scratch = not torch.is_grad_enabled()
        rows = x.numel() // self.in_features
        u_factor, v_factor = self.factors
        u_pattern, v_pattern = self.chain.patterns
        h, pending = x, 1.0  # the true activations are h * pending
        for factor, pattern, bias in ((v_factor, v_pattern, None), (u_factor, u_pattern, self.bias)):
            codes, scale, unit = codes_and_row_scale(
                factor.held(), pattern.twiddle_shape, x.dtype, factor.nibbles, scratch
            )
            pending *= unit
            if scale is not None and rows < codes.shape[1]:  # scale the outputs
                h = F.linear(h, codes)
                if bias is not None:
                    h, pending = torch.addcmul(bias, h, scale, value=pending), 1.0
                else:
                    h = h * scale
            else:  # scale the codes (in place: they are a fresh or scratch tensor)
                if scale is not None:
                    column = scale.unsqueeze(-1) if scale.ndim else scale
                    codes = codes.mul_(column if pending == 1 else column * pending)
                elif pending != 1:
                    codes = codes.mul_(pending)
                h, pending = F.linear(h, codes, bias), 1.0
        return h if pending == 1 else h.mul_(pending)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, format={self.format}, group_size={self.group_size}"


def _plain_lowrank(chain: Chain, lowrank_rank: int) -> bool:
    # a plain U V: on the CPU two F.linear calls, without the route machinery's per-call
    # lookups (~10 us a layer at one row)
    return not lowrank_rank and len(chain) == 2 and all(p.a == p.d == 1 for p in chain.patterns)


def _payload_list(chain: Chain, fmt, group_size: int | None, device) -> nn.ModuleList:
    return nn.ModuleList(
        _QuantFactor(fmt.layout(shape, group_size), shape, device) for shape in chain.twiddle_shapes
    )


def _factor_list(chain: Chain, dtype: torch.dtype | None, device: torch.device | str | None) -> nn.ModuleList:
    return nn.ModuleList(
        _Factor(torch.zeros(shape, dtype=dtype, device=device)) for shape in chain.twiddle_shapes
    )


def apply_artifact(model: nn.Module, artifact: Artifact | str | Path) -> nn.Module:
    """Swap the artifact's compressed layers into ``model`` and load every tensor, strictly.

    Each compressed layer must be an ``nn.Linear`` of the recorded shape in ``model``;
    it becomes a ``ButterflyLinear``, or a ``QuantizedButterflyLinear`` that keeps the
    quantized payloads as they are stored. Then the whole state dict is loaded: a
    missing or an extra tensor is an ``InputError``, a non-finite twiddle (after
    dequantization, checked one layer at a time) a ``FormatError``.

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
    state = {name: art.load(name) for name in art.tensors.names()}
    # nn.Embedding holds a float table, not codes: only embeddings are dequantized here
    state = dequantize_state(state, {n: r for n, r in art.layers.items() if r.is_embedding})
    check_finite(state, art.layers, str(art.path))
    for name, record in art.layers.items():
        if record.quantization is not None and not record.is_embedding:  # floats only for the check
            own = {k: v for k, v in state.items() if k.startswith(f"{name}.")}
            check_finite(dequantize_state(own, {name: record}), {name: record}, str(art.path))
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
    as the artifact's layer ``record`` says (a ``QuantizedButterflyLinear`` for a
    quantized record); returns the new layer."""
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise InputError(f"the artifact compresses layer {name!r}, which the model does not have") from err
    shape = (record.out_features, record.in_features)
    if not isinstance(module, nn.Linear) or (module.out_features, module.in_features) != shape:
        raise InputError(
            f"layer {name!r} is {module!r} in the model, the artifact expects Linear{shape[::-1]}"
        )
    common = dict(bias=record.bias, dtype=record.dtype.torch, device="meta", lowrank_rank=record.lowrank_rank)
    chain = record.chains["factors"]
    if record.quantization is None:
        layer = ButterflyLinear(record.in_features, record.out_features, chain, **common)
    else:
        quant = record.quantization
        layer = QuantizedButterflyLinear(
            record.in_features, record.out_features, chain, quant.format, quant.group_size, **common
        )
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)
    return layer
