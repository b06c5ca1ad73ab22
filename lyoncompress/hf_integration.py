"""Load artifacts with ``transformers``' ``from_pretrained`` (``quant_method: "lyoncompress"``).

transformers picks a quantizer from ``config.json``'s ``quantization_config.quant_method``
and documents ``register_quantization_config`` / ``register_quantizer`` for methods that
live outside it. ``register_with_transformers()`` registers ours:

- ``LyoncompressConfig`` holds the artifact's layer table (``format_version``, ``layers``);
- ``LyoncompressHfQuantizer`` swaps each listed ``nn.Linear`` of the freshly built (meta)
  model for a ``ButterflyLinear`` before the weights load, so transformers' own loader
  fills ``<module>.factors.<ℓ>.twiddle`` (and ``lowrank.<i>.twiddle``, ``bias``) by name,
  and tells it to pass over the empty ``<module>.weight`` placeholders. Those are what
  makes a transformers that has not run this registration refuse the artifact (a size
  mismatch, ``RuntimeError``) instead of loading random weights (docs/FORMAT.md).

Example:
    >>> from lyoncompress.hf_integration import register_with_transformers
    >>> register_with_transformers()
    True
    >>> model = transformers.AutoModel.from_pretrained("fact/")  # MLPs are ButterflyLinear

Both classes subclass transformers' and so are built on first use: this module imports
without transformers installed, and ``LyoncompressConfig`` / ``LyoncompressHfQuantizer``
are then looked up as attributes of the module.

``import lyoncompress`` calls ``register_when_imported()``: it registers at once when
transformers' quantizer registry is already imported, and otherwise when it is first
imported (by ``from_pretrained`` or anything else), through an import hook. Importing the
registry costs ~1.3 s, which every CLI start paid before, whether it used transformers
or not.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import re
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open
from torch import nn

from lyoncompress.artifact import FORMAT_VERSION, QUANT_METHOD, placeholder_name
from lyoncompress.errors import FormatError, InputError
from lyoncompress.layers import QuantizedButterflyLinear, swap_in
from lyoncompress.schema import LayerRecord, check_format_version, layer_table

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)
_LAZY_CLASSES = ("LyoncompressConfig", "LyoncompressHfQuantizer")
# transformers' registry of quantization methods; from_pretrained imports it
_REGISTRY_MODULE = "transformers.quantizers.auto"


def register_with_transformers() -> bool:
    """Teach ``transformers`` to load lyoncompress artifacts; safe to call repeatedly.

    Returns:
        ``True`` when ``quant_method: "lyoncompress"`` is registered (now or before),
        ``False`` when transformers is not installed (nothing is done).

    Example:
        >>> register_with_transformers()
        True
        >>> AutoModel.from_pretrained("fact/")  # the artifact written by `lyoncompress factorize`
    """
    if importlib.util.find_spec("transformers") is None:
        return False
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    config_cls, quantizer_cls = _classes()
    # transformers' decorators refuse a second registration: check first, to be idempotent
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not config_cls:
        register_quantization_config(QUANT_METHOD)(config_cls)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not quantizer_cls:
        register_quantizer(QUANT_METHOD)(quantizer_cls)
    return True


def register_when_imported() -> None:
    """Register with transformers now if its quantizer registry is loaded, else when it loads.

    Example:
        >>> register_when_imported()  # what `import lyoncompress` does
        >>> AutoModel.from_pretrained("fact/")  # imports the registry, which registers us
    """
    if _REGISTRY_MODULE in sys.modules:
        register_with_transformers()
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: hands transformers' registry module a loader that registers us after it."""

    def find_spec(
        self, fullname: str, path: Any = None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # once is enough, and the search below must not find us
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        register_with_transformers()

    def __getattr__(self, name: str) -> Any:
        # get_source, is_package, ...: whatever the wrapped loader offers
        return getattr(self._loader, name)


def __getattr__(name: str) -> type:
    # PEP 562: the transformers subclasses exist only once transformers is imported
    if name in _LAZY_CLASSES:
        return dict(zip(_LAZY_CLASSES, _classes()))[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _classes() -> tuple[type, type]:
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class LyoncompressConfig(QuantizationConfigMixin):
        """The ``quantization_config`` of an artifact's ``config.json``, as written by ``factorize``.

        Args:
            layers: per compressed module, its JSON record: ``structure``, ``in_features``,
                ``out_features``, ``chain`` (``[[a, b, c, d], …]``), ``lowrank_rank``, ``bias``,
                ``dtype``, ``quantization`` (see docs/FORMAT.md); validated by
                ``schema.LayerRecord`` and kept as JSON, which transformers serializes.
            format_version: artifact format version (``schema.READABLE_VERSIONS``).
            quant_method: always ``"lyoncompress"``.
        """

        def __init__(
            self,
            layers: dict[str, dict[str, Any]],
            format_version: int = FORMAT_VERSION,
            quant_method: str = QUANT_METHOD,
        ) -> None:
            if quant_method != QUANT_METHOD:
                raise InputError(f"quant_method {quant_method!r} is not {QUANT_METHOD!r}")
            try:
                check_format_version({"format_version": format_version}, "quantization_config")
                records = layer_table(layers)
            except FormatError as err:
                raise err.at("config.json") from None
            self.quant_method = quant_method
            self.format_version = format_version
            self.layers = {name: record.to_json() for name, record in records.items()}

        @property
        def records(self) -> dict[str, LayerRecord]:
            """The layer table as records (``layers`` stays JSON for transformers' ``to_dict``)."""
            return layer_table(self.layers)

    class LyoncompressHfQuantizer(HfQuantizer):
        """Builds ``ButterflyLinear`` layers on the meta model so that transformers loads the twiddles."""

        # artifacts are made offline by `lyoncompress factorize`, never while loading a dense model
        requires_calibration = True
        quantization_config: LyoncompressConfig

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            embeddings = sorted(n for n, r in self.quantization_config.records.items() if r.is_embedding)
            if embeddings:
                # transformers would load the codes into nn.Embedding by name and leave the
                # table uninitialised: refuse instead of returning a silently wrong model
                raise InputError(
                    f"this artifact has quantized embedding tables ({', '.join(embeddings[:3])}), "
                    "which from_pretrained cannot load; use lyoncompress.load_compressed(path)"
                )

        def _process_model_before_weight_loading(
            self,
            model: PreTrainedModel,
            checkpoint_files: list[str] | None = None,
            **kwargs: Any,
        ) -> PreTrainedModel:
            expected, placeholders = [], []
            for name, record in self.quantization_config.records.items():
                root, local = _locate(model, name)
                layer = swap_in(root, local, record)
                # the artifact's dtype would clash with a `dtype=` given to from_pretrained;
                # a quantized layer's codes and scales keep their storage dtypes
                layer.to(model.dtype)
                expected += [f"{name}.{key}" for key in layer.state_dict()]
                # matched against the model's key names, which may carry base_model_prefix
                placeholders.append(rf"(^|\.){re.escape(placeholder_name(local))}$")
            _check_tensors(expected, checkpoint_files or [])
            # the swapped-in layers have no .weight: transformers would list the (empty)
            # placeholders as unexpected keys in a warning on every load
            ignored = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
            model._keys_to_ignore_on_load_unexpected = ignored | set(placeholders)
            return model

        def _process_model_after_weight_loading(
            self, model: PreTrainedModel, **kwargs: Any
        ) -> PreTrainedModel:
            # transformers sets the codes as the artifact stores them, without load_state_dict:
            # repack int4 codes into the order the layers unpack fastest (same bytes)
            for module in model.modules():
                if isinstance(module, QuantizedButterflyLinear):
                    module.repack()
            return model

        def is_serializable(self) -> bool:
            # transformers asks this only in save_pretrained, whose refusal points at the log
            logger.warning(
                "save_pretrained cannot write a lyoncompress artifact: the safetensors headers would "
                "lack the layer table that docs/FORMAT.md requires; write artifacts with lyoncompress"
            )
            return False

        @property
        def is_trainable(self) -> bool:
            # float twiddles and biases are ordinary parameters; a quantized layer holds codes
            # and scales as buffers, so a model with one cannot be fine-tuned as loaded
            return all(r.quantization is None for r in self.quantization_config.records.values())

    for cls in (LyoncompressConfig, LyoncompressHfQuantizer):
        cls.__qualname__ = cls.__name__  # pickle finds them through the module's __getattr__
    return LyoncompressConfig, LyoncompressHfQuantizer


def _locate(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(root, path)`` with ``root.get_submodule(path)`` the layer the checkpoint calls ``name``.

    As transformers does for keys, a checkpoint of a base model (``encoder.…``) fits a model
    with a head (``bert.encoder.…``) and the other way round, through ``base_model_prefix``.
    """
    prefix = getattr(model, "base_model_prefix", "")
    candidates = [(model, name)]
    if prefix and hasattr(model, prefix):
        candidates.append((getattr(model, prefix), name))
    if prefix and name.startswith(f"{prefix}."):
        candidates.append((model, name.removeprefix(f"{prefix}.")))
    for root, path in candidates:
        try:
            root.get_submodule(path)
        except AttributeError:
            continue
        return root, path
    return model, name  # not there at all: swap_in names the missing layer


def _check_tensors(expected: list[str], checkpoint_files: list[str]) -> None:
    # transformers would only warn about a missing twiddle and leave it uninitialised;
    # artifacts are safetensors, whose headers tell the names without reading any data
    if not checkpoint_files or any(Path(file).suffix != ".safetensors" for file in checkpoint_files):
        return
    present: set[str] = set()
    for file in checkpoint_files:
        with safe_open(file, framework="pt") as handle:
            present.update(handle.keys())
    missing = sorted(set(expected) - present)
    if missing:
        raise InputError(
            f"the checkpoint lacks {missing[:3]}{' …' if len(missing) > 3 else ''} that its "
            "quantization_config's layers need; re-run `lyoncompress factorize`"
        )
