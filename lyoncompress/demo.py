"""The built-in demo: a small MLP trained on scikit-learn's bundled digits, offline.

``demo_checkpoint()`` trains it once (seeded, a few seconds) and saves it as a
Hugging Face-style folder (``model.safetensors`` + ``config.json``) in the cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from lyoncompress.data import digits_split
from lyoncompress.models import DEMO_MODEL_TYPE, DemoMLP
from lyoncompress.recipe import EvalConfig, Gates, QuantizeConfig, Recipe

SIZES = [64, 256, 256, 10]
SEED = 0
TRAIN_EPOCHS = 60
# The same options as configs/demo.yaml (a test keeps them equal); built in so that
# an installed package needs no files from the source tree.
DEMO_RECIPE = Recipe(
    targets=("fc1", "fc2"),
    method="auto",
    budget=0.5,
    depth=2,
    calib="builtin",
    refine_steps=100,
    distill_steps=100,
)
DEMO_QUANTIZE = QuantizeConfig(format="int8")
DEMO_EVAL = EvalConfig(gates=Gates(min_recovery=0.97, max_output_error=0.2))


def cache_dir() -> Path:
    """``$LYONCOMPRESS_CACHE``, else ``~/.cache/lyoncompress``."""
    root = os.environ.get("LYONCOMPRESS_CACHE") or Path.home() / ".cache" / "lyoncompress"
    return Path(root)


def demo_outputs() -> tuple[Path, Path]:
    """The demo's artifact folders (float factors, int8 factors), their parent created."""
    root = cache_dir() / "demo-out"
    root.mkdir(parents=True, exist_ok=True)
    return root / "fact", root / "q"


def train_demo_model() -> DemoMLP:
    torch.manual_seed(SEED)
    split = digits_split()
    model = DemoMLP(SIZES)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(TRAIN_EPOCHS):
        for batch in torch.randperm(len(split.x_train)).split(128):
            loss = torch.nn.functional.cross_entropy(model(split.x_train[batch]), split.y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def demo_checkpoint(folder: Path | None = None) -> Path:
    """Path of the demo checkpoint folder, training and saving it on first use."""
    folder = folder or cache_dir() / "demo-mlp"
    weights = folder / "model.safetensors"
    if weights.exists() and (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    model = train_demo_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    config = {"model_type": DEMO_MODEL_TYPE, "architectures": ["DemoMLP"], "sizes": SIZES}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
