"""Small checkpoints and models built in tmp_path for pipeline tests."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lyoncompress.models import DEMO_MODEL_TYPE, DemoMLP

SIZES = [64, 128, 128, 10]


def make_mlp_checkpoint(folder: Path, seed: int = 0) -> tuple[Path, DemoMLP]:
    """A random demo-architecture MLP saved as an HF-style folder."""
    torch.manual_seed(seed)
    model = DemoMLP(SIZES).eval()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    config = {"model_type": DEMO_MODEL_TYPE, "architectures": ["DemoMLP"], "sizes": SIZES}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, model


def random_llama(**config):
    """A randomly initialised (seed 0) 2-layer ``LlamaForCausalLM``; ``config`` overrides
    the small defaults."""
    import transformers

    settings = {
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32,
    } | config
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings))
