"""lyoncompress: butterfly (Kronecker-sparse) factorization and quantization of trained networks."""

from lyoncompress.artifact import load_artifact
from lyoncompress.butterfly import Chain, KSPattern, lowrank, monarch, search_chains, square_butterfly
from lyoncompress.errors import InputError, LyoncompressError, PatternError
from lyoncompress.evaluation import evaluate
from lyoncompress.factorization import Projection, project
from lyoncompress.factorization.pipeline import factorize
from lyoncompress.hf_integration import register_when_imported, register_with_transformers
from lyoncompress.inspection import inspect_artifact
from lyoncompress.layers import ButterflyLinear, QuantizedButterflyLinear, apply_artifact
from lyoncompress.models import load_compressed
from lyoncompress.quantization.pipeline import quantize
from lyoncompress.recipe import (
    EvalConfig,
    Gates,
    QuantizeConfig,
    Recipe,
    RecipeFile,
    SearchConfig,
    load_recipe,
)

__version__ = "0.1.0"

# So that transformers' AutoModel.from_pretrained(artifact) works after `import
# lyoncompress`, as a quantization method; deferred until transformers loads its
# quantizer registry, which a CLI run that never uses transformers does not pay for.
register_when_imported()

__all__ = [
    "ButterflyLinear",
    "QuantizedButterflyLinear",
    "EvalConfig",
    "Gates",
    "QuantizeConfig",
    "Recipe",
    "RecipeFile",
    "SearchConfig",
    "apply_artifact",
    "evaluate",
    "factorize",
    "inspect_artifact",
    "load_artifact",
    "load_compressed",
    "load_recipe",
    "register_when_imported",
    "register_with_transformers",
    "Chain",
    "InputError",
    "KSPattern",
    "LyoncompressError",
    "PatternError",
    "Projection",
    "__version__",
    "lowrank",
    "monarch",
    "project",
    "quantize",
    "search_chains",
    "square_butterfly",
]
